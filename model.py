"""The networks of both methods.

ACNet  : a generator turns sketches into photo-like images; one extractor (ResNet50/VGG16 backbone,
         global max pooling, linear layer, L2 norm) embeds sketches, photos and generated images;
         a PatchGAN discriminator and NormalizedSoftmax proxies supply the losses.
MSEdge : Sobel edge maps of the inputs go through a features_only backbone; a multi-scale
         edge-fusion head attends the two lower stages with the top one and embeds their pooled
         concatenation; ProxyAnchor proxies supply the loss.

Both models take uint8 images (B, 3, H, W) and do their own normalisation, so data loaders stay
method-agnostic and move 4x fewer bytes. Both expose `embed(images, domains)` for evaluation.
"""
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import kornia
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_metric_learning import losses

from utils import PHOTO, SKETCH, UserError

# ----------------------------------------------------------------------------------------------
# Backbones

# The last three feature stages of each backbone (strides 8/16/32 for ResNet50, 4/8/16 for VGG16).
STAGES = {'resnet50': (2, 3, 4), 'vgg16': (2, 3, 4)}
NO_WEIGHTS_HELP = ('pass --weights PATH to load a local ImageNet checkpoint (torchvision or timm format), '
                   'or --no_pretrained to start from random initialisation')


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
               for name in ('model.safetensors', 'pytorch_model.bin'))


def check_pretrained_available(backbone_type):
    """Fail within seconds, naming the alternatives, when timm could not fetch the weights.

    Without this check timm retries for about 46 s before failing on a machine with no network.
    """
    hub_id = timm.models.get_pretrained_cfg(backbone_type).hf_hub_id
    if _cached_on_hub(hub_id):
        return
    offline = os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')
    endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
    if offline or not _hub_reachable(endpoint):
        why = 'HF_HUB_OFFLINE is set' if offline else f'{endpoint} cannot be reached'
        raise UserError(f'pretrained {backbone_type} weights ({hub_id}) are not in the Hugging Face cache '
                        f'and {why}: {NO_WEIGHTS_HELP}')


def _read_state_dict(path):
    """A state dict from a .pth/.pt/.bin (weights_only) or .safetensors file, unwrapped and de-prefixed."""
    if str(path).endswith('.safetensors'):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('state_dict', 'model', 'module'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix('module.'): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _load_local_weights(backbone_type, out_indices, path):
    """Load a torchvision- or timm-format ImageNet checkpoint, refusing one that lacks a backbone tensor.

    (timm's own pretrained_cfg_overlay path loads non-strictly for features_only models: a wrong file
    would silently leave the backbone random.)
    """
    if not Path(path).is_file():
        raise UserError(f"--weights file not found: '{path}'")
    features = timm.create_model(backbone_type, pretrained=False, features_only=True, out_indices=out_indices)
    try:
        state = _read_state_dict(path)
        loaded, missing = {}, []
        for key, current in features.state_dict().items():
            source = key if key in state else key.replace('_', '.', 1)  # timm flattens features.28 -> features_28
            if source in state:
                loaded[key] = state[source]
            elif key.endswith('num_batches_tracked'):
                loaded[key] = current
            else:
                missing.append(key)
        if not missing:
            features.load_state_dict(loaded)
    except Exception as error:  # unreadable file or mismatched shapes
        raise UserError(f"--weights '{path}' is not a {backbone_type} ImageNet checkpoint: "
                        f"{str(error).strip().splitlines()[0][:300]}") from error
    if missing:
        raise UserError(f"--weights '{path}' is not a {backbone_type} ImageNet checkpoint: it lacks "
                        f"{len(missing)} of the {len(loaded) + len(missing)} backbone tensors, e.g. {missing[0]}")
    return features


def create_backbone(backbone_type, out_indices, pretrained=True, weights=None):
    """A timm features_only backbone: ImageNet weights from the hub (default), a local file, or random."""
    kwargs = dict(features_only=True, out_indices=out_indices)
    if weights is not None:
        return _load_local_weights(backbone_type, out_indices, weights)
    if not pretrained:
        return timm.create_model(backbone_type, pretrained=False, **kwargs)
    check_pretrained_available(backbone_type)
    try:
        return timm.create_model(backbone_type, pretrained=True, **kwargs)
    except Exception as error:
        raise UserError(f'could not download pretrained {backbone_type} weights ({error}): '
                        f'{NO_WEIGHTS_HELP}') from error


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
        self.body = nn.Sequential(
            *_conv_norm_relu(channels, channels, kernel_size=3, padding=1, padding_mode='reflect'),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, padding_mode='reflect'),
            nn.InstanceNorm2d(channels))

    def forward(self, x):
        return x + self.body(x)


class Generator(nn.Sequential):
    """CycleGAN-style ResNet generator (sketch -> photo-like image in [-1, 1]); sizes divisible by 4."""

    def __init__(self, width=8, num_blocks=8):
        w = width
        up = dict(kernel_size=3, stride=2, padding=1, output_padding=1)
        super().__init__(
            *_conv_norm_relu(3, w, kernel_size=7, padding=3, padding_mode='reflect'),
            *_conv_norm_relu(w, 2 * w, kernel_size=3, stride=2, padding=1),
            *_conv_norm_relu(2 * w, 4 * w, kernel_size=3, stride=2, padding=1),
            *[ResidualBlock(4 * w) for _ in range(num_blocks)],
            nn.ConvTranspose2d(4 * w, 2 * w, **up), nn.InstanceNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * w, w, **up), nn.InstanceNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 3, kernel_size=7, padding=3, padding_mode='reflect'),
            nn.Tanh())


class Discriminator(nn.Sequential):
    """PatchGAN discriminator: one real/fake score per image patch."""

    def __init__(self, width=8):
        w, k = width, dict(kernel_size=4, padding=1)

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, stride=stride, **k), nn.InstanceNorm2d(c_out), nn.LeakyReLU(0.2, True)]
        super().__init__(
            nn.Conv2d(3, w, stride=2, **k), nn.LeakyReLU(0.2, True),
            *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2), *block(4 * w, 8 * w, 1),
            nn.Conv2d(8 * w, 1, stride=1, **k))


class Extractor(nn.Module):
    """Backbone, global max pooling, linear layer to emb_dim, L2 norm. Backbone BatchNorm stays in eval."""

    def __init__(self, backbone_type='resnet50', emb_dim=512, pretrained=True, weights=None):
        super().__init__()
        self.backbone = create_backbone(backbone_type, STAGES[backbone_type][-1:], pretrained, weights)
        self.fc = nn.Linear(self.backbone.feature_info.channels()[-1], emb_dim)

    def forward(self, x):
        feature = self.backbone(x)[-1]
        return F.normalize(self.fc(torch.amax(feature, dim=(2, 3))), dim=-1)

    def train(self, mode=True):
        super().train(mode)
        _freeze_batchnorm(self.backbone)
        return self


class ACNet(nn.Module):
    """Generator, discriminator, extractor and the class-loss proxies, saved and loaded as one."""
    method = 'acnet'

    def __init__(self, num_classes, backbone_type='resnet50', emb_dim=512, pretrained=True, weights=None):
        super().__init__()
        self.generator = Generator()
        self.discriminator = Discriminator()
        self.extractor = Extractor(backbone_type, emb_dim, pretrained, weights)
        self.class_loss = losses.NormalizedSoftmaxLoss(num_classes, emb_dim)

    @staticmethod
    def to_input(images):
        """uint8 images to [-1, 1], the range of the generator's tanh."""
        return images.float() / 127.5 - 1

    def embed(self, images, domains):
        """Photos as E(photo), sketches as E(G(sketch))."""
        x = self.to_input(images)
        sketches = domains == SKETCH
        if sketches.any():
            x[sketches] = self.generator(x[sketches]).to(x.dtype)
        return self.extractor(x)

    def set_warmup(self, warming_up):
        """During warm-up the extractor's backbone is frozen: of the extractor, only its final linear layer trains."""
        self.extractor.backbone.requires_grad_(not warming_up)

    def make_optimizers(self, lr=1e-5, fused=None):
        return {
            'extractor': torch.optim.Adam([dict(params=self.extractor.parameters(), lr=lr),
                                           dict(params=self.class_loss.parameters(), lr=1e-3)], fused=fused),
            'generator': torch.optim.Adam(self.generator.parameters(), lr=1e-3, betas=(0.5, 0.999), fused=fused),
            'discriminator': torch.optim.Adam(self.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.999),
                                              fused=fused),
        }


# ----------------------------------------------------------------------------------------------
# MSEdge

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
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
    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, channels, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)


class AttentionBlock(nn.Module):
    """Gate a lower-stage feature l with the top-stage feature g: returns (a * l, a), a: (B, 1, H_l, W_l)."""

    def __init__(self, local_channels, global_channels):
        super().__init__()
        width = local_channels // 2
        self.se = SqueezeExcite(local_channels)
        self.project_local = nn.Conv2d(local_channels, width, 1)
        self.project_global = nn.Conv2d(global_channels, width, 1)
        self.score = nn.Conv2d(width, 1, 1)

    def forward(self, local, top):
        local = self.se(local)
        top = F.interpolate(self.project_global(top), size=local.shape[-2:], mode='bilinear', align_corners=False)
        attention = torch.sigmoid(self.score(F.relu(self.project_local(local) + top)))
        return attention * local, attention


class EdgeFusionHead(nn.Module):
    """Pool [top, attended stage 3, attended stage 4], concatenate, project to proj_dim, L2 norm."""

    def __init__(self, channels, proj_dim=512):
        super().__init__()
        c3, c4, c5 = channels
        self.attend3, self.attend4 = AttentionBlock(c3, c5), AttentionBlock(c4, c5)
        self.proj = nn.Linear(c3 + c4 + c5, proj_dim)

    def forward(self, features):
        f3, f4, f5 = features
        g3, a3 = self.attend3(f3, f5)
        g4, a4 = self.attend4(f4, f5)
        pooled = torch.cat([torch.amax(f, dim=(2, 3)) for f in (f5, g3, g4)], dim=1)
        return F.normalize(self.proj(pooled), dim=-1), (a3, a4)


class MSEdge(nn.Module):
    """Edge maps, a features_only backbone, the edge-fusion head and the ProxyAnchor proxies."""
    method = 'msedge'

    def __init__(self, num_classes, backbone_type='resnet50', emb_dim=512, edge_mode='both',
                 pretrained=True, weights=None):
        super().__init__()
        if edge_mode not in EDGE_MODES:
            raise UserError(f'--edge_mode must be one of {EDGE_MODES}, got {edge_mode!r}')
        self.edge_mode = edge_mode
        self.backbone = create_backbone(backbone_type, STAGES[backbone_type], pretrained, weights)
        self.head = EdgeFusionHead(self.backbone.feature_info.channels(), emb_dim)
        self.proxy_loss = losses.ProxyAnchorLoss(num_classes, emb_dim)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.warming_up = False

    def to_input(self, images, domains):
        """uint8 images to edge maps (where edge_mode says) and ImageNet normalisation."""
        x = images.float() / 255
        if self.edge_mode != 'none':  # a select, not a data-dependent branch: no host sync, compiles whole
            x = torch.where(edge_mask(domains, self.edge_mode).view(-1, 1, 1, 1), sobel_edges(x), x)
        return (x - self.mean) / self.std

    def forward(self, images, domains):
        """Embeddings (B, emb_dim) and the two attention maps."""
        return self.head(self.backbone(self.to_input(images, domains)))

    def embed(self, images, domains):
        return self(images, domains)[0]

    def set_warmup(self, warming_up):
        """During warm-up the backbone is frozen, BatchNorm statistics included."""
        self.warming_up = warming_up
        self.backbone.requires_grad_(not warming_up)
        self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if self.warming_up:
            self.backbone.eval()
        return self

    def make_optimizers(self, lr=1e-5, fused=None):
        groups = [dict(params=list(self.backbone.parameters()) + list(self.head.parameters()), lr=lr),
                  dict(params=self.proxy_loss.parameters(), lr=1e-1)]
        return {'model': torch.optim.AdamW(groups, weight_decay=5e-4, fused=fused)}


METHODS = {'acnet': ACNet, 'msedge': MSEdge}


def compile_model(model):
    """torch.compile the networks in place (state_dict keys stay the same, so checkpoints do too)."""
    parts = (model.generator, model.discriminator, model.extractor) if model.method == 'acnet' else (model,)
    for part in parts:
        part.compile()
    return model


def build_model(method, num_classes, backbone_type='resnet50', emb_dim=512, edge_mode='both',
                pretrained=True, weights=None):
    if method == 'acnet':
        return ACNet(num_classes, backbone_type, emb_dim, pretrained, weights)
    return MSEdge(num_classes, backbone_type, emb_dim, edge_mode, pretrained, weights)


def model_from_checkpoint(checkpoint, device='cpu'):
    """Rebuild a trained model from a loaded checkpoint (no weight download), in eval mode."""
    args = checkpoint['args']
    model = build_model(checkpoint['method'], len(checkpoint['train_classes']), args['backbone_type'],
                        args['emb_dim'], args.get('edge_mode', 'both'), pretrained=False)
    model.load_state_dict(checkpoint['model'])
    return model.to(device).eval()
