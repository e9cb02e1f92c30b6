"""One path from a checkpoint to ranked photos, which every command takes: `load_model` rebuilds any method's
trained model from its checkpoint, `embed` is the one embedding call (the method's embed, L2-normalised once by
the method itself), and `Gallery` ranks photos for a query (exactly, with the metrics' products and tie rule, or
through a FAISS index for millions of photos).

    model, checkpoint = load_model('result/synthetic_acnet_resnet50_512_model.pth')
    query = embed(model, sketches, torch.full((len(sketches),), SKETCH))[0]
    hits = Gallery(photo_vectors, photo_paths, class_names).top_k(query, 10)
"""
from collections import namedtuple
from pathlib import Path

import torch

from methods import create_model
from utils import rank_gallery
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, load_torch
from zs_sbir.cli import UserError, first_line
from zs_sbir.onnx_runtime import OnnxModel, choose_runtime, file_sha256
from zs_sbir.precision import with_precision


def model_from_checkpoint(checkpoint, device='cpu'):
    """Rebuild a trained model from a loaded checkpoint (no weight download), in eval mode.

    A checkpoint may declare with 'parts' that it holds only some networks (a converted release holds
    the generator and extractor): those must be complete, the others keep their initialisation.
    """
    model = create_model(checkpoint['method'], checkpoint['train_classes'] or ['-'], checkpoint['args'],
                         pretrained=False)
    parts = checkpoint.get('parts')
    result = model.load_state_dict(checkpoint['model'], strict=parts is None)
    missing = [k for k in result.missing_keys if k.split('.')[0] in parts] if parts else []
    if missing or result.unexpected_keys:
        raise RuntimeError(f'{len(missing)} missing and {len(result.unexpected_keys)} unexpected tensors, '
                           f'e.g. {(missing + result.unexpected_keys)[0]}')
    return model.to(device).eval()


def load_model(path, device='cpu', runtime='torch', quiet=False, precision='fp32', calibration=None):
    """(model in eval mode, checkpoint) of a checkpoint written by train.py or convert.py; with runtime 'onnx' (or
    'auto' on a CPU) the model embeds through ONNX Runtime, its graphs exported beside the checkpoint on first use
    (zs_sbir/onnx_runtime.py); with precision 'bf16' through torch under bfloat16 autocast (zs_sbir/precision.py);
    with 'int8' through int8 graphs calibrated on `calibration` (a training split folder; default the checkpoint's)."""
    runtime = choose_runtime(runtime, device, precision=precision)
    sha256 = file_sha256(path) if runtime == 'onnx' and Path(path).is_file() else None
    checkpoint = load_torch(path, CHECKPOINT_FORMAT, 'checkpoint')
    try:
        model = model_from_checkpoint(checkpoint, device)
    except RuntimeError as error:
        raise UserError(f"'{path}' does not hold a {checkpoint['method']} model matching its own arguments: "
                        f"{first_line(error)}") from error
    if runtime == 'onnx':
        if file_sha256(path) != sha256:  # the graphs are tied to the file's digest: it must be that of what was read
            raise UserError(f"'{path}' changed while it was read (a run saving it?): run the command again")
        trained = checkpoint['args']
        if precision == 'int8' and calibration is None:
            calibration = Path(trained.get('data_root') or 'data') / str(trained.get('data_name')) / 'train'
        model = OnnxModel(model, path, trained['img_size'], checkpoint['method'], sha256, quiet,
                          'int8' if precision == 'int8' else 'fp32', calibration)
    return with_precision(model, precision, device), checkpoint


@torch.inference_mode()
def embed(model, images, domains, amp=False):
    """float32 embeddings (L2-normalised by the method) of uint8 images already on the model's device, each
    taken as its domain; `amp`: under bfloat16 autocast."""
    with torch.autocast(images.device.type, torch.bfloat16, enabled=amp and not isinstance(model, OnnxModel)):
        return model.embed(images, domains).float()


Hit = namedtuple('Hit', 'row similarity path name')


class Gallery:
    """Photos a query is ranked against: their embeddings (unit float32 rows), and the path and class name of
    each row. Exact ranking uses the metrics' float32 products and tie rule (the lower row first), so test.py,
    search.py and the metrics agree; with a FAISS `index` over the same rows, ranking is approximate."""

    def __init__(self, vectors, paths, names, index=None):
        self.vectors, self.paths, self.names, self.index = vectors, list(paths), list(names), index

    def __len__(self):
        return len(self.paths)

    def top_k(self, query, k):
        """[Hit(row, similarity, path, class name)] of the k photos most similar to a query embedding, best first."""
        k = min(k, len(self))
        if self.index is None:
            similarity = self.vectors @ query.to(self.vectors.device, self.vectors.dtype)
            rows = rank_gallery(similarity.unsqueeze(0))[0, :k]
            pairs = zip(rows.tolist(), similarity[rows].tolist())
        else:
            scores, rows = self.index.search(query.cpu().numpy()[None], k)
            pairs = [(row, score) for row, score in zip(rows[0].tolist(), scores[0].tolist()) if row >= 0]
        return [Hit(row, similarity, self.paths[row], self.names[row]) for row, similarity in pairs]
