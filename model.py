"""The networks of both methods, built as the original code builds them (README: "Fidelity").

ACNet  : a generator turns sketches into photo-like images; one extractor, the original's
         timm.create_model(name, num_classes=emb_dim, global_pool='max') with L2 norm, embeds
         sketches, photos and generated images; a PatchGAN discriminator and NormalizedSoftmax
         proxies supply the losses. Module names match the original's, so its released
         state dicts load as they are (convert.py).
MSEdge : Sobel edge maps of the inputs go through a features_only backbone; a multi-scale
         edge-fusion head attends the two lower stages with the top one and embeds their pooled
         concatenation; ProxyAnchor proxies supply the loss.

Both models take uint8 images (B, 3, H, W) and do their own normalisation, so data loaders stay
method-agnostic and move 4x fewer bytes. Both expose `embed(images, domains)` for evaluation.
"""
import difflib
import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import kornia
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_metric_learning import losses

from checkpoint import CHECKPOINT_FORMAT, load_torch, read_pth
from cli import UserError, first_line
from utils import PHOTO, SKETCH

# ----------------------------------------------------------------------------------------------
# Backbones

# What `--backbone_type resnet50` / `vgg16` stand for: the ImageNet weights each method's original code
# loaded. ACNet (Nov 2021) ran timm 0.4.12, whose `resnet50` file is resnet50_ram-a26f946b.pth; the
# MSEdge edge-fusion commits load torchvision's models. Any other timm name (with or without a
# pretrained tag, e.g. resnet50.a1_in1k or vit_base_patch16_clip_224.openai) is used as it is.
SEED_BACKBONES = {
    'acnet': {'resnet50': 'resnet50.ram_in1k', 'vgg16': 'vgg16.tv_in1k'},
    'msedge': {'resnet50': 'resnet50.tv_in1k', 'vgg16': 'vgg16.tv_in1k'},
}
SEED_ARCHS = ('resnet50', 'vgg16')  # whatever their tag: the seeds' input normalisation and feature levels
# The feature levels MSEdge fuses: those of the seeds (ResNet50 strides 8/16/32, VGG16 4/8/16), else the
# last three that timm's features_only gives (three late blocks of a ViT).
SEED_LEVELS, LAST_THREE_LEVELS = (2, 3, 4), (-3, -2, -1)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NO_WEIGHTS_HELP = ('pass --weights PATH to load a local ImageNet checkpoint (torchvision or timm format), '
                   'or --no_pretrained to start from random initialisation')


def is_seed_arch(tag):
    return timm.models.split_model_name_tag(tag)[0] in SEED_ARCHS


def default_levels(tag):
    """The feature levels MSEdge fuses by default: the seeds' for ResNet50 and VGG16, else the last three."""
    return SEED_LEVELS if is_seed_arch(tag) else LAST_THREE_LEVELS


def input_normalisation(method, tag):
    """(mean, std) of the images a backbone receives: the seeds' for ResNet50 and VGG16 (ACNet 0.5/0.5, the
    range [-1, 1] of its generator; MSEdge ImageNet's), else what the pretrained weights expect (timm)."""
    if is_seed_arch(tag):
        return ((0.5,) * 3, (0.5,) * 3) if method == 'acnet' else (IMAGENET_MEAN, IMAGENET_STD)
    cfg = timm.models.get_pretrained_cfg(tag)
    return (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)


def backbone_tag(method, backbone_type, option='--backbone_type'):
    """The timm name (with pretrained tag) that `--backbone_type` stands for under `method`; errors name `option`."""
    tag = SEED_BACKBONES[method].get(backbone_type, backbone_type)
    arch, pretrained_tag = timm.models.split_model_name_tag(tag)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f'close matches: {", ".join(close)}' if close else 'see timm.list_models()'
        raise UserError(f'{option} {backbone_type!r}: timm has no model {arch!r} ({hint})')
    if pretrained_tag and tag not in timm.list_pretrained(f'{arch}.*'):
        tags = ', '.join(timm.list_pretrained(f'{arch}.*')[:8]) or 'none'
        raise UserError(f'{option} {backbone_type!r}: timm has no pretrained tag {pretrained_tag!r} '
                        f'for {arch} (it has: {tags})')
    return tag


def _hub_reachable(url, timeout=4.0):
    """True if a TCP connection to the hub opens within `timeout` s (DNS included)."""
    parsed = urlparse(url)
    result = []

    def probe():
        try:
            socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def _cached_on_hub(hf_hub_id):
    from huggingface_hub import try_to_load_from_cache
    return any(isinstance(try_to_load_from_cache(hf_hub_id, name), str)
               for name in ('model.safetensors', 'pytorch_model.bin', 'open_clip_pytorch_model.bin'))


def check_pretrained_available(tag):
    """Fail within seconds, naming the alternatives, when timm could not fetch the weights.

    Without this check timm retries for about 46 s before failing on a machine with no network.
    """
    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UserError(f'timm has no pretrained weights for {tag}: {NO_WEIGHTS_HELP}')
    hub_id = cfg.hf_hub_id or cfg.url
    if cfg.hf_hub_id and _cached_on_hub(hub_id):
        return
    offline = os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
    if offline or not _hub_reachable(endpoint):
        why = 'HF_HUB_OFFLINE is set' if offline else f'{endpoint} cannot be reached'
        raise UserError(f'pretrained {tag} weights ({hub_id}) are not in the Hugging Face cache '
                        f'and {why}: {NO_WEIGHTS_HELP}')


def read_state_dict(path):
    """A state dict from a .pth/.pt/.bin (weights_only) or .safetensors --weights file, unwrapped and
    de-prefixed; a ValueError when it holds something else."""
    state = read_pth(path, '--weights file')
    for key in ('state_dict', 'model', 'module'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f'it holds a {type(state).__name__}, not a state dict')
    return {k.removeprefix('module.'): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _timm_checkpoint_filter(tag, model, state):
    """timm's own conversion of a downloaded file to its layer names (e.g. torchvision VGG's
    classifier.0/3 -> pre_logits.fc1/fc2 as convolutions), when the model's module has one."""
    module = sys.modules[timm.models.model_entrypoint(timm.models.split_model_name_tag(tag)[0]).__module__]
    convert = getattr(module, 'checkpoint_filter_fn', None) or getattr(module, '_filter_fn', None)
    if convert is None:
        return state
    try:
        return convert(state, model)
    except TypeError:
        return convert(state)


def _classifier_prefixes(tag):
    """Layer names of the ImageNet classifier, which a new head replaces."""
    names = timm.models.get_pretrained_cfg(tag).classifier or ()
    return tuple(f'{name}.' for name in ([names] if isinstance(names, str) else names))


def _load_strictly(model, path, tag):
    """Load an ImageNet checkpoint file into a whole timm model, refusing one that lacks any tensor.

    Every tensor but the ImageNet classifier's must be there with its shape. (timm's own
    pretrained_cfg_overlay path loads non-strictly when the classifier is replaced: a wrong file
    would silently leave the backbone random.)
    """
    if Path(path).is_dir():
        raise UserError(f"--weights '{path}' is a folder: name the weights file in it")
    if not Path(path).is_file():
        raise UserError(f"--weights file not found: '{path}'")
    try:
        state = read_state_dict(path)
    except ValueError as error:  # a readable file that holds something else
        raise UserError(f"--weights '{path}' is not a {tag} ImageNet checkpoint: {error}") from error
    try:
        state = _timm_checkpoint_filter(tag, model, state)
    except Exception as error:
        raise UserError(f"--weights '{path}' is not a {tag} ImageNet checkpoint: timm cannot convert it "
                        f"({first_line(error)})") from error
    classifier = _classifier_prefixes(tag)
    loaded, missing, wrong = {}, [], []
    for key, current in model.state_dict().items():
        if key.startswith(classifier) or (key not in state and key.endswith('num_batches_tracked')):
            continue  # a new head keeps timm's initialisation
        if key not in state:
            missing.append(key)
        elif state[key].shape != current.shape:
            wrong.append(f'{key} {tuple(state[key].shape)} instead of {tuple(current.shape)}')
        else:
            loaded[key] = state[key]
    if missing:
        raise UserError(f"--weights '{path}' is not a {tag} ImageNet checkpoint: it lacks {len(missing)} of the "
                        f"{len(loaded) + len(missing) + len(wrong)} backbone tensors, e.g. {missing[0]}")
    if wrong:
        raise UserError(f"--weights '{path}' is not a {tag} ImageNet checkpoint: {len(wrong)} tensors have "
                        f"other shapes, e.g. {wrong[0]}")
    model.load_state_dict(loaded, strict=False)
    return model


def _wrapped_name(key, whole):
    """The name in the whole model of a features_only model's tensor (timm flattens features.28 to
    features_28, and puts a ViT under model.)."""
    for candidate in (key, key.removeprefix('model.'), key.replace('_', '.', 1)):
        if candidate in whole:
            return candidate
    return None


def load_local_weights(model, path, tag, **kwargs):
    """Load an ImageNet checkpoint file into a timm model made with `kwargs`, strictly (see _load_strictly).

    A features_only model is filled from a whole model loaded first, so timm's conversion of the file
    (which needs the whole model) applies as for any other.
    """
    if not kwargs.get('features_only'):
        return _load_strictly(model, path, tag)
    whole_kwargs = {k: v for k, v in kwargs.items() if k not in ('features_only', 'out_indices')}
    whole = _load_strictly(_create(tag, False, **whole_kwargs), path, tag).state_dict()
    state = {}
    for key in model.state_dict():
        source = _wrapped_name(key, whole)
        if source is None:
            raise UserError(f"--weights '{path}': cannot place {key} of {tag}'s feature model")  # timm changed
        state[key] = whole[source]
    model.load_state_dict(state)
    return model


def _create(tag, pretrained, **kwargs):
    """timm.create_model, with options that only some architectures take (the others are left out):
    ViTs accept any input size (dynamic_img_size), so the tests and the quick start can run them at
    32-64 px; with max pooling a ViT keeps its pretrained final norm before pooling (fc_norm=False)
    instead of a new, untrained one after it."""
    optional = dict(dynamic_img_size=True, dynamic_img_pad=True)
    if kwargs.get('global_pool') == 'max':
        optional['fc_norm'] = False
    while True:
        try:
            return timm.create_model(tag, pretrained=pretrained, **optional, **kwargs)
        except TypeError as error:  # raised by the constructor, before any weight is loaded
            refused = [name for name in optional if f"'{name}'" in str(error)]
            if not refused:
                raise
            for name in refused:
                del optional[name]


def create_timm(tag, pretrained=True, weights=None, **kwargs):
    """A timm model with ImageNet weights from the hub (default), a local file, or random init.

    The model is constructed the same way in all three cases, so a new head gets timm's initialisation.
    """
    if weights is not None:
        return load_local_weights(_create(tag, False, **kwargs), weights, tag, **kwargs)
    if not pretrained:
        return _create(tag, False, **kwargs)
    check_pretrained_available(tag)
    try:
        return _create(tag, True, **kwargs)
    except Exception as error:
        raise UserError(f'could not download pretrained {tag} weights ({error}): {NO_WEIGHTS_HELP}') from error


def set_grad_checkpointing(module, tag):
    """timm's gradient checkpointing for a backbone (whole or features_only): less memory, more compute."""
    target = getattr(module, 'model', module)  # a ViT's features_only wrapper holds the model
    if not hasattr(target, 'set_grad_checkpointing'):
        raise UserError(f'--grad_checkpointing: timm offers no gradient checkpointing for {tag}')
    target.set_grad_checkpointing(True)


def _freeze_batchnorm(module):
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ----------------------------------------------------------------------------------------------
# ACNet

def _conv_norm_relu(c_in, c_out, **conv):
    return [nn.Conv2d(c_in, c_out, **conv), nn.InstanceNorm2d(c_out), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Sequential(
            *_conv_norm_relu(channels, channels, kernel_size=3, padding=1, padding_mode='reflect'),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, padding_mode='reflect'),
            nn.InstanceNorm2d(channels))

    def forward(self, x):
        return x + self.conv(x)


class Generator(nn.Module):
    """CycleGAN-style ResNet generator (sketch -> photo-like image in [-1, 1]); sizes divisible by 4."""

    def __init__(self, width=8, num_blocks=8):
        super().__init__()
        w = width
        up = dict(kernel_size=3, stride=2, padding=1, output_padding=1)
        self.in_conv = nn.Sequential(*_conv_norm_relu(3, w, kernel_size=7, padding=3, padding_mode='reflect'))
        self.down_sample = nn.Sequential(*_conv_norm_relu(w, 2 * w, kernel_size=3, stride=2, padding=1),
                                         *_conv_norm_relu(2 * w, 4 * w, kernel_size=3, stride=2, padding=1))
        self.convs = nn.Sequential(*[ResidualBlock(4 * w) for _ in range(num_blocks)])
        self.up_sample = nn.Sequential(nn.ConvTranspose2d(4 * w, 2 * w, **up), nn.InstanceNorm2d(2 * w),
                                       nn.ReLU(inplace=True),
                                       nn.ConvTranspose2d(2 * w, w, **up), nn.InstanceNorm2d(w), nn.ReLU(inplace=True))
        self.out_conv = nn.Sequential(nn.Conv2d(w, 3, kernel_size=7, padding=3, padding_mode='reflect'), nn.Tanh())

    def forward(self, x):
        return self.out_conv(self.up_sample(self.convs(self.down_sample(self.in_conv(x)))))


class Discriminator(nn.Module):
    """PatchGAN discriminator: one real/fake score per image patch."""

    def __init__(self, width=8):
        super().__init__()
        w, k = width, dict(kernel_size=4, padding=1)

        def block(c_in, c_out, stride):
            return nn.Sequential(nn.Conv2d(c_in, c_out, stride=stride, **k), nn.InstanceNorm2d(c_out),
                                 nn.LeakyReLU(0.2, True))
        self.conv1 = nn.Sequential(nn.Conv2d(3, w, stride=2, **k), nn.LeakyReLU(0.2, True))
        self.conv2, self.conv3, self.conv4 = block(w, 2 * w, 2), block(2 * w, 4 * w, 2), block(4 * w, 8 * w, 1)
        self.conv5 = nn.Conv2d(8 * w, 1, stride=1, **k)

    def forward(self, x):
        return self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x)))))


class Extractor(nn.Module):
    """timm model with its classifier replaced by emb_dim outputs after global max pooling, then L2 norm.

    ResNet50: backbone, max pool, new 2048 -> emb_dim linear layer. VGG16 keeps ImageNet's fc6/fc7 (timm's
    pre_logits) before its new 4096 -> emb_dim layer. A ViT max-pools its patch tokens. A model that has
    no max pooling keeps timm's default pooling (`pool`). Backbone BatchNorm stays in eval mode. Inputs
    are in [-1, 1] (the generator's range) and are brought to the backbone's normalisation (`mean`, `std`).
    """

    def __init__(self, tag, emb_dim=512, pretrained=True, weights=None, mean=(0.5,) * 3, std=(0.5,) * 3,
                 normalize=True, freeze_batchnorm=True):
        super().__init__()
        self.normalize, self.freeze_batchnorm = normalize, freeze_batchnorm
        try:
            self.backbone, self.pool = create_timm(tag, pretrained, weights, num_classes=emb_dim, global_pool='max'), 'max'
        except (AssertionError, ValueError, NotImplementedError):  # no max pooling in this architecture
            self.backbone = create_timm(tag, pretrained, weights, num_classes=emb_dim)
            self.pool = getattr(self.backbone, 'global_pool', 'default')
        # [-1, 1] -> (x01 - mean) / std as a*x + b; the seeds' 0.5/0.5 is the identity and is skipped
        std_, mean_ = torch.tensor(std).view(1, 3, 1, 1), torch.tensor(mean).view(1, 3, 1, 1)
        self.rescale = not (torch.allclose(mean_, torch.full_like(mean_, 0.5)) and
                            torch.allclose(std_, torch.full_like(std_, 0.5)))
        self.register_buffer('scale', 0.5 / std_, persistent=False)
        self.register_buffer('shift', (0.5 - mean_) / std_, persistent=False)

    def forward(self, x):
        if self.rescale:
            x = x * self.scale + self.shift
        x = self.backbone(x)
        return F.normalize(x, dim=-1) if self.normalize else x

    def train(self, mode=True):
        super().train(mode)
        if self.freeze_batchnorm:
            _freeze_batchnorm(self.backbone)
        return self


CLASS_LOSSES = ('normsoftmax', 'ce', 'triplet')


class CrossEntropyHead(nn.Module):
    """ACNet 04de2e0's class loss: a linear layer emb_dim -> classes on the extractor's unnormalised output,
    with cross-entropy (the embeddings are L2-normalised only for evaluation)."""

    def __init__(self, num_classes, emb_dim):
        super().__init__()
        self.fc = nn.Linear(emb_dim, num_classes)

    def forward(self, embeddings, labels):
        return F.cross_entropy(self.fc(embeddings), labels)


class ACNet(nn.Module):
    """Generator, discriminator, extractor and the class-loss proxies, saved and loaded as one.

    The ablations of the original history (docs/training.md): `class_loss` 'ce' replaces NormalizedSoftmax by
    a cross-entropy head (04de2e0); `extractor_only` drops the generator and discriminator and trains the
    extractor alone on single sketches and photos (ablation/norm.py with 'normsoftmax', ablation/triplet.py
    with 'triplet'), its BatchNorm training as there.
    """
    method = 'acnet'

    def __init__(self, num_classes, backbone_type='resnet50', emb_dim=512, pretrained=True, weights=None,
                 class_loss='normsoftmax', extractor_only=False):
        super().__init__()
        if class_loss not in CLASS_LOSSES:
            raise UserError(f'--class_loss must be one of {", ".join(CLASS_LOSSES)}, got {class_loss!r}')
        self.backbone_tag = backbone_tag('acnet', backbone_type)
        self.class_loss_name, self.extractor_only = class_loss, extractor_only
        if not extractor_only:
            self.generator = Generator()
            self.discriminator = Discriminator()
        mean, std = input_normalisation('acnet', self.backbone_tag)
        self.extractor = Extractor(self.backbone_tag, emb_dim, pretrained, weights, mean, std,
                                   normalize=class_loss != 'ce', freeze_batchnorm=not extractor_only)
        self.class_loss = {'normsoftmax': lambda: losses.NormalizedSoftmaxLoss(num_classes, emb_dim),
                           'ce': lambda: CrossEntropyHead(num_classes, emb_dim),
                           'triplet': losses.TripletMarginLoss}[class_loss]()

    @staticmethod
    def to_input(images):
        """uint8 images to [-1, 1], the range of the generator's tanh."""
        return images.float() / 127.5 - 1

    def generate(self, images):
        """The generator's photo-like image of each uint8 image, as uint8 (what the original vis.py saved)."""
        if self.extractor_only:
            raise UserError('this ACNet was trained without a generator (--extractor_only): it generates no images')
        return ((self.generator(self.to_input(images)) + 1) * 127.5).clamp(0, 255).byte()

    def embed(self, images, domains):
        """Photos as E(photo), sketches as E(G(sketch)) (as E(sketch) without a generator), L2-normalised."""
        x = self.to_input(images)
        sketches = domains == SKETCH
        if sketches.any() and not self.extractor_only:
            x[sketches] = self.generator(x[sketches]).to(x.dtype)
        embeddings = self.extractor(x)
        return embeddings if self.extractor.normalize else F.normalize(embeddings, dim=-1)

    def set_warmup(self, warming_up):
        """During warm-up every parameter of the extractor's timm model is frozen except its new
        classifier's weight and bias (the original: all but the last two of backbone.parameters())."""
        self.extractor.backbone.requires_grad_(not warming_up)
        self.extractor.backbone.get_classifier().requires_grad_(True)

    def set_grad_checkpointing(self):
        set_grad_checkpointing(self.extractor.backbone, self.backbone_tag)

    def make_optimizers(self, lr=1e-5, fused=None):
        # NormalizedSoftmax's proxies at 1e-3; the CE head sat in the original's extractor, at its rate, and so
        # did the extractor-only baselines' proxies (ablation/norm.py: Adam(..., lr=1e-4) for both)
        head_lr = 1e-3 if self.class_loss_name == 'normsoftmax' and not self.extractor_only else lr
        groups = [dict(params=self.extractor.parameters(), lr=lr)]
        if list(self.class_loss.parameters()):
            groups.append(dict(params=self.class_loss.parameters(), lr=head_lr))
        optimizers = {'extractor': torch.optim.Adam(groups, fused=fused)}
        if not self.extractor_only:
            optimizers['generator'] = torch.optim.Adam(self.generator.parameters(), lr=1e-3, betas=(0.5, 0.999),
                                                       fused=fused)
            optimizers['discriminator'] = torch.optim.Adam(self.discriminator.parameters(), lr=1e-4,
                                                           betas=(0.5, 0.999), fused=fused)
        return optimizers


# ----------------------------------------------------------------------------------------------
# MSEdge

EDGE_MODES = ('both', 'photo', 'none')


def sobel_edges(images):
    """Edge map of [0, 1] RGB images: Sobel magnitude, min-max scaled per image, inverted (dark lines on white)."""
    magnitude = kornia.filters.sobel(images, normalized=False)
    low = magnitude.amin(dim=(1, 2, 3), keepdim=True)
    high = magnitude.amax(dim=(1, 2, 3), keepdim=True)
    return 1 - (magnitude - low) / (high - low).clamp_min(1e-6)


def edge_mask(domains, edge_mode):
    """Which images of a batch are replaced by their edge maps."""
    if edge_mode == 'both':
        return torch.ones_like(domains, dtype=torch.bool)
    if edge_mode == 'photo':
        return domains == PHOTO
    return torch.zeros_like(domains, dtype=torch.bool)


class SqueezeExcite(nn.Module):
    """Channel gate: average pool, bias-free C -> C/16 -> C bottleneck, sigmoid."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.gate = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, channels, bias=False), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x.mean(dim=(2, 3)))[:, :, None, None]


class AttentionBlock(nn.Module):
    """Gate a lower-level feature l with the top-level feature g: returns (a * l, a), a: (B, 1, H_l, W_l).

    l and g are projected to l's channel count by bias-free 1x1 convolutions, as in the original.
    """

    def __init__(self, local_channels, global_channels):
        super().__init__()
        self.se = SqueezeExcite(local_channels)
        self.project_local = nn.Conv2d(local_channels, local_channels, 1, bias=False)
        self.project_global = nn.Conv2d(global_channels, local_channels, 1, bias=False)
        self.score = nn.Conv2d(local_channels, 1, 1)

    def forward(self, local, top):
        local = self.se(local)
        top = F.interpolate(self.project_global(top), size=local.shape[-2:], mode='bilinear', align_corners=False)
        attention = torch.sigmoid(self.score(F.relu(self.project_local(local) + top)))
        return attention * local, attention


class EdgeFusionHead(nn.Module):
    """Pool [top, attended level 1, attended level 2], concatenate, project to proj_dim, L2 norm."""

    def __init__(self, channels, proj_dim=512):
        super().__init__()
        c3, c4, c5 = channels
        self.attend3, self.attend4 = AttentionBlock(c3, c5), AttentionBlock(c4, c5)
        self.proj = nn.Linear(c3 + c4 + c5, proj_dim)

    def forward(self, features):
        f3, f4, f5 = features
        g3, a3 = self.attend3(f3, f5)
        g4, a4 = self.attend4(f4, f5)
        # fp32 under --amp: compiled bf16 broke torch.amax's tie-counting backward (NaN; docs/speed.md). The
        # original's adaptive_max_pool2d has the same values; its backward moves README's numbers in the 3rd decimal.
        pooled = torch.cat([torch.amax(f.float(), dim=(2, 3)) for f in (f5, g3, g4)], dim=1)
        return F.normalize(self.proj(pooled), dim=-1), (a3, a4)


class MSEdge(nn.Module):
    """Edge maps, a features_only backbone, the edge-fusion head and the ProxyAnchor proxies."""
    method = 'msedge'

    def __init__(self, num_classes, backbone_type='resnet50', emb_dim=512, edge_mode='both',
                 pretrained=True, weights=None, feature_levels=None):
        super().__init__()
        if edge_mode not in EDGE_MODES:
            raise UserError(f'--edge_mode must be one of {EDGE_MODES}, got {edge_mode!r}')
        self.edge_mode = edge_mode
        self.backbone_tag = backbone_tag('msedge', backbone_type)
        levels = tuple(feature_levels) if feature_levels else default_levels(self.backbone_tag)
        if len(levels) != 3 or len(set(levels)) != 3:
            raise UserError(f'--feature_levels must name three different levels, got {" ".join(map(str, levels))}')
        try:
            self.backbone = create_timm(self.backbone_tag, pretrained, weights, features_only=True, out_indices=levels)
        except (RuntimeError, AssertionError, ValueError, NotImplementedError) as error:
            raise UserError(f'--backbone_type {backbone_type}: timm cannot give the three feature maps MSEdge '
                            f'fuses ({str(error).strip()[:200]})') from error
        self.head = EdgeFusionHead(self.backbone.feature_info.channels(), emb_dim)
        self.proxy_loss = losses.ProxyAnchorLoss(num_classes, emb_dim)
        mean, std = input_normalisation('msedge', self.backbone_tag)
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def to_input(self, images, domains):
        """uint8 images to edge maps (where edge_mode says), normalised as the backbone expects."""
        with torch.autocast(images.device.type, enabled=False):  # edge maps in fp32 under --amp, as the original
            x = images.float() / 255
            if self.edge_mode != 'none':  # a select, not a data-dependent branch: no host sync, compiles whole
                x = torch.where(edge_mask(domains, self.edge_mode).view(-1, 1, 1, 1), sobel_edges(x), x)
            return (x - self.mean) / self.std

    def forward(self, images, domains):
        """Embeddings (B, emb_dim) and the two attention maps."""
        return self.head(self.backbone(self.to_input(images, domains)))

    def embed(self, images, domains):
        return self(images, domains)[0]

    def explain(self, images, domains):
        """Embeddings; what the backbone sees of each image before normalisation (its edge map where
        edge_mode says, else the image), as uint8; and the two attention maps (B, h, w)."""
        embeddings, (a3, a4) = self(images, domains)
        x = images.float() / 255
        seen = torch.where(edge_mask(domains, self.edge_mode).view(-1, 1, 1, 1), sobel_edges(x), x)
        return embeddings, (seen * 255).byte(), a3[:, 0], a4[:, 0]

    def set_warmup(self, warming_up):
        """During warm-up the backbone's parameters are frozen; as in the original, its BatchNorm
        layers stay in training mode and keep updating their running statistics."""
        self.backbone.requires_grad_(not warming_up)

    def set_grad_checkpointing(self):
        set_grad_checkpointing(self.backbone, self.backbone_tag)

    def make_optimizers(self, lr=1e-5, fused=None):
        groups = [dict(params=list(self.backbone.parameters()) + list(self.head.parameters()), lr=lr),
                  dict(params=self.proxy_loss.parameters(), lr=1e-1)]
        return {'model': torch.optim.AdamW(groups, weight_decay=5e-4, fused=fused)}


METHODS = {'acnet': ACNet, 'msedge': MSEdge}


def compile_model(model):
    """torch.compile the networks in place (state_dict keys stay the same, so checkpoints do too).

    Inductor keeps bf16 roundings where eager makes them (a process-wide setting), so compiled bf16 steps
    give eager's numbers. Without it, a fused kernel compared an unrounded product with its stored bf16
    maximum: a tie-counting max backward (torch.amax) divided by 0 (pytorch/pytorch#195214).
    """
    import torch._inductor.config
    torch._inductor.config.emulate_precision_casts = True
    names = ('generator', 'discriminator', 'extractor') if model.method == 'acnet' else ()
    parts = [getattr(model, name) for name in names if hasattr(model, name)] or [model]
    for part in parts:
        part.compile()
    return model


# The options that shape each method's networks (train.py's names; older checkpoints lack some: defaults)
VARIANT_OPTIONS = {'acnet': {'class_loss': 'normsoftmax', 'extractor_only': False},
                   'msedge': {'edge_mode': 'both', 'feature_levels': None}}


def variant_of(method, args):
    """The network-shaping options of a method, from train.py's arguments (a dict or a Namespace)."""
    args = args if isinstance(args, dict) else vars(args)
    return {name: args.get(name, default) for name, default in VARIANT_OPTIONS[method].items()}


def build_model(method, num_classes, backbone_type='resnet50', emb_dim=512, pretrained=True, weights=None,
                **variant):
    """A method's networks; `variant`: its options in VARIANT_OPTIONS (class_loss, edge_mode, ...)."""
    return METHODS[method](num_classes, backbone_type, emb_dim, pretrained=pretrained, weights=weights, **variant)


class TrainingFree(nn.Module):
    """A method's backbone with no training at all, for a training-free baseline (docs/training.md): its
    pretrained features, pooled as the method pools them, L2-normalised.

    ACNet: the extractor's timm model up to its pooling (VGG16 through fc6/fc7), inputs normalised as ACNet
    normalises them, sketches as they are (an untrained generator would only add noise). MSEdge: the top
    feature map of its backbone, max-pooled, with edge maps where `edge_mode` says. No new layer is made,
    so nothing random enters but what the weights (or --no_pretrained) bring.
    """

    def __init__(self, method, backbone_type='resnet50', pretrained=True, weights=None, edge_mode='both'):
        super().__init__()
        self.method = method
        variant = {'extractor_only': True} if method == 'acnet' else {'edge_mode': edge_mode}
        self.net = build_model(method, 1, backbone_type, 8, pretrained, weights, **variant)
        self.backbone_tag = self.net.backbone_tag

    def embed(self, images, domains):
        if self.method == 'acnet':
            extractor = self.net.extractor
            x = self.net.to_input(images)
            x = x * extractor.scale + extractor.shift if extractor.rescale else x
            features = extractor.backbone.forward_head(extractor.backbone.forward_features(x), pre_logits=True)
        else:
            features = self.net.backbone(self.net.to_input(images, domains))[-1].amax(dim=(2, 3))
        return F.normalize(features.flatten(1).float(), dim=-1)


def model_from_checkpoint(checkpoint, device='cpu'):
    """Rebuild a trained model from a loaded checkpoint (no weight download), in eval mode.

    A checkpoint may declare with 'parts' that it holds only some networks (a converted release holds
    the generator and extractor): those must be complete, the others keep their initialisation.
    """
    args = checkpoint['args']
    model = build_model(checkpoint['method'], max(1, len(checkpoint['train_classes'])), args['backbone_type'],
                        args['emb_dim'], pretrained=False, **variant_of(checkpoint['method'], args))
    parts = checkpoint.get('parts')
    result = model.load_state_dict(checkpoint['model'], strict=parts is None)
    missing = [k for k in result.missing_keys if k.split('.')[0] in parts] if parts else []
    if missing or result.unexpected_keys:
        raise RuntimeError(f'{len(missing)} missing and {len(result.unexpected_keys)} unexpected tensors, '
                           f'e.g. {(missing + result.unexpected_keys)[0]}')
    return model.to(device).eval()


def load_trained(path, device='cpu'):
    """(model in eval mode, checkpoint) of a checkpoint written by train.py or convert.py: what every command
    that uses a trained model loads it with."""
    checkpoint = load_torch(path, CHECKPOINT_FORMAT, 'checkpoint')
    try:
        return model_from_checkpoint(checkpoint, device), checkpoint
    except RuntimeError as error:
        raise UserError(f"'{path}' does not hold a {checkpoint['method']} model matching its own arguments: "
                        f"{first_line(error)}") from error


# ----------------------------------------------------------------------------------------------
# The ACNet authors' released checkpoints

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


def acnet_from_released(extractor_state, generator_state, backbone_type, emb_dim, paths=('extractor', 'generator')):
    """An ACNet holding the original train.py's saved Extractor and Generator state dicts.

    Raises UserError naming the file when a state dict does not fit the asked backbone and size.
    """
    model = ACNet(1, backbone_type, emb_dim, pretrained=False)
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
