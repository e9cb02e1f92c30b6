"""ONNX Runtime for the embedding networks (docs/speed.md#onnx-runtime): a checkpoint's sketch and photo embedders,
exported once to ONNX files beside it, and a model whose `embed` runs them. On a CPU they embed about twice as fast
as torch, with the same embeddings to 1e-5 (the tests hold every method and backbone family to 1e-4).

    model, checkpoint = load_model('result/synthetic_msedge_resnet50_512_model.pth', runtime='onnx')  # retrieval.py
    python convert.py --onnx result/synthetic_msedge_resnet50_512_model.pth     # export now, not on first use

Each domain has its own graph, `{checkpoint stem}.sketch.onnx` and `.photo.onnx`: the method's `embedder(domain)`,
uint8 images (batch, 3, img_size, img_size) in, L2-normalised float32 embeddings out, the batch size free. A graph
records the sha256 of the checkpoint file it was exported from and this module's export format; a graph that does
not match them (the checkpoint was trained again or replaced, the file is damaged or was cut short) is exported
again. A graph is written whole (a temporary file, then a rename) under a lock, so two processes never write one
file at once; beside a checkpoint in a read-only folder the graphs live in memory only.
"""
import copy
import hashlib
import io
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils import PHOTO, SKETCH
from zs_sbir.cli import UserError, first_line
from zs_sbir.safe_files import acquire_lock, atomic_write

ONNX_FORMAT = 'zs-sbir-onnx-1'  # bump when an export changes what a graph computes: older graphs are exported again
OPSET = 17
DOMAIN_NAMES = {SKETCH: 'sketch', PHOTO: 'photo'}
RUNTIMES = ('auto', 'torch', 'onnx')


def onnx_available():
    try:
        import onnx  # noqa: F401  (torch's exporter writes through it)
        import onnxruntime  # noqa: F401
        return True
    except ImportError:
        return False


def choose_runtime(runtime, device, option='--runtime'):
    """'torch' or 'onnx': auto is ONNX Runtime on a CPU (where it is the faster, docs/speed.md), torch on a GPU."""
    on_cpu = torch.device(device).type == 'cpu'
    if runtime == 'auto':
        return 'onnx' if on_cpu and onnx_available() else 'torch'
    if runtime == 'onnx' and not on_cpu:
        raise UserError(f'{option} onnx runs on the CPU (onnxruntime\'s CPU build): pass --device cpu, or {option} torch')
    if runtime == 'onnx' and not onnx_available():
        raise UserError(f'{option} onnx needs the onnx and onnxruntime packages: pip install -r requirements.txt, '
                        f'or {option} torch')
    return runtime


def graph_path(checkpoint_path, domain):
    checkpoint_path = Path(checkpoint_path)
    return checkpoint_path.with_name(f'{checkpoint_path.stem}.{DOMAIN_NAMES[domain]}.onnx')


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- export

def _pool_matrix(size_in, size_out):
    """(size_out, size_in) averaging matrix of adaptive average pooling along one axis (PyTorch's bins)."""
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1 / (end - start)
    return matrix


@contextmanager
def explicit_adaptive_pooling():
    """While exporting, F.adaptive_avg_pool2d to a size that does not divide the input (timm's VGG head below 224 px
    pools its 2x2 map up to 7x7) is computed as two products with averaging matrices: the same bins and values, in
    operations ONNX has (its exporter refuses the non-divisible case)."""
    original = F.adaptive_avg_pool2d

    def pooled(x, output_size):
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        size = tuple(x.shape[-2 + i] if s is None else s for i, s in enumerate(size))
        h, w = x.shape[-2:]
        if h % size[0] == 0 and w % size[1] == 0:
            return original(x, size)
        weights = np.kron(_pool_matrix(int(h), size[0]), _pool_matrix(int(w), size[1]))  # (H*W, h*w), a constant
        return F.linear(x.flatten(2), torch.from_numpy(weights).to(x)).unflatten(2, size)
    F.adaptive_avg_pool2d = pooled
    try:
        yield
    finally:
        F.adaptive_avg_pool2d = original


@contextmanager
def mha_fastpath(enabled):
    """nn.MultiheadAttention's fused inference kernel (open_clip's CLIP towers take it) has no ONNX export; the
    unfused path computes the same attention in ordinary operations."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def fixed_input_size(model, img_size):
    """The model, or a copy whose timm ViTs have their positional embeddings resized for img_size px once: they
    resize them at every forward (dynamic_img_size), with an antialiased bicubic filter ONNX does not have. The
    values are those the forward computes (a padded input counts its padded patches)."""
    vits = [m for m in model.modules() if getattr(m, 'dynamic_img_size', False) and hasattr(m, 'set_input_size')]
    if not vits:
        return model
    model = copy.deepcopy(model)
    for vit in [m for m in model.modules() if getattr(m, 'dynamic_img_size', False) and hasattr(m, 'set_input_size')]:
        patch = vit.patch_embed.patch_size
        pad = getattr(vit.patch_embed, 'dynamic_img_pad', False)
        grid = [-(-img_size // p) if pad else img_size // p for p in patch]
        vit.set_input_size(img_size=tuple(g * p for g, p in zip(grid, patch)))
    return model


def export_graph(model, domain, img_size, metadata):
    """The ONNX bytes of model.embedder(domain) for img_size px images, with `metadata` recorded in the file."""
    import onnx
    # eval() on the wrapper too: the exporter puts the module it is given back into that module's mode afterwards,
    # and a new wrapper starts in training mode (which would leave the model's BatchNorms training)
    net = fixed_input_size(model, img_size).cpu().embedder(domain).eval()
    example = torch.zeros(2, 3, img_size, img_size, dtype=torch.uint8)
    buffer = io.BytesIO()
    # the embed call may come from inside inference_mode; tracing needs ordinary tensors
    with torch.inference_mode(False), torch.no_grad(), explicit_adaptive_pooling(), mha_fastpath(False), \
            warnings.catch_warnings():
        warnings.simplefilter('ignore')  # tracer and deprecation warnings: the tests compare the graphs with torch
        torch.onnx.export(net, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=['images'],
                          output_names=['embeddings'],
                          dynamic_axes={'images': {0: 'batch'}, 'embeddings': {0: 'batch'}})
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(graph, {**metadata, 'domain': DOMAIN_NAMES[domain]})
    return graph.SerializeToString()


def ensure_graph(model, checkpoint_path, domain, img_size, sha256=None, method=None, quiet=False):
    """(path or None, ONNX bytes or None) of the up-to-date graph of one domain: the file beside the checkpoint when it
    matches, else exported again (saved when the folder is writable, else returned as bytes)."""
    checkpoint_path = Path(checkpoint_path)
    sha256 = sha256 or file_sha256(checkpoint_path)
    path = graph_path(checkpoint_path, domain)
    metadata = {'format': ONNX_FORMAT, 'checkpoint_sha256': sha256, 'checkpoint': checkpoint_path.name,
                'method': str(method), 'img_size': str(img_size), 'torch': torch.__version__}
    problem = graph_problem(path, metadata)
    if problem is None:
        return path, None
    try:
        release = acquire_lock(path.with_name(f'.{path.name}.lock'), f"'{path}'", wait=3600)
    except OSError:  # a read-only folder: the graph lives in memory
        say(quiet, f'exporting the {DOMAIN_NAMES[domain]} graph of {checkpoint_path} to ONNX in memory '
                   f'(its folder cannot be written)')
        return None, export_graph(model, domain, img_size, metadata)
    try:
        problem = graph_problem(path, metadata)  # another process may have exported it while this one waited
        if problem is not None:
            say(quiet, f'exporting {path} ({problem})')
            data = export_graph(model, domain, img_size, metadata)
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    finally:
        release()
    return path, None


def graph_problem(path, metadata):
    """Why the file at `path` is not the graph `metadata` describes, in words; None when it is."""
    if not path.is_file():
        return 'once per checkpoint'
    recorded = read_metadata(path)
    if recorded is None:
        return 'the file there is damaged'
    for key in ('format', 'checkpoint_sha256', 'img_size'):
        if recorded.get(key) != metadata[key]:
            return {'format': 'the file there is of another export format',
                    'checkpoint_sha256': 'the file there belongs to another version of the checkpoint',
                    'img_size': 'the file there is for another image size'}[key]
    return None


def read_metadata(path):
    """The metadata of an ONNX file, or None when it is not a readable ONNX file."""
    import onnx
    try:
        graph = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(graph)
    except Exception:
        return None
    return {prop.key: prop.value for prop in graph.metadata_props}


def say(quiet, message):
    if not quiet:
        print(message, flush=True)


def session(source):
    """An ONNX Runtime session (CPU, as many threads as torch uses) of a graph file or its bytes."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(source) if isinstance(source, Path) else source, options,
                                    providers=['CPUExecutionProvider'])
    except Exception as error:
        where = f"'{source}'" if isinstance(source, Path) else 'the exported graph'
        raise UserError(f'ONNX Runtime cannot load {where}: {first_line(error)}; delete it to export it again, or '
                        f'pass --runtime torch') from error


# ----------------------------------------------------------------------------------------------- runtime

class OnnxModel:
    """A trained model whose `embed` runs its exported graphs in ONNX Runtime (the CPU); everything else it is asked
    (pictures, interpolation, backbone_tag, ...) the torch model answers. Each domain's graph is exported or loaded
    on its first use, so an index of photos never exports the sketch graph."""
    runtime = 'onnx'

    def __init__(self, model, checkpoint_path, img_size, method, quiet=False):
        self.model, self.checkpoint_path, self.img_size, self.method = model, Path(checkpoint_path), img_size, method
        self.quiet, self.sessions, self.sha256 = quiet, {}, file_sha256(checkpoint_path)

    def __getattr__(self, name):
        return getattr(self.__dict__['model'], name)

    def eval(self):
        return self

    def prepare(self, domains=(SKETCH, PHOTO)):
        """Export (if need be) and load the graphs of `domains` now; returns their paths (None: held in memory)."""
        return [self.session_of(domain)[1] for domain in domains]

    def session_of(self, domain):
        if domain not in self.sessions:
            path, data = ensure_graph(self.model, self.checkpoint_path, domain, self.img_size, self.sha256,
                                      self.method, self.quiet)
            self.sessions[domain] = (session(path if data is None else data), path)
        return self.sessions[domain]

    def embed(self, images, domains):
        """float32 embeddings (on the CPU) of uint8 images (B, 3, H, W), each taken as its domain."""
        images = images.cpu().contiguous()
        domains = domains.cpu()
        out = None
        for domain in domains.unique().tolist():
            rows = (domains == domain).nonzero()[:, 0]
            part = self.session_of(domain)[0].run(None, {'images': np.ascontiguousarray(images[rows].numpy())})[0]
            out = torch.empty(len(images), part.shape[1]) if out is None else out
            out[rows] = torch.from_numpy(part)
        return out
