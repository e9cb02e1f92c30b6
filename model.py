"""The networks of the methods, built as the original code builds them (docs/fidelity.md). Each method's file in
methods/ puts them together, with its options, training step and embedding.

ACNet  : Generator (sketch -> photo-like image in [-1, 1]), PatchGAN Discriminator, Extractor (the original's
         timm.create_model(name, num_classes=emb_dim, global_pool='max') with L2 norm), CrossEntropyHead (04de2e0).
         Module names match the original's, so its released state dicts load as they are (convert.py).
MSEdge : sobel_edges (the edge maps it feeds), and the multi-scale EdgeFusionHead over three feature levels of a
         features_only backbone (AttentionBlock, SqueezeExcite).
ClipPrompt: prompted_vit, a CLIP image tower (open_clip's VisionTransformer) with learned prompt tokens.
"""
import kornia
import torch
import torch.nn as nn
import torch.nn.functional as F

from zs_sbir.backbones import create_timm, freeze_batchnorm

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
            freeze_batchnorm(self.backbone)
        return self


class CrossEntropyHead(nn.Module):
    """ACNet 04de2e0's class loss: a linear layer emb_dim -> classes on the extractor's unnormalised output,
    with cross-entropy (the embeddings are L2-normalised only for evaluation)."""

    def __init__(self, num_classes, emb_dim):
        super().__init__()
        self.fc = nn.Linear(emb_dim, num_classes)

    def forward(self, embeddings, labels):
        return F.cross_entropy(self.fc(embeddings), labels)


# ----------------------------------------------------------------------------------------------
# MSEdge

def sobel_edges(images):
    """Edge map of [0, 1] RGB images: Sobel magnitude, min-max scaled per image, inverted (dark lines on white)."""
    magnitude = kornia.filters.sobel(images, normalized=False)
    low = magnitude.amin(dim=(1, 2, 3), keepdim=True)
    high = magnitude.amax(dim=(1, 2, 3), keepdim=True)
    return 1 - (magnitude - low) / (high - low).clamp_min(1e-6)


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


# ----------------------------------------------------------------------------------------------
# ClipPrompt

def prompted_vit(visual, images, prompt, append=False):
    """An open_clip ViT image tower's embedding of normalised images with learned prompt tokens (B, K, width), as
    ClipPrompt's PromptVisionTransformer: the patch and class tokens with their positional embeddings, the prompts
    prepended (no positional embedding of their own), ln_pre, the transformer, ln_post of token 0, the projection.
    Token 0 is the first prompt; with `append` (Sketch_LVM) the prompts follow and token 0 is the class token."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, grid ** 2, width)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # shape, not len(): ONNX keeps the batch dynamic
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    prompt = prompt.to(x.dtype)
    x = visual.transformer(visual.ln_pre(torch.cat([x, prompt] if append else [prompt, x], dim=1)))
    return visual.ln_post(x[:, 0]) @ visual.proj
