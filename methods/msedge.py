"""MSEdge (SPL): Sobel edge maps of the inputs go through a features_only backbone; a multi-scale edge-fusion head
attends the two lower feature levels with the top one and embeds their pooled concatenation; ProxyAnchor proxies
supply the loss. Everything that is MSEdge's own: its options, networks, training step, embedding and pictures
(edge maps and attention maps). Where its pieces come from: docs/fidelity.md.

    python train.py --method msedge --data_name sketchy
    python train.py --method msedge --data_name sketchy --edge_mode photo --feature_levels 1 2 4
"""
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses

from methods.registry import Method, create_model, register_method
from model import EdgeFusionHead, sobel_edges
from utils import PHOTO
from zs_sbir.backbones import IMAGENET_MEAN, IMAGENET_STD, backbone_tag, create_timm, input_normalisation, \
    is_seed_arch, set_grad_checkpointing
from zs_sbir.cli import UserError

EDGE_MODES = ('both', 'photo', 'none')
# `resnet50` / `vgg16`: the torchvision ImageNet weights the edge-fusion commits loaded, normalised as ImageNet's.
SEED_BACKBONES = {'resnet50': 'resnet50.tv_in1k', 'vgg16': 'vgg16.tv_in1k'}
SEED_NORMALISATION = (IMAGENET_MEAN, IMAGENET_STD)
# The feature levels it fuses: the seeds' for ResNet50 (strides 8/16/32) and VGG16 (4/8/16), else the last three
# that timm's features_only gives (three late blocks of a ViT).
SEED_LEVELS, LAST_THREE_LEVELS = (2, 3, 4), (-3, -2, -1)


def default_levels(tag):
    return SEED_LEVELS if is_seed_arch(tag) else LAST_THREE_LEVELS


def edge_mask(domains, edge_mode):
    """Which images of a batch are replaced by their edge maps."""
    if edge_mode == 'both':
        return torch.ones_like(domains, dtype=torch.bool)
    if edge_mode == 'photo':
        return domains == PHOTO
    return torch.zeros_like(domains, dtype=torch.bool)


@register_method
class MSEdge(Method):
    """Edge maps, a features_only backbone, the edge-fusion head and the ProxyAnchor proxies."""
    name = 'msedge'
    interpolation = 'bicubic'  # the original's PIL Resize
    draws = ('edge map', 'attention 3', 'attention 4')  # its pictures (plot.py attention)
    warms_up = True
    defaults = dict(Method.defaults, warmup=2)
    min_batch_size = 2  # its BatchNorm trains: a batch of one image has no statistics
    ablations = (dict(argv=['--feature_levels', '1', '2', '4'], source='EGFF 75d71f0', backbones='resnet50'),)
    paper_grid = dict(backbones=('resnet50', 'vgg16'), emb_dims=(64, 512, 4096))  # the seeds' table
    file_suffix_pattern = r'(?:_edge-[a-z]+|_levels-[\d-]+)*'
    training_free_options = ('edge_mode',)

    def __init__(self, classes, backbone_type, emb_dim, edge_mode, feature_levels, pretrained=True, weights=None):
        super().__init__()
        if edge_mode not in EDGE_MODES:
            raise UserError(f'--edge_mode must be one of {EDGE_MODES}, got {edge_mode!r}')
        self.edge_mode = edge_mode
        self.backbone_tag = backbone_tag(SEED_BACKBONES, backbone_type)
        levels = tuple(feature_levels) if feature_levels else default_levels(self.backbone_tag)
        if len(levels) != 3 or len(set(levels)) != 3:
            raise UserError(f'--feature_levels must name three different levels, got {" ".join(map(str, levels))}')
        try:
            self.backbone = create_timm(self.backbone_tag, pretrained, weights, features_only=True, out_indices=levels)
        except IndexError as error:
            count = len(create_timm(self.backbone_tag, False, features_only=True).feature_info)
            raise UserError(f'--feature_levels {" ".join(map(str, levels))}: {backbone_type} has {count} feature levels '
                            f'(0 to {count - 1}, or -{count} to -1)') from error
        except (RuntimeError, AssertionError, ValueError, NotImplementedError) as error:
            raise UserError(f'--backbone_type {backbone_type}: timm cannot give the three feature maps MSEdge '
                            f'fuses ({str(error).strip()[:200]})') from error
        self.head = EdgeFusionHead(self.backbone.feature_info.channels(), emb_dim)
        self.proxy_loss = losses.ProxyAnchorLoss(len(classes), emb_dim)
        mean, std = input_normalisation(self.backbone_tag, SEED_NORMALISATION)
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------------------------------ options
    @classmethod
    def add_options(cls, parser):
        group = parser.add_argument_group('msedge options')
        group.add_argument('--edge_mode', default='both', choices=EDGE_MODES,
                           help='which domains are fed as edge maps')
        group.add_argument('--feature_levels', type=int, nargs=3, default=None, metavar='LEVEL',
                           help="the backbone's feature levels to fuse (timm features_only indices; default: the "
                                "seeds' 2 3 4 for ResNet50 and VGG16, else the last three; 1 2 4 is EGFF 75d71f0)")

    @classmethod
    def check(cls, options):
        """--feature_levels must be levels the backbone has (told before any work, not at the model's build)."""
        levels = options.feature_levels
        if not levels or not cls.takes_backbone(options.backbone_type):
            return []
        if len(set(levels)) != 3:
            return [f'--feature_levels must name three different levels, got {" ".join(map(str, levels))}']
        count = len(create_timm(backbone_tag(SEED_BACKBONES, options.backbone_type), False,
                                features_only=True).feature_info)
        if not all(0 <= level < count for level in levels) or list(levels) != sorted(levels):
            # from shallow to deep, as the fusion head's widths expect, and one name per set of levels
            return [f'--feature_levels {" ".join(map(str, levels))}: give three levels of {options.backbone_type} '
                    f'from shallow to deep, each from 0 to {count - 1} (e.g. {count - 3} {count - 2} {count - 1})']
        return []

    @classmethod
    def check_backbone(cls, backbone_type, option='--backbone_type'):
        backbone_tag(SEED_BACKBONES, backbone_type, option)  # an unknown name: the close matches

    @classmethod
    def file_suffix(cls, options):
        """_edge-photo / _edge-none, and _levels-1-2-4 for levels other than the default."""
        suffix = '' if options.edge_mode == 'both' else f'_edge-{options.edge_mode}'
        levels = options.feature_levels
        if levels and tuple(levels) != default_levels(backbone_tag(SEED_BACKBONES, options.backbone_type)):
            suffix += f'_levels-{"-".join(map(str, levels))}'
        return suffix

    @staticmethod
    def train_transform(p=None):
        from torchvision.transforms import v2
        return v2.Compose([
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8 if p is None else p),
            v2.RandomHorizontalFlip(0.5 if p is None else p),
            # bilinear: the original's PIL transform interpolates bicubic, which tensors do not offer here
            v2.RandomApply([v2.RandomAffine(degrees=30, translate=(0.1, 0.1), scale=(0.7, 1.3),
                                            interpolation=v2.InterpolationMode.BILINEAR)],
                           p=0.5 if p is None else p)])

    # ------------------------------------------------------------------------------------------ networks
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

    # ------------------------------------------------------------------------------------------ training
    def make_optimizers(self, options, fused=None):
        groups = [dict(params=list(self.backbone.parameters()) + list(self.head.parameters()), lr=options.lr),
                  dict(params=self.proxy_loss.parameters(), lr=1e-1)]
        return {'model': torch.optim.AdamW(groups, weight_decay=5e-4, fused=fused)}

    def training_step(self, nets, optimizers, batch):
        images, labels, domains, _ = batch
        with nets.autocast():
            embeddings, _ = nets.model(images, domains)
        loss = self.proxy_loss(embeddings.float(), labels)
        optimizers['model'].zero_grad(set_to_none=True)
        loss.backward()
        optimizers['model'].step()
        return {'proxy_loss': loss.detach()}

    def set_warmup(self, warming_up):
        """During warm-up the backbone's parameters are frozen; as in the original, its BatchNorm
        layers stay in training mode and keep updating their running statistics."""
        self.backbone.requires_grad_(not warming_up)

    def set_grad_checkpointing(self):
        set_grad_checkpointing(self.backbone, self.backbone_tag)

    # ------------------------------------------------------------------------------------------ evaluation
    def embed(self, images, domains):
        return self(images, domains)[0]

    def pictures(self, images, domain):
        """The edge map the backbone sees (when edge_mode feeds this domain as edges) and the two attention maps."""
        domains = torch.full((len(images),), domain, device=images.device)
        _, (a3, a4) = self(images, domains)
        shown = {}
        if edge_mask(domains[:1], self.edge_mode).item():
            shown['edge map'] = (sobel_edges(images.float() / 255) * 255).byte()
        return {**shown, 'attention 3': a3[:, 0], 'attention 4': a4[:, 0]}

    @classmethod
    def training_free(cls, options, pretrained=True, weights=None):
        return TrainingFreeBackbone(options.backbone_type, options.edge_mode, pretrained, weights)

    def backbone_module(self):
        return self.backbone


class TrainingFreeBackbone(torch.nn.Module):
    """MSEdge's backbone with no training (docs/training.md): the top feature map of its backbone, max-pooled,
    with edge maps where `edge_mode` says, L2-normalised. No new layer is used: nothing random enters but what
    the weights (or --no_pretrained) bring."""
    name, interpolation = MSEdge.name, MSEdge.interpolation

    def __init__(self, backbone_type, edge_mode, pretrained=True, weights=None):
        super().__init__()
        self.net = create_model('msedge', ['-'], dict(backbone_type=backbone_type, emb_dim=8, edge_mode=edge_mode),
                                pretrained, weights)
        self.backbone_tag = self.net.backbone_tag

    def embed(self, images, domains):
        features = self.net.backbone(self.net.to_input(images, domains))[-1].amax(dim=(2, 3))
        return F.normalize(features.flatten(1).float(), dim=-1)
