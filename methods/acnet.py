"""ACNet (Ren et al., TCSVT 2023): a generator turns sketches into photo-like images; one extractor embeds
sketches, photos and generated images; a PatchGAN discriminator and NormalizedSoftmax proxies supply the
losses. Everything that is ACNet's own: its options, networks, training step, embedding, pictures, its
published numbers and the importer of the authors' released checkpoints (convert.py).

    python train.py --data_name sketchy                                   # the seed's defaults
    python train.py --data_name sketchy --loss_weights 1 0 1 --class_on photo fake   # an ablation

Module names match the original's, so its released state dicts load as they are.
"""
import timm
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses

from methods.registry import Method, create_model, get_method, register_method
from model import CrossEntropyHead, Discriminator, Extractor, Generator
from utils import METRIC_NAMES, SKETCH
from zs_sbir.backbones import backbone_tag, input_normalisation, set_grad_checkpointing
from zs_sbir.checkpoint import read_pth
from zs_sbir.cli import UserError
from zs_sbir.datasets import SketchPhotoPairs

CLASS_LOSSES = ('normsoftmax', 'ce', 'triplet')
# ACNet's loss: adversarial + 0.1 * identity + 10 * class, the class loss on E(sketch), E(photo), E(G(sketch)).
DEFAULT_LOSS_WEIGHTS, CLASS_INPUTS = (1.0, 0.1, 10.0), ('sketch', 'photo', 'fake')
# `resnet50` / `vgg16`: the ImageNet weights the original code loaded (timm 0.4.12's resnet50 file is
# resnet50_ram-a26f946b.pth); its generator's range [-1, 1] is the backbone's input (0.5 / 0.5).
SEED_BACKBONES = {'resnet50': 'resnet50.ram_in1k', 'vgg16': 'vgg16.tv_in1k'}
SEED_NORMALISATION = ((0.5,) * 3, (0.5,) * 3)
# The ACNet README, ResNet50/VGG16 x 64/512/4096 (selected on the unseen test classes), in percent:
# (Sketchy mAP@200, mAP@all, P@100, P@200, TU-Berlin mAP@200, mAP@all, P@100, P@200)
PUBLISHED = {
    ('vgg16', 64): (32.6, 38.0, 48.7, 44.7, 39.8, 37.1, 50.6, 48.0),
    ('vgg16', 512): (38.3, 42.2, 53.3, 49.3, 47.2, 43.9, 58.1, 55.3),
    ('vgg16', 4096): (40.0, 43.2, 54.6, 50.8, 51.7, 47.9, 62.3, 59.3),
    ('resnet50', 64): (43.0, 46.0, 56.8, 52.7, 47.5, 44.9, 57.2, 54.9),
    ('resnet50', 512): (51.7, 55.9, 64.3, 60.8, 57.7, 57.7, 65.8, 64.4),
    ('resnet50', 4096): (51.1, 55.7, 63.8, 60.0, 57.3, 58.6, 64.6, 63.5),
}


@register_method
class ACNet(Method):
    """Generator, discriminator, extractor and the class-loss proxies, saved and loaded as one.

    `class_loss` 'ce' replaces NormalizedSoftmax by a cross-entropy head (04de2e0); the extractor-only
    baselines are a variant of their own (methods/acnet_extractor.py).
    """
    name = 'acnet'
    interpolation = 'bilinear'
    draws = ('generated',)  # its pictures (plot.py generated)
    warms_up = True
    defaults = dict(Method.defaults, warmup=1)
    min_batch_size = 2  # a batch holds batch_size // 2 sketch-photo pairs
    optional_pictures = ('generated',)
    has_generator = True  # the extractor-only variant has none
    paper_grid = dict(backbones=('resnet50', 'vgg16'), emb_dims=(64, 512, 4096))  # its README's table
    file_suffix_pattern = r'(?:_extractor-[a-z]+|_ce|_triplet|_w[^_]+|_on-[a-z-]+)*'
    ablations = (  # the original code's history (docs/training.md)
        dict(argv=['--loss_weights', '1', '0', '1', '--class_on', 'photo', 'fake'], source='75f7311 train_adv.py'),
        dict(argv=['--loss_weights', '1', '1', '1', '--class_on', 'photo', 'fake'], source='75f7311 train_ind.py'),
        dict(argv=['--loss_weights', '1', '0', '1'], source='75f7311 train_reg.py'),
        dict(argv=['--class_loss', 'ce'], source='04de2e0 (reverted in f63739d)'),
        dict(argv=['--extractor_only'], source='c9ca544 ablation/norm.py'),
        dict(argv=['--extractor_only', '--class_loss', 'triplet'], source='c9ca544 ablation/triplet.py'))

    def __init__(self, classes, backbone_type, emb_dim, class_loss, loss_weights, class_on, pretrained=True,
                 weights=None):
        super().__init__()
        num_classes = len(classes)
        self.backbone_tag = backbone_tag(SEED_BACKBONES, backbone_type)
        self.class_loss_name = class_loss
        self.loss_weights, self.class_on = tuple(loss_weights), tuple(class_on)
        if self.has_generator:
            self.generator = Generator()
            self.discriminator = Discriminator()
        mean, std = input_normalisation(self.backbone_tag, SEED_NORMALISATION)
        self.extractor = Extractor(self.backbone_tag, emb_dim, pretrained, weights, mean, std,
                                   normalize=class_loss != 'ce', freeze_batchnorm=self.has_generator)
        self.class_loss = {'normsoftmax': lambda: losses.NormalizedSoftmaxLoss(num_classes, emb_dim),
                           'ce': lambda: CrossEntropyHead(num_classes, emb_dim),
                           'triplet': losses.TripletMarginLoss}[class_loss]()

    # ------------------------------------------------------------------------------------------ options
    @classmethod
    def add_options(cls, parser):
        group = parser.add_argument_group('acnet options')
        group.add_argument('--loss_weights', type=float, nargs=3, default=list(DEFAULT_LOSS_WEIGHTS),
                           metavar=('ADV', 'IDENTITY', 'CLASS'),
                           help='weights of the adversarial, identity and class losses (identity 0: not computed)')
        group.add_argument('--class_on', nargs='+', default=list(CLASS_INPUTS), choices=CLASS_INPUTS,
                           help='the embeddings the class loss sees (fake: of the generated images)')
        group.add_argument('--class_loss', default='normsoftmax', choices=CLASS_LOSSES,
                           help='the class loss (ce: a cross-entropy head, 04de2e0; triplet: with --extractor_only, '
                                'ablation/triplet.py)')
        group.add_argument('--extractor_only', action='store_true',
                           help='no generator or discriminator, the extractor alone on single sketches and photos '
                                '(the original ablation/norm.py and ablation/triplet.py; their defaults: --warmup 0, '
                                '--lr 1e-4)')

    @classmethod
    def resolve(cls, options):
        return get_method('acnet_extractor') if getattr(options, 'extractor_only', False) else cls

    @classmethod
    def complete(cls, options):
        options.class_on = [name for name in CLASS_INPUTS if name in options.class_on]  # one order: one file name

    @classmethod
    def check(cls, options):
        problems = []
        if not all(0 <= w < float('inf') for w in options.loss_weights) or options.loss_weights[2] == 0:
            problems.append(f'--loss_weights must be >= 0 with a class weight above 0, got {options.loss_weights}')
        if options.class_loss == 'triplet' and cls.has_generator:
            problems.append('--class_loss triplet is the extractor-only baseline of the original '
                            '(ablation/triplet.py): add --extractor_only')
        return problems

    @classmethod
    def check_backbone(cls, backbone_type, option='--backbone_type'):
        backbone_tag(SEED_BACKBONES, backbone_type, option)  # an unknown name: the close matches

    @classmethod
    def file_suffix(cls, options):
        """What sets a variant apart from the original, e.g. _w1-0-1_on-photo-fake, _ce or _extractor-triplet."""
        suffix = '_extractor' if options.extractor_only else ''
        if options.class_loss != 'normsoftmax' or options.extractor_only:
            suffix += f'-{options.class_loss}' if options.extractor_only else f'_{options.class_loss}'
        if tuple(options.loss_weights) != DEFAULT_LOSS_WEIGHTS:
            suffix += '_w' + '-'.join(f'{w:g}' for w in options.loss_weights)
        if tuple(options.class_on) != CLASS_INPUTS:
            suffix += '_on-' + '-'.join(options.class_on)
        return suffix

    @classmethod
    def published(cls, backbone_type, emb_dim, data_name):
        """The ACNet README's numbers, for the Sketchy and TU-Berlin folders."""
        values = PUBLISHED.get((backbone_type, emb_dim))
        if values is None or not (data_name == 'sketchy' or data_name.startswith('tuberlin')):
            return {}
        return dict(zip(METRIC_NAMES, values[:4] if data_name == 'sketchy' else values[4:]))

    @classmethod
    def add_release_options(cls, parser):
        parser.add_argument('--extractor', default=None, help='the released {prefix}_extractor.pth')
        parser.add_argument('--generator', default=None, help='the released {prefix}_generator.pth')

    @classmethod
    def from_release(cls, args):
        """The ACNet README's downloads: the extractor and generator state dicts of the original train.py."""
        if not (args.extractor and args.generator):
            raise UserError('--extractor and --generator go together: name both released files of one row')
        backbone_type, emb_dim = args.backbone_type or cls.defaults['backbone_type'], args.emb_dim or cls.defaults['emb_dim']
        states = [read_pth(path, 'released checkpoint') for path in (args.extractor, args.generator)]
        model = from_released(*states, backbone_type, emb_dim, paths=(args.extractor, args.generator))
        return model, ['--backbone_type', backbone_type, '--emb_dim', str(emb_dim)], ('generator', 'extractor')

    @staticmethod
    def train_transform(p=None):
        from torchvision.transforms import v2
        return v2.RandomHorizontalFlip(0.5 if p is None else p)

    @classmethod
    def train_dataset(cls, split, images, batch_size):
        """batch_size // 2 sketch-photo pairs per batch (each sketch with a photo of its class, drawn anew)."""
        return SketchPhotoPairs(split, images, cls.train_transform()), batch_size // 2, False

    # ------------------------------------------------------------------------------------------ training
    def trained_parts(self):
        names = ('generator', 'discriminator', 'extractor', 'class_loss') if self.has_generator else \
            ('extractor', 'class_loss')
        return {name: getattr(self, name) for name in names}

    def make_optimizers(self, options, fused=None):
        # NormalizedSoftmax's proxies at 1e-3; the CE head sat in the original's extractor, at its rate, and so
        # did the extractor-only baselines' proxies (ablation/norm.py: Adam(..., lr=1e-4) for both)
        lr = options.lr
        head_lr = 1e-3 if self.class_loss_name == 'normsoftmax' and self.has_generator else lr
        groups = [dict(params=self.extractor.parameters(), lr=lr)]
        if list(self.class_loss.parameters()):
            groups.append(dict(params=self.class_loss.parameters(), lr=head_lr))
        optimizers = {'extractor': torch.optim.Adam(groups, fused=fused)}
        if self.has_generator:
            optimizers['generator'] = torch.optim.Adam(self.generator.parameters(), lr=1e-3, betas=(0.5, 0.999),
                                                       fused=fused)
            optimizers['discriminator'] = torch.optim.Adam(self.discriminator.parameters(), lr=1e-4,
                                                           betas=(0.5, 0.999), fused=fused)
        return optimizers

    def training_step(self, nets, optimizers, batch):
        sketch, photo, labels = batch
        n = len(sketch)
        sketch, photo = self.to_input(sketch), self.to_input(photo)
        adv_weight, identity_weight, class_weight = self.loss_weights
        # Generator and extractor: adversarial + 0.1 * identity + 10 * class (the defaults of --loss_weights).
        self.discriminator.requires_grad_(False)  # this loss trains G only; D gets its own step below
        with nets.autocast():
            # one call covers G(sketch) and, for the identity loss, G(photo): InstanceNorm is per image
            generated = nets.generator(torch.cat([sketch, photo]) if identity_weight else sketch)
            fake = generated[:n]
            fake_score = self.discriminator(fake).float()
            inputs = {'sketch': sketch, 'photo': photo, 'fake': fake}
            embeddings = nets.extractor(torch.cat([inputs[name] for name in self.class_on]))
        self.discriminator.requires_grad_(True)
        losses = {'adv_loss': F.mse_loss(fake_score, torch.ones_like(fake_score))}
        if identity_weight:
            losses['identity_loss'] = F.l1_loss(generated[n:].float(), photo)
        # One call on equal parts = the mean of the per-part losses (mean reduction).
        losses['class_loss'] = nets.class_loss(embeddings.float(), labels.repeat(len(self.class_on)))
        total = (adv_weight * losses['adv_loss'] + class_weight * losses['class_loss'] +
                 (identity_weight * losses['identity_loss'] if identity_weight else 0))
        for name in ('generator', 'extractor'):
            optimizers[name].zero_grad(set_to_none=True)
        total.backward()
        for name in ('generator', 'extractor'):
            optimizers[name].step()
        # Discriminator: least squares, real photos -> 1, generated images -> 0.
        with nets.autocast():
            scores = nets.discriminator(torch.cat([photo, fake.detach().to(photo.dtype)])).float()
        real_score, fake_score = scores[:n], scores[n:]
        dis_loss = (F.mse_loss(real_score, torch.ones_like(real_score)) +
                    F.mse_loss(fake_score, torch.zeros_like(fake_score))) / 2
        optimizers['discriminator'].zero_grad(set_to_none=True)
        dis_loss.backward()
        optimizers['discriminator'].step()
        losses['dis_loss'] = dis_loss
        return {name: value.detach() for name, value in losses.items()}

    def set_warmup(self, warming_up):
        """During warm-up every parameter of the extractor's timm model is frozen except its new
        classifier's weight and bias (the original: all but the last two of backbone.parameters())."""
        self.extractor.backbone.requires_grad_(not warming_up)
        self.extractor.backbone.get_classifier().requires_grad_(True)

    def set_grad_checkpointing(self):
        set_grad_checkpointing(self.extractor.backbone, self.backbone_tag)

    def compile_parts(self):
        return ([self.generator, self.discriminator] if self.has_generator else []) + [self.extractor]

    # ------------------------------------------------------------------------------------------ evaluation
    @staticmethod
    def to_input(images):
        """uint8 images to [-1, 1], the range of the generator's tanh."""
        return images.float() / 127.5 - 1

    def embed(self, images, domains):
        """Photos as E(photo), sketches as E(G(sketch)) (as E(sketch) without a generator), L2-normalised."""
        x = self.to_input(images)
        sketches = domains == SKETCH
        if sketches.any() and self.has_generator:
            x[sketches] = self.generator(x[sketches]).to(x.dtype)
        embeddings = self.extractor(x)
        return embeddings if self.extractor.normalize else F.normalize(embeddings, dim=-1)

    def pictures(self, images, domain):
        """The generator's photo-like image of each image, as uint8 (what the original vis.py saved)."""
        if not self.has_generator:
            return {}
        return {'generated': ((self.generator(self.to_input(images)) + 1) * 127.5).clamp(0, 255).byte()}

    @classmethod
    def training_free(cls, options, pretrained=True, weights=None):
        return TrainingFreeExtractor(options.backbone_type, pretrained, weights)

    def backbone_module(self):
        return self.extractor.backbone


class TrainingFreeExtractor(torch.nn.Module):
    """ACNet's backbone with no training (docs/training.md): the extractor's timm model up to its pooling (VGG16
    through fc6/fc7), inputs normalised as ACNet normalises them, sketches as they are (an untrained generator
    would only add noise), L2-normalised. No new layer is made: nothing random enters but what the weights (or
    --no_pretrained) bring."""
    name, interpolation = ACNet.name, ACNet.interpolation

    def __init__(self, backbone_type, pretrained=True, weights=None):
        super().__init__()
        self.net = create_model('acnet', ['-'], dict(backbone_type=backbone_type, emb_dim=8, extractor_only=True),
                                pretrained, weights)
        self.backbone_tag = self.net.backbone_tag

    def embed(self, images, domains):
        extractor = self.net.extractor
        x = self.net.to_input(images)
        x = x * extractor.scale + extractor.shift if extractor.rescale else x
        features = extractor.backbone.forward_head(extractor.backbone.forward_features(x), pre_logits=True)
        return F.normalize(features.flatten(1).float(), dim=-1)


# ----------------------------------------------------------------------------------------------
# The authors' released checkpoints (convert.py)

def _check_state(state, expected, path, what):
    """A released state dict must have exactly the expected tensor names and shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        example = f'lacks {missing[0]}' if missing else f'has an unexpected {unexpected[0]}'
        raise UserError(f"'{path}' is not {what}: {len(missing)} of its {len(expected)} tensors are missing and "
                        f"{len(unexpected)} unexpected ({example})")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise UserError(f"'{path}' is not {what}: {key} has shape {tuple(state[key].shape)}, "
                            f"expected {tuple(tensor.shape)}")


def _released_kind(state):
    """What a released state dict looks like: 'generator', 'resnet50' or 'vgg16' (an extractor), or None."""
    for prefix, kind in (('in_conv.', 'generator'), ('backbone.layer1.', 'resnet50'), ('backbone.features.', 'vgg16')):
        if any(k.startswith(prefix) for k in state):
            return kind
    return None


def from_released(extractor_state, generator_state, backbone_type, emb_dim, paths=('extractor', 'generator')):
    """An ACNet holding the original train.py's saved Extractor and Generator state dicts.

    Raises UserError naming the file when a state dict does not fit the asked backbone and size.
    """
    model = create_model('acnet', ['-'], dict(backbone_type=backbone_type, emb_dim=emb_dim), pretrained=False)
    arch = timm.models.split_model_name_tag(model.backbone_tag)[0]
    classifier = f'backbone.{model.extractor.backbone.pretrained_cfg["classifier"]}.weight'
    for state, module, kind, path in ((extractor_state, model.extractor, arch, paths[0]),
                                      (generator_state, model.generator, 'generator', paths[1])):
        what = 'an ACNet generator' if kind == 'generator' else f'a {backbone_type} ACNet extractor'
        if isinstance(state, dict) and 'format' in state:
            raise UserError(f"'{path}' is a checkpoint of this repo, not a released state dict: it needs no "
                            f"conversion (pass it to test.py --data_base)")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"'{path}' is not a state dict (a dict of tensors) but a {type(state).__name__}")
        found = _released_kind(state)
        if found and found != kind:
            hint = ('swap --extractor and --generator' if 'generator' in (found, kind)
                    else f'pass --backbone_type {found}')
            raise UserError(f"'{path}' looks like {'a generator' if found == 'generator' else f'a {found} extractor'}"
                            f", not {what}: {hint}")
        if kind != 'generator' and classifier in state and state[classifier].shape[0] != emb_dim:
            raise UserError(f"'{path}' holds {state[classifier].shape[0]}-d embeddings: pass --emb_dim "
                            f"{state[classifier].shape[0]}")
        _check_state(state, module.state_dict(), path, what)
        module.load_state_dict(state)
    return model
