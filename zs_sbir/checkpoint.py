"""The files a trained model lives in (docs/runs.md): reading any .pth file safely, the checkpoint and
val-embedding records train.py and convert.py write, and what identifies a model's weights."""
import hashlib
from pathlib import Path

import torch

from zs_sbir.cli import UserError, first_line

# -2: the networks carry the original code's layer names and ACNet's extractor is the whole timm model;
# checkpoints and vectors carry the run's id and the data's fingerprint.
CHECKPOINT_FORMAT, VECTORS_FORMAT = 'zs-sbir-checkpoint-2', 'zs-sbir-vectors-2'
REQUIRED_KEYS = {CHECKPOINT_FORMAT: ('method', 'args', 'epoch', 'metrics', 'train_classes', 'model', 'vectors_file'),
                 VECTORS_FORMAT: ('method', 'data_name', 'data_root', 'classes', 'paths', 'labels', 'domains',
                                  'vectors', 'epoch', 'run_id')}
REQUIRED_ARGS = ('backbone_type', 'emb_dim', 'img_size', 'data_root', 'data_name')


def torch_file_problem(path, error):
    """Why torch.load(weights_only=True) refused a file, in words (never its advice to load it unsafely)."""
    size = Path(path).stat().st_size
    if size == 0:
        return 'the file is empty (0 bytes)'
    if str(path).endswith('.safetensors'):
        return f'it is not a valid safetensors file ({first_line(error)})'
    with open(path, 'rb') as f:
        head = f.read(2)
    if head != b'PK' and head[:1] != b'\x80':
        return 'it is not a file written by torch.save'
    if 'weights_only' in str(error) or 'Unsupported global' in str(error):
        return 'it holds Python objects other than tensors and plain containers, which are never loaded here'
    return f'it is truncated or damaged ({first_line(error)})'


def read_pth(path, what):
    """What a .pth/.pt/.bin file holds, loaded with weights_only=True (a downloaded file cannot run code), or
    the tensors of a .safetensors file; a UserError naming the file and the `what` it should be otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"'{path}' is a folder, not a {what}: name the file")
    if not path.is_file():
        raise UserError(f"{what} not found: '{path}'")
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            return load_file(path)
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        raise UserError(f"'{path}' cannot be read as a {what}: {torch_file_problem(path, error)}") from error


def load_torch(path, expected_format, what):
    """A file this repo saved (a checkpoint or vectors record), checked for its format and keys."""
    obj = read_pth(path, what)
    found = obj.get('format') if isinstance(obj, dict) else None
    if isinstance(found, str) and found != expected_format and found.startswith(expected_format.rsplit('-', 1)[0]):
        raise UserError(f"'{path}' is a {what} of an earlier version of this repo (format {found!r}; this version "
                        f"reads {expected_format!r}, see docs/runs.md): train it again")
    if found != expected_format:
        raise UserError(f"'{path}' is not a {what} of this repo (format {found!r}, expected {expected_format!r})")
    missing = [key for key in REQUIRED_KEYS[expected_format] if key not in obj]
    if expected_format == CHECKPOINT_FORMAT and not missing:
        missing = [f'args.{key}' for key in REQUIRED_ARGS if not isinstance(obj['args'], dict) or key not in obj['args']]
    if missing:
        raise UserError(f"'{path}' is an incomplete {what}: it lacks {', '.join(missing)}")
    return obj


def checkpoint_record(model, args, epoch=None, metrics=None, train_classes=(), run_id=None, vectors_file=None,
                      data=None, skipped=None, parts=None, **extra):
    """A checkpoint: the model's weights (only those of `parts`, when given: a converted release holds the two
    networks retrieval needs), the options it was trained with and what ties it to its run and data."""
    state = model.state_dict()
    if parts is not None:
        state = {k: v for k, v in state.items() if k.split('.')[0] in parts}
        extra['parts'] = list(parts)
    return {'format': CHECKPOINT_FORMAT, 'method': args.method, 'args': dict(vars(args)), 'epoch': epoch,
            'metrics': metrics or {}, 'train_classes': list(train_classes), 'model': state,
            'backbone_tag': model.backbone_tag, 'vectors_file': vectors_file, 'run_id': run_id, 'data': data,
            'skipped_images': skipped or {'train': [], 'val': []}, **extra}


def vectors_record(vectors, split, method, data_root, data_name, epoch, run_id, skipped=()):
    """The embeddings with what identifies each row (its image path, label and domain) and the run and
    epoch they belong to; `skipped`: val images --skip_bad_images left out."""
    return {'format': VECTORS_FORMAT, 'method': method, 'data_name': data_name,
            'data_root': str(data_root), 'split': 'val', 'epoch': epoch, 'run_id': run_id,
            'classes': list(split.classes), 'paths': list(split.paths), 'labels': torch.tensor(split.labels),
            'domains': torch.tensor(split.domains), 'skipped': list(skipped), 'vectors': vectors.cpu()}


def load_checkpoint_vectors(data_base, checkpoint, vectors=None):
    """The val embeddings saved with a checkpoint (the _vectors.pth beside it, or `vectors`), refused
    when they belong to another run or another epoch."""
    if not (vectors or checkpoint['vectors_file']):
        raise UserError(f"'{data_base}' has no saved val embeddings (a converted release?): pass --vectors")
    path = Path(vectors) if vectors else Path(data_base).parent / checkpoint['vectors_file']
    record = load_torch(path, VECTORS_FORMAT, 'vectors file')
    if record['run_id'] != checkpoint.get('run_id'):
        raise UserError(f"'{path}' holds the embeddings of another run than '{data_base}': pass the "
                        f"_model.pth and _vectors.pth that train.py saved together")
    if record['epoch'] != checkpoint['epoch']:
        raise UserError(f"'{path}' holds the embeddings of epoch {record['epoch']}, but '{data_base}' is "
                        f"epoch {checkpoint['epoch']} of that run: pass its _model.pth (the best epoch), or --evaluate")
    return record, path


def model_identity(checkpoint):
    """What a query model must share with an index's: the run, the epoch and a digest of the weights."""
    digest = hashlib.sha256()
    for key in sorted(checkpoint['model']):
        digest.update(key.encode())
        digest.update(checkpoint['model'][key].cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    args = checkpoint['args']
    return {'method': checkpoint['method'], 'run_id': checkpoint.get('run_id'), 'epoch': checkpoint['epoch'],
            'backbone_tag': checkpoint.get('backbone_tag'), 'emb_dim': args['emb_dim'], 'img_size': args['img_size'],
            'weights_sha256': digest.hexdigest()}
