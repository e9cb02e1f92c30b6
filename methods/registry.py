"""The method registry: what a zero-shot SBIR method says about itself, and the one way in to any of them.

A method is one file in methods/ that defines a subclass of `Method` (an nn.Module: its networks) and decorates
it with `@register_method`, as timm registers a model. Every command asks this registry, by the name `--method`
gives or a checkpoint records: train.py for its options, networks, training data, optimisers and training step;
test.py, search.py and plot.py for how it embeds sketches and photos and which pictures it draws; reproduce.py
for its ablations and published numbers; prepare.py for its resize filter; convert.py for its importers of
released checkpoints. docs/methods.md adds one, step by step.

    model = create_model('msedge', train_classes, {'backbone_type': 'resnet50', 'emb_dim': 512})
    vectors = model.embed(images, domains)                  # L2-normalised, (B, emb_dim)
"""
import argparse
import inspect

import torch
import torch.nn as nn

from zs_sbir.cli import UserError

_REGISTRY = {}


def register_method(cls):
    """Class decorator: make a Method subclass available under its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, Method) and cls.name):
        raise TypeError(f'{cls!r} is not a Method subclass with a name')
    _REGISTRY[cls.name] = cls
    return cls


def method_names(listed=True):
    """The names `--method` accepts; with listed=False also the variants that another method's options select."""
    return [name for name, cls in _REGISTRY.items() if cls.listed or not listed]


def get_method(name, options=None):
    """The Method class registered as `name`; given `options` (train.py's arguments, or those a checkpoint
    recorded), the entry they select: ACNet with --extractor_only is its extractor-only variant."""
    if name not in _REGISTRY:
        raise UserError(f'--method {name!r} is not a registered method (there are: {", ".join(method_names())})')
    cls = _REGISTRY[name]
    return cls.resolve(namespace(options)) if options is not None else cls


def create_model(name, classes, options=None, pretrained=True, weights=None):
    """The networks of method `name`, as timm's create_model: `classes` are the training class names, `options`
    train.py's arguments (a dict or a Namespace). Each keyword parameter of the method's constructor is taken
    from `options` by name (those missing, e.g. in an older checkpoint, take the method's defaults)."""
    options = with_defaults(name, options)
    cls = get_method(name, options)
    given = {**vars(options), 'pretrained': pretrained, 'weights': weights}
    parameters = [p for p in inspect.signature(cls.__init__).parameters if p not in ('self', 'classes')]
    return cls(list(classes), **{p: given[p] for p in parameters if p in given})


def with_defaults(name, options=None):
    """`options` (a dict or a Namespace) as a Namespace completed with the defaults of method `name`: those of its
    own options, and the defaults it gives train.py's common options (Method.defaults)."""
    options = vars(namespace(options))
    base = {**_REGISTRY[name].defaults, **option_defaults(_REGISTRY[name])} if name in _REGISTRY else {}
    variant = get_method(name, {**base, **options})
    return argparse.Namespace(**{**base, **variant.defaults, **options})


def option_defaults(cls):
    """{dest: default} of the options a method adds itself (its add_options)."""
    parser = argparse.ArgumentParser(add_help=False)
    cls.add_options(parser)
    return {action.dest: action.default for action in parser._actions}


def add_own_options(parser, cls, names):
    """Add to `parser` (or an argument group) the options `names` of those a method adds itself."""
    scratch = argparse.ArgumentParser(add_help=False)
    cls.add_options(scratch)
    for action in scratch._actions:
        if action.dest in names:
            parser._add_action(action)


def option_owners():
    """{option dest: (the listed method that adds it, its default)}."""
    return {dest: (cls, default) for cls in _REGISTRY.values() if cls.listed
            for dest, default in option_defaults(cls).items()}


def namespace(options):
    if options is None:
        return argparse.Namespace()
    return argparse.Namespace(**options) if isinstance(options, dict) else options


class Method(nn.Module):
    """A zero-shot SBIR method: its networks (put together from model.py's classes) and what the commands ask of
    it. Subclass it in a file of its own, set `name`, decorate it with @register_method and write __init__,
    embed, make_optimizers and training_step; everything else has a default that suits a method with one
    network trained on single images. Option hooks receive train.py's arguments as a Namespace.

    The constructor's parameters after `classes` (the training class names) are the options that shape the
    networks: create_model passes each from train.py's arguments by name (backbone_type, emb_dim, img_size,
    the method's own options, and pretrained and weights), so a checkpoint rebuilds its networks from the
    arguments it recorded.
    """
    name = None                 # the --method value and what checkpoints record
    listed = True               # False: no --method choice; another method's options select it (resolve)
    label = None                # how messages name it (default: its name), e.g. 'acnet --extractor_only'
    interpolation = 'bilinear'  # the resize filter of its inputs (prepare.py cache builds one cache per filter)
    # train.py's common options whose default is the method's own
    defaults = dict(backbone_type='resnet50', emb_dim=512, epochs=10, warmup=0, lr=1e-5, metric_convention='sake',
                    val_classes='seeds')
    default_notes = {}          # --help's words for a default that is no value (e.g. ClipPrompt's emb_dim: its CLIP's)
    warms_up = False            # whether set_warmup freezes anything (else --warmup is refused)
    min_batch_size = 1          # e.g. 2 when a batch holds batch_size // 2 pairs
    draws = ()                  # the names of the pictures it can draw (its `pictures`)
    optional_pictures = ()      # those test.py draws only when asked (--show_generated)
    training_free_options = ()  # its own options that shape its training-free baseline (test.py takes them too)
    ablations = ()              # reproduce.py --ablations: dict(argv=train.py options, source=..., backbones=prefix)
    paper_grid = {}             # reproduce.py's default grid: backbones and emb_dims (default: the method's defaults)
    file_suffix_pattern = ''    # a regex of what file_suffix can add (reproduce.py reads run names back with it)
    backbone_tag = ''           # the backbone as built (a timm name with its tag), for logs and checkpoints

    # ------------------------------------------------------------------------------------------ options
    @classmethod
    def add_options(cls, parser):
        """Add the method's own options, with their defaults, to train.py's parser (in an argument group)."""

    @classmethod
    def resolve(cls, options):
        """The registered entry that `options` select (a variant reached through an option overrides this)."""
        return cls

    @classmethod
    def complete(cls, options):
        """Tidy options in place once parsed (e.g. put a list in one order, so that it names one file)."""

    @classmethod
    def check(cls, options):
        """What is wrong with `options`, in words ([] when nothing is)."""
        return []

    @classmethod
    def check_backbone(cls, backbone_type, option='--backbone_type'):
        """Refuse, in one line naming `option`, a backbone the method cannot build (any passes by default); train.py
        calls it beside check."""

    @classmethod
    def takes_backbone(cls, backbone_type):
        """Whether check_backbone passes the name."""
        try:
            cls.check_backbone(backbone_type)
            return True
        except UserError:
            return False

    @classmethod
    def fixed_emb_dim(cls, backbone_type):
        """The embedding size a backbone fixes (a CLIP's), or None when --emb_dim chooses it."""
        return None

    @classmethod
    def grid(cls):
        """(backbones, emb_dims) of reproduce.py's default grid: those of the method's paper table."""
        return (tuple(cls.paper_grid.get('backbones', (cls.defaults['backbone_type'],))),
                tuple(cls.paper_grid.get('emb_dims', (cls.defaults['emb_dim'],))))

    @classmethod
    def describe(cls):
        return cls.label or cls.name

    @classmethod
    def file_suffix(cls, options):
        """What sets a variant apart in its run's file names ('' for the method as published)."""
        return ''

    @classmethod
    def add_release_options(cls, parser):
        """convert.py: add the options that name the files of the method's released checkpoints (none: no releases)."""

    @classmethod
    def from_release(cls, args):
        """convert.py: (model, train.py options of the run it stands for, the names of the networks it holds or None
        for all) from the released files that convert.py's arguments name."""
        raise NotImplementedError

    @classmethod
    def published(cls, backbone_type, emb_dim, data_name):
        """{metric: percent} the method's paper or README reports for this configuration (in the method's
        metric convention, defaults['metric_convention']), or {}."""
        return {}

    # ------------------------------------------------------------------------------------------ data
    @staticmethod
    def train_transform(p=None):
        """Augmentation of one uint8 image tensor in training (`p` overrides every probability); None: none."""
        return None

    @classmethod
    def train_dataset(cls, split, images, batch_size):
        """(Dataset, items per batch, drop a last batch of one item) for training: single images by default,
        each (image, label, domain, index), and no batch of one (BatchNorm cannot train on it)."""
        from zs_sbir.datasets import SplitDataset
        return SplitDataset(split, images, cls.train_transform()), batch_size, True

    # ------------------------------------------------------------------------------------------ training
    def trained_parts(self):
        """{name: module} that train; a distributed run wraps each in DistributedDataParallel."""
        return {'model': self}

    def make_optimizers(self, options, fused=None):
        """{name: optimiser} from train.py's options."""
        raise NotImplementedError

    def training_step(self, nets, optimizers, batch):
        """One step on a batch already on the device; returns {loss name: detached tensor} without a host sync.
        `nets` (zs_sbir.training.Nets) holds the trained parts as DDP wraps them, and `nets.autocast()`."""
        raise NotImplementedError

    def set_warmup(self, warming_up):
        """Freeze what --warmup freezes (nothing by default)."""

    def set_grad_checkpointing(self):
        raise UserError(f'--grad_checkpointing: {self.name} offers no gradient checkpointing')

    def compile_parts(self):
        """The modules --compile compiles (in place: state dict keys stay the same)."""
        return [self]

    # ------------------------------------------------------------------------------------------ evaluation
    def embed(self, images, domains):
        """L2-normalised embeddings (B, D) of uint8 images (B, 3, H, W), each taken as its domain (utils.PHOTO or
        utils.SKETCH). Called in eval mode under torch.inference_mode (zs_sbir.retrieval.embed)."""
        raise NotImplementedError

    def embedder(self, domain):
        """A module from uint8 images (B, 3, H, W) to their embeddings as `domain`: what an ONNX graph holds (one per
        domain, zs_sbir/onnx_runtime.py). By default `embed` with every image taken as that domain; a method whose
        embed masks the batch by domain returns a module without the mask."""
        return DomainEmbedder(self, domain)

    def pictures(self, images, domain):
        """{name: uint8 images (B, 3, h, w), or maps (B, h, w) in [0, 1]} showing what the method makes of
        images of one domain: test.py draws them beside a query, plot.py as sheets."""
        return {}

    @classmethod
    def training_free(cls, options, pretrained=True, weights=None):
        """A module with `embed`, `backbone_tag` and `interpolation`: the method's backbone with no training
        (test.py --evaluate --training_free), pooled as the method pools it."""
        raise UserError(f'--training_free: {cls.name} has no training-free baseline')

    def backbone_module(self):
        """The backbone inside, whose parameters and feature sizes speed.py reports."""
        return self


class DomainEmbedder(nn.Module):
    """A method's `embed` with every image of the batch taken as one domain (Method.embedder)."""

    def __init__(self, model, domain):
        super().__init__()
        self.model, self.domain = model, domain

    def forward(self, images):
        domains = torch.full((images.shape[0],), self.domain, dtype=torch.long, device=images.device)
        return self.model.embed(images, domains)
