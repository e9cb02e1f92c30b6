"""Backbones from timm: what `--backbone_type` names, how a backbone's inputs are normalised, and its weights
from the Hugging Face hub, a local file (--weights) or random initialisation (--no_pretrained).

Any timm name works, with or without a pretrained tag (resnet50.a1_in1k, vit_base_patch16_clip_224.openai); a
method maps the seeds' plain `resnet50` and `vgg16` to the weights its original code loaded (its SEED_BACKBONES).
Without a network a missing download fails within seconds, naming --weights and --no_pretrained.
"""
import difflib
import logging
import os
import socket
import sys
import threading
import warnings
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn

from zs_sbir.checkpoint import read_pth
from zs_sbir.cli import UserError, first_line

SEED_ARCHS = ('resnet50', 'vgg16')  # whatever their tag: the seeds' input normalisation and feature levels
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NO_WEIGHTS_HELP = ('pass --weights PATH to load a local ImageNet checkpoint (torchvision or timm format), '
                   'or --no_pretrained to start from random initialisation')


def is_seed_arch(tag):
    return timm.models.split_model_name_tag(tag)[0] in SEED_ARCHS


def input_normalisation(tag, seed_normalisation):
    """(mean, std) of the images a backbone receives: a method's original `seed_normalisation` for ResNet50 and
    VGG16, else what the pretrained weights expect (timm)."""
    if is_seed_arch(tag):
        return seed_normalisation
    cfg = timm.models.get_pretrained_cfg(tag)
    return (tuple(cfg.mean), tuple(cfg.std)) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)


def backbone_tag(seed_backbones, backbone_type, option='--backbone_type'):
    """The timm name (with pretrained tag) that `--backbone_type` stands for under a method whose original code
    loaded `seed_backbones` ({'resnet50': tag, ...}); errors name `option`."""
    tag = seed_backbones.get(backbone_type, backbone_type)
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


def freeze_batchnorm(module):
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ----------------------------------------------------------------------------------------------
# CLIP image-text models from open_clip (ClipPrompt): `--backbone_type NAME[.TAG]`, e.g. ViT-B-32 (OpenAI's weights),
# ViT-B-16.laion2b_s34b_b88k

def clip_name_tag(backbone_type, option='--backbone_type'):
    """(open_clip model name, pretrained tag) that `NAME[.TAG]` stands for; without a tag, OpenAI's weights where
    open_clip has them. Unknown names and tags fail in one line, naming close matches."""
    import open_clip
    name, _, tag = backbone_type.partition('.')
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.6)
        hint = f'close matches: {", ".join(close)}' if close else 'see open_clip.list_models()'
        raise UserError(f'{option} {backbone_type!r}: open_clip has no model {name!r} ({hint})')
    tags = open_clip.list_pretrained_tags_by_model(name)
    tag = tag or ('openai' if 'openai' in tags else '')
    if tag and tag not in tags:
        raise UserError(f'{option} {backbone_type!r}: open_clip has no pretrained tag {tag!r} for {name} (it has: '
                        f'{", ".join(tags[:8]) or "none"})')
    return name, tag


def _is_torchscript(path):
    import zipfile
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split('/', 1)[-1].startswith('code/') for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _clip_state_dict(path):
    """The state dict of an OpenAI CLIP file (a TorchScript archive, as OpenAI publishes ViT-B-32.pt) or of an
    open_clip checkpoint (.pt/.pth/.bin read weights_only, or .safetensors)."""
    if Path(path).is_dir():
        raise UserError(f"--weights '{path}' is a folder: name the weights file in it")
    if not Path(path).is_file():
        raise UserError(f"--weights file not found: '{path}'")
    if _is_torchscript(path):  # TorchScript, not pickled Python objects: its tensors are read, none of its code runs
        try:
            with warnings.catch_warnings():  # torch 2.14 calls TorchScript deprecated; OpenAI's files are TorchScript
                warnings.simplefilter('ignore', FutureWarning)
                state = torch.jit.load(str(path), map_location='cpu').state_dict()
        except RuntimeError as error:
            raise UserError(f"--weights '{path}' cannot be read as a TorchScript archive: {first_line(error)}") from error
    else:
        try:
            state = read_state_dict(path)
        except ValueError as error:
            raise UserError(f"--weights '{path}' is not a CLIP checkpoint: {error}") from error
    # OpenAI's archives carry these three numbers as tensors; a traced open_clip model its (derived) text mask
    return {k: v for k, v in state.items() if k not in ('input_resolution', 'context_length', 'vocab_size', 'attn_mask')}


def create_clip(backbone_type, pretrained=True, weights=None, img_size=224):
    """An open_clip image-text model for `img_size` px inputs (its positional embeddings resized), with its
    pretrained weights (the Hugging Face hub, or open_clip's cache), a local file, or random initialisation.
    QuickGELU where the weights are OpenAI's, as OpenAI's own models."""
    import open_clip
    name, tag = clip_name_tag(backbone_type)
    cfg = open_clip.get_pretrained_cfg(name, tag) if tag else {}
    options = dict(force_quick_gelu=bool(cfg.get('quick_gelu')) or name.endswith('quickgelu'),
                   force_image_size=img_size)
    if weights is None and pretrained:
        if not tag:
            raise UserError(f'open_clip has no pretrained weights for {name}: {NO_WEIGHTS_HELP}')
        hub = cfg.get('hf_hub', '').rstrip('/')
        if not (hub and _cached_on_hub(hub)):
            offline = os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')
            endpoint = os.environ.get('HF_ENDPOINT', 'https://huggingface.co')
            if offline or not _hub_reachable(endpoint):
                why = 'HF_HUB_OFFLINE is set' if offline else f'{endpoint} cannot be reached'
                raise UserError(f'pretrained {name}.{tag} weights ({hub or cfg.get("url")}) are not in the Hugging '
                                f'Face cache and {why}: pass --weights PATH (OpenAI\'s {name}.pt or an open_clip '
                                f'checkpoint), or --no_pretrained to start from random initialisation')
        try:
            return open_clip.create_model(name, pretrained=tag, **options)
        except Exception as error:
            raise UserError(f'could not download pretrained {name}.{tag} weights ({first_line(error)}): '
                            f'{NO_WEIGHTS_HELP}') from error
    root = logging.getLogger()
    was_disabled, root.disabled = root.disabled, True  # open_clip warns that it loaded no weights: ours come next
    try:
        model = open_clip.create_model(name, pretrained=None, **options)
    finally:
        root.disabled = was_disabled
    if weights is not None:
        state = _clip_state_dict(weights)
        try:
            open_clip.model.resize_pos_embed(state, model)  # a file of another image size
            model.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as error:
            raise UserError(f"--weights '{weights}' is not a {name} CLIP checkpoint: {first_line(error)}") from error
    return model
