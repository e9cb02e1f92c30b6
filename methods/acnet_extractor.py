"""ACNet's extractor-only baselines (the original's ablation/norm.py and ablation/triplet.py as of c9ca544; at
61d156a the triplet script still trained the generator): no generator or discriminator, the extractor alone on single sketches and photos with one class loss, its
BatchNorm training. Not a --method of its own: `--method acnet --extractor_only` selects it (ACNet.resolve), so
its runs and checkpoints are ACNet's, with `_extractor-<class loss>` in their file names.

    python train.py --data_name sketchy --extractor_only                          # ablation/norm.py
    python train.py --data_name sketchy --extractor_only --class_loss triplet     # ablation/triplet.py
"""
from methods.acnet import ACNet, CLASS_INPUTS, DEFAULT_LOSS_WEIGHTS
from methods.registry import register_method
from zs_sbir.datasets import SplitDataset


@register_method
class ACNetExtractor(ACNet):
    name = 'acnet_extractor'
    listed = False
    # the original baselines froze nothing and trained at 1e-4 (Adam(..., lr=1e-4) for extractor and proxies)
    defaults = dict(ACNet.defaults, warmup=0, lr=1e-4)
    min_batch_size = 2  # its BatchNorm trains: a batch of one image has no statistics
    optional_pictures, draws = (), ()
    label = 'acnet --extractor_only'
    has_generator = False
    ablations = ()

    @classmethod
    def resolve(cls, options):
        return cls

    @classmethod
    def check(cls, options):
        problems = super().check(options)
        if tuple(options.loss_weights) != DEFAULT_LOSS_WEIGHTS or tuple(options.class_on) != CLASS_INPUTS:
            problems.append("--loss_weights and --class_on weigh the generator's losses: --extractor_only has none")
        if options.class_loss == 'ce':
            problems.append('--extractor_only --class_loss ce: no commit of the original had this baseline (its '
                            'extractor-only scripts use normsoftmax or triplet); pick one of those')
        return problems

    @classmethod
    def train_dataset(cls, split, images, batch_size):
        """Single sketches and photos, flipped as ACNet flips them."""
        return SplitDataset(split, images, cls.train_transform()), batch_size, True

    def training_step(self, nets, optimizers, batch):
        images, labels, _, _ = batch
        with nets.autocast():
            embeddings = nets.extractor(self.to_input(images))
        loss = nets.class_loss(embeddings.float(), labels)
        optimizers['extractor'].zero_grad(set_to_none=True)
        loss.backward()
        optimizers['extractor'].step()
        return {'class_loss': loss.detach()}
