"""ClipPrompt (leftthomas/ClipPrompt at e946e6d), the ACNet author's re-implementation of "CLIP for All Things"
(Sain et al., CVPR 2023): learned prompt tokens on a frozen CLIP ViT-B/32, one image tower for sketches and a copy
for photos, each training only its LayerNorms, its projection and its prompts; a triplet loss on 1 - cosine plus a
cross-entropy against the frozen text tower's embeddings of the training class names. docs/fidelity.md compares
it with the source line by line.

    python train.py --method clipprompt --data_name sketchy                       # ClipPrompt's defaults
    python train.py --method clipprompt --data_name sketchy --prompt_position append --shared_tower   # Sketch_LVM's
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.registry import Method, create_model, register_method
from model import prompted_vit
from utils import METRIC_NAMES, PHOTO, SKETCH
from zs_sbir.backbones import IMAGENET_MEAN, IMAGENET_STD, clip_name_tag, create_clip
from zs_sbir.checkpoint import read_pth
from zs_sbir.cli import UserError
from zs_sbir.datasets import SketchTriplets

# ClipPrompt's README (its Sketchy is the 21-class split; its TU-Berlin keeps every val class), torchmetrics 1.0's
# convention, in percent: mAP@200, mAP@all, P@100, P@200
PUBLISHED = {'sketchy': (71.9, 64.3, 70.8, 68.1), 'tuberlin': (75.3, 66.0, 73.9, 69.7)}
PROMPT_POSITIONS = ('prepend', 'append')


def clip_config(backbone_type):
    """open_clip's configuration of a model name, or None when the name is not one of its models."""
    import open_clip
    try:
        return open_clip.get_model_config(clip_name_tag(backbone_type)[0])
    except Exception:  # an unknown name: check() says so in one line
        return None


@register_method
class ClipPrompt(Method):
    """Two CLIP image towers with their prompts, and the frozen text tower (its class-name embeddings are the
    targets of the cross-entropy term)."""
    name = 'clipprompt'
    interpolation = 'bilinear'  # Resize((224, 224)): stretched, bilinear
    defaults = dict(Method.defaults, backbone_type='ViT-B-32', emb_dim=None, lr=None, epochs=60,
                    metric_convention='torchmetrics', val_classes='all')
    default_notes = dict(emb_dim="its CLIP's", lr='none (--encoder_lr and --prompt_lr)')
    paper_grid = dict(backbones=('ViT-B-32',), emb_dims=(512,))  # its README's table
    file_suffix_pattern = r'(?:_p\d+|_append|_shared)*'

    def __init__(self, classes, backbone_type, img_size, prompt_num, prompt_position, shared_tower, triplet_margin,
                 cls_weight, pretrained=True, weights=None):
        super().__init__()
        import open_clip
        clip = create_clip(backbone_type, pretrained, weights, img_size)
        self.backbone_tag = '.'.join(filter(None, clip_name_tag(backbone_type)))
        clip.requires_grad_(False)
        visual = clip.visual
        for module in visual.modules():  # every LayerNorm of the image tower trains, and its projection
            if isinstance(module, nn.LayerNorm):
                module.requires_grad_(True)
        visual.proj.requires_grad_(True)
        del clip.visual
        self.sketch_tower = visual
        self.photo_tower = visual if shared_tower else copy.deepcopy(visual)
        self.text = clip  # the text tower and logit_scale, frozen
        width = visual.class_embedding.shape[0]
        self.sketch_prompt = nn.Parameter(torch.randn(prompt_num, width))
        self.photo_prompt = nn.Parameter(torch.randn(prompt_num, width))
        self.append, self.triplet_margin, self.cls_weight = prompt_position == 'append', triplet_margin, cls_weight
        tokenizer = open_clip.get_tokenizer(clip_name_tag(backbone_type)[0])
        self.register_buffer('class_tokens', tokenizer([f"a photo of a {c.replace('_', ' ')}" for c in classes]),
                             persistent=False)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._class_text = None

    # ------------------------------------------------------------------------------------------ options
    @classmethod
    def add_options(cls, parser):
        group = parser.add_argument_group('clipprompt options (ClipPrompt\'s names and defaults)')
        group.add_argument('--prompt_num', type=int, default=3, help='prompt tokens per image tower')
        group.add_argument('--encoder_lr', type=float, default=1e-4,
                           help="learning rate of the image towers' LayerNorms and projections (ClipPrompt's --lr)")
        group.add_argument('--prompt_lr', type=float, default=1e-3, help='learning rate of the prompts')
        group.add_argument('--triplet_margin', type=float, default=0.3, help='margin of the triplet loss on 1 - cosine')
        group.add_argument('--cls_weight', type=float, default=0.5, help='weight of the class-name cross-entropy terms')
        group.add_argument('--prompt_position', default='prepend', choices=PROMPT_POSITIONS,
                           help="prepend: ClipPrompt's (the output is the first prompt token); append: the official "
                                "Sketch_LVM's (prompts after the patches, the output is the class token)")
        group.add_argument('--shared_tower', action='store_true',
                           help="one image tower for sketches and photos, each with its prompts (Sketch_LVM's)")

    @classmethod
    def fixed_emb_dim(cls, backbone_type):
        config = clip_config(backbone_type)
        return config['embed_dim'] if config else None  # the size of CLIP's joint embedding

    @classmethod
    def complete(cls, options):
        if options.emb_dim is None:
            options.emb_dim = cls.fixed_emb_dim(options.backbone_type)

    @classmethod
    def check(cls, options):
        problems = []
        config = clip_config(options.backbone_type)
        if config is None:
            pass  # an unknown name or tag: check_backbone says so
        elif not config['vision_cfg'].get('patch_size') or not isinstance(config['vision_cfg'].get('layers'), int) or \
                config['vision_cfg'].get('timm_model_name'):
            problems.append(f"--backbone_type {options.backbone_type}: prompts need open_clip's own ViT image tower, "
                            f"which {options.backbone_type} has not")
        elif options.emb_dim != config['embed_dim']:
            problems.append(f'--emb_dim must be {config["embed_dim"]}, the size of {options.backbone_type}\'s '
                            f'embeddings, got {options.emb_dim}')
        if options.lr is not None:
            problems.append('--lr: clipprompt has two learning rates, --encoder_lr and --prompt_lr')
        if not 1 <= options.prompt_num <= 1000:
            problems.append(f'--prompt_num must be from 1 to 1000, got {options.prompt_num}')
        for name in ('encoder_lr', 'prompt_lr'):
            if not 0 < getattr(options, name) < float('inf'):
                problems.append(f'--{name} must be a positive number, got {getattr(options, name)}')
        if not 0 < options.triplet_margin < float('inf'):  # torch's triplet loss takes no margin of 0
            problems.append(f'--triplet_margin must be a positive number, got {options.triplet_margin}')
        if not 0 <= options.cls_weight < float('inf'):
            problems.append(f'--cls_weight must be 0 or more, got {options.cls_weight}')
        return problems

    @classmethod
    def check_backbone(cls, backbone_type, option='--backbone_type'):
        clip_name_tag(backbone_type, option)

    @classmethod
    def file_suffix(cls, options):
        """_p<N> for another number of prompts; _append and _shared for Sketch_LVM's choices."""
        return (f'_p{options.prompt_num}' if options.prompt_num != 3 else '') + \
            ('_append' if options.prompt_position == 'append' else '') + ('_shared' if options.shared_tower else '')

    @classmethod
    def add_release_options(cls, parser):
        parser.add_argument('--clipprompt', default=None,
                            help="ClipPrompt's {data_name}_{prompt_num}_model.pth (its README's MEGA downloads); "
                                 '--backbone_type: its CLIP (default ViT-B-32)')

    @classmethod
    def from_release(cls, args):
        """ClipPrompt's saved Model.state_dict(): sketch_encoder.*, photo_encoder.*, clip_model.* (the whole CLIP,
        whose visual is the sketch encoder again), sketch_prompt and photo_prompt. Every tensor is checked."""
        path, backbone_type = args.clipprompt, args.backbone_type or cls.defaults['backbone_type']
        state = read_pth(path, 'ClipPrompt checkpoint')
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()) or \
                not {'sketch_prompt', 'photo_prompt'} <= set(state):
            raise UserError(f"'{path}' is not a ClipPrompt checkpoint: it holds no sketch_prompt and photo_prompt "
                            f"tensors (a state dict of ClipPrompt's Model)")
        ours = {'sketch_prompt': state['sketch_prompt'], 'photo_prompt': state['photo_prompt']}
        for theirs, mine in (('sketch_encoder.', 'sketch_tower.'), ('photo_encoder.', 'photo_tower.'),
                             ('clip_model.', 'text.')):
            ours.update({mine + k[len(theirs):]: v for k, v in state.items()
                         if k.startswith(theirs) and not k.startswith('clip_model.visual.')})
        patch = state.get('sketch_encoder.conv1.weight')
        tokens = state.get('sketch_encoder.positional_embedding')
        img_size = patch.shape[-1] * round((tokens.shape[0] - 1) ** 0.5) if patch is not None and tokens is not None \
            else args.img_size
        if img_size != args.img_size:
            raise UserError(f"'{path}' was trained at {img_size} px: pass --img_size {img_size}")
        options = dict(backbone_type=backbone_type, img_size=img_size, prompt_num=len(state['sketch_prompt']))
        model = create_model(cls.name, ['-'], options, pretrained=False)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(ours)), sorted(set(ours) - set(expected))
        wrong = [k for k in expected if k in ours and ours[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            example = (f'lacks {missing[0]}' if missing else f'has an unexpected {unexpected[0]}' if unexpected
                       else f'{wrong[0]} has shape {tuple(ours[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}')
            raise UserError(f"'{path}' is not a ClipPrompt checkpoint of {backbone_type}: {len(missing)} tensors "
                            f"missing, {len(unexpected)} unexpected, {len(wrong)} of another shape ({example}); pass "
                            f"the --backbone_type it was trained with")
        model.load_state_dict(ours)
        return model, ['--backbone_type', backbone_type, '--prompt_num', str(options['prompt_num'])], None

    @classmethod
    def published(cls, backbone_type, emb_dim, data_name):
        if (backbone_type, emb_dim) != ('ViT-B-32', 512):
            return {}
        key = 'sketchy' if data_name in ('sketchy', 'sketchy21') else 'tuberlin' if data_name.startswith('tuberlin') \
            else None
        return dict(zip(METRIC_NAMES, PUBLISHED[key])) if key else {}

    @classmethod
    def train_dataset(cls, split, images, batch_size):
        """batch_size sketches per batch, each with a positive and a negative photo; the last batch kept whole."""
        return SketchTriplets(split, images), batch_size, False

    # ------------------------------------------------------------------------------------------ networks
    def to_input(self, images):
        """uint8 images normalised as ClipPrompt does: ImageNet's mean and std (not CLIP's)."""
        return (images.float() / 255 - self.mean) / self.std

    def forward(self, images, domains):
        """Embeddings (not normalised) of uint8 images: sketches through the sketch tower with its prompts, photos
        through the photo tower with theirs."""
        x, sketch = self.to_input(images), domains == SKETCH
        out = None
        for mask, domain in ((sketch, SKETCH), (~sketch, PHOTO)):
            if mask.any():
                part = self.tower_embedding(x[mask], domain)
                out = part.new_empty(len(x), part.shape[1]) if out is None else out
                out[mask] = part
        return out

    def tower_embedding(self, x, domain):
        """Embeddings (not normalised) of normalised images through the tower and prompts of one domain."""
        tower, prompt = (self.sketch_tower, self.sketch_prompt) if domain == SKETCH else (self.photo_tower, self.photo_prompt)
        return prompted_vit(tower, x, prompt.expand(x.shape[0], -1, -1), self.append)

    def class_text(self):
        """The frozen text tower's L2-normalised embeddings of 'a photo of a {class}' for the training classes,
        computed once per epoch (train() forgets them, so that loaded weights count)."""
        if self._class_text is None:
            with torch.no_grad(), torch.autocast(self.class_tokens.device.type, enabled=False):
                self._class_text = F.normalize(self.text.encode_text(self.class_tokens), dim=-1)
        return self._class_text

    def train(self, mode=True):
        self._class_text = None
        return super().train(mode)

    # ------------------------------------------------------------------------------------------ training
    def make_optimizers(self, options, fused=None):
        towers = [self.sketch_tower] if self.sketch_tower is self.photo_tower else [self.sketch_tower, self.photo_tower]
        groups = [dict(params=tower.parameters(), lr=options.encoder_lr) for tower in towers]
        groups.append(dict(params=[self.sketch_prompt, self.photo_prompt], lr=options.prompt_lr))
        return {'model': torch.optim.Adam(groups, fused=fused)}

    def training_step(self, nets, optimizers, batch):
        sketch, positive, negative, labels = batch
        n = len(sketch)
        domains = torch.cat([torch.full((n,), SKETCH), torch.full((2 * n,), PHOTO)]).to(sketch.device)
        with nets.autocast():
            embeddings = nets.model(torch.cat([sketch, positive, negative]), domains).float()
        s, p, q = embeddings[:n], embeddings[n:2 * n], embeddings[2 * n:]
        triplet = F.triplet_margin_with_distance_loss(s, p, q, distance_function=lambda a, b: 1 - F.cosine_similarity(a, b),
                                                      margin=self.triplet_margin)
        # ClipPrompt scales the logits by the stored logit_scale itself (about 4.6 for OpenAI's weights), not its exp
        logits = self.text.logit_scale * torch.cat([F.normalize(s, dim=-1), F.normalize(p, dim=-1)]) @ self.class_text().T
        sketch_class, photo_class = F.cross_entropy(logits[:n], labels), F.cross_entropy(logits[n:], labels)
        loss = triplet + self.cls_weight * (sketch_class + photo_class)
        optimizers['model'].zero_grad(set_to_none=True)
        loss.backward()
        optimizers['model'].step()
        return {'triplet_loss': triplet.detach(), 'sketch_class_loss': sketch_class.detach(),
                'photo_class_loss': photo_class.detach()}

    def set_grad_checkpointing(self):
        for tower in (self.sketch_tower, self.photo_tower):
            tower.set_grad_checkpointing(True)

    # ------------------------------------------------------------------------------------------ evaluation
    def embed(self, images, domains):
        return F.normalize(self(images, domains), dim=-1)

    def embedder(self, domain):
        return TowerEmbedder(self, domain)

    @classmethod
    def training_free(cls, options, pretrained=True, weights=None):
        return FrozenCLIP(options.backbone_type, options.img_size, pretrained, weights)

    def backbone_module(self):
        return self.sketch_tower


class TowerEmbedder(nn.Module):
    """One domain's tower with its prompts, uint8 images in, L2-normalised embeddings out: what an ONNX graph holds
    (no mask over the batch, whose size stays symbolic)."""

    def __init__(self, model, domain):
        super().__init__()
        self.model, self.domain = model, domain

    def forward(self, images):
        return F.normalize(self.model.tower_embedding(self.model.to_input(images), self.domain), dim=-1)


class FrozenCLIP(nn.Module):
    """CLIP with no training (docs/training.md): its image tower's class-token embedding of every sketch and photo,
    CLIP's own normalisation, L2-normalised: the zero-shot CLIP row of the CLIP papers."""
    name, interpolation = ClipPrompt.name, 'bicubic'  # open_clip's preprocessing

    def __init__(self, backbone_type, img_size, pretrained=True, weights=None):
        super().__init__()
        clip = create_clip(backbone_type, pretrained, weights, img_size)
        self.visual, self.backbone_tag = clip.visual, '.'.join(filter(None, clip_name_tag(backbone_type)))
        cfg = self.visual.preprocess_cfg
        self.register_buffer('mean', torch.tensor(cfg['mean']).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(cfg['std']).view(1, 3, 1, 1), persistent=False)

    def embed(self, images, domains):
        return F.normalize(self.visual((images.float() / 255 - self.mean) / self.std).float(), dim=-1)
