"""ONNX Runtime for the embedding networks (docs/speed.md#onnx-runtime): a checkpoint's sketch and photo embedders,
exported once to ONNX files beside it, and a model whose `embed` runs them. On a CPU they embed 1.0x to 2.0x as fast
as torch (docs/speed.md has the figures), with the same embeddings to 1e-5 (the tests hold every method and backbone family to 1e-4).

    model, checkpoint = load_model('result/synthetic_msedge_resnet50_512_model.pth', runtime='onnx')  # retrieval.py
    python convert.py --onnx result/synthetic_msedge_resnet50_512_model.pth     # export now, not on first use

Each domain has its own graph, `{checkpoint stem}.sketch.onnx` and `.photo.onnx`: the method's `embedder(domain)`,
uint8 images (batch, 3, img_size, img_size) in, L2-normalised float32 embeddings out, the batch size free. A graph
records the sha256 of the checkpoint file it was exported from and this module's export format; a graph that does
not match them (the checkpoint was trained again or replaced, the file is damaged or was cut short) is exported
again. A graph is written whole (a temporary file, then a rename) under a lock, so two processes never write one
file at once; where nothing can be written beside the checkpoint the graphs live in memory only.

`--precision int8` (load_model(..., precision='int8')) runs int8 copies, `{stem}.sketch.int8.onnx` and
`.photo.int8.onnx`: ONNX Runtime's static quantization (QDQ; int8 weights per output channel, uint8 activations),
calibrated on 32 images of the domain from the checkpoint's training split, and kept and checked like the fp32 ones.
"""
import copy
import hashlib
import io
import logging
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils import PHOTO, SKETCH
from zs_sbir.cli import UserError, first_line
from zs_sbir.images import load_image, walk_image_files
from zs_sbir.precision import ModelWrapper
from zs_sbir.safe_files import acquire_lock, atomic_write, remove_stale_temporaries

ONNX_FORMAT = 'zs-sbir-onnx-1'  # bump when an export changes what a graph computes: older graphs are exported again
OPSET = 17
DOMAIN_NAMES = {SKETCH: 'sketch', PHOTO: 'photo'}
RUNTIMES = ('auto', 'torch', 'onnx')
CALIBRATION_IMAGES = 32  # per domain, spread over the training split's files (docs/speed.md#int8)


def onnx_available():
    try:
        import onnx  # noqa: F401  (torch's exporter writes through it)
        import onnxruntime  # noqa: F401
        return True
    except ImportError:
        return False


def choose_runtime(runtime, device, option='--runtime', precision='fp32'):
    """'torch' or 'onnx': auto is ONNX Runtime on a CPU (where it is the faster, docs/speed.md), torch on a GPU;
    --precision bf16 runs through torch, int8 through ONNX Runtime (on the CPU)."""
    on_cpu = torch.device(device).type == 'cpu'
    if precision == 'int8':
        if runtime == 'torch':
            raise UserError(f'--precision int8 runs through ONNX Runtime (int8 graphs): leave {option} out, or pass '
                            f'{option} onnx')
        if not on_cpu:
            raise UserError('--precision int8 runs on the CPU (onnxruntime\'s CPU build): pass --device cpu')
        if not onnx_available():
            raise UserError('--precision int8 needs the onnx and onnxruntime packages: pip install -r '
                            'requirements.txt, or --precision fp32')
        return 'onnx'
    if precision == 'bf16':
        if runtime == 'onnx':
            raise UserError(f'--precision bf16 embeds through torch (ONNX Runtime has no bf16 convolutions on a CPU): '
                            f'leave {option} out, or pass {option} torch')
        return 'torch'
    if runtime == 'auto':
        return 'onnx' if on_cpu and onnx_available() else 'torch'
    if runtime == 'onnx' and not on_cpu:
        raise UserError(f'{option} onnx runs on the CPU (onnxruntime\'s CPU build): pass --device cpu, or {option} torch')
    if runtime == 'onnx' and not onnx_available():
        raise UserError(f'{option} onnx needs the onnx and onnxruntime packages: pip install -r requirements.txt, '
                        f'or {option} torch')
    return runtime


def graph_path(checkpoint_path, domain, precision='fp32'):
    checkpoint_path = Path(checkpoint_path)
    tag = '' if precision == 'fp32' else f'.{precision}'
    return checkpoint_path.with_name(f'{checkpoint_path.stem}.{DOMAIN_NAMES[domain]}{tag}.onnx')


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
    pools its 2x2 map up to 7x7) is computed as one product with a constant averaging matrix: the same bins and
    values, in operations ONNX has (its exporter refuses the non-divisible case)."""
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
    def vits(net):
        return [m for m in net.modules() if getattr(m, 'dynamic_img_size', False) and hasattr(m, 'set_input_size')]
    if not vits(model):
        return model
    model = copy.deepcopy(model)
    for vit in vits(model):
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
    onnx.helper.set_model_props(graph, metadata)
    return graph.SerializeToString()


def calibration_images(folder, domain, img_size, interpolation):
    """CALIBRATION_IMAGES uint8 images (N, 3, img_size, img_size) of `domain`, spread over the sorted image files
    under folder/sketch or folder/photo (a training split)."""
    root = Path(folder) / DOMAIN_NAMES[domain]
    files = walk_image_files(root)[0] if root.is_dir() else []
    if not files:
        raise UserError(f"--precision int8 calibrates on the checkpoint's training images, and '{root}' has none: "
                        f"run where its dataset is (its --data_root), or use --precision fp32")
    picked = [files[i] for i in np.linspace(0, len(files) - 1, min(len(files), CALIBRATION_IMAGES)).astype(int)]
    return np.stack([load_image(root / f, img_size, interpolation).numpy() for f in picked])


def quantize_graph(data, images, metadata):
    """The int8 ONNX bytes of fp32 graph bytes: static QDQ quantization calibrated on `images`."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{'images': images[i:i + 8]} for i in range(0, len(images), 8)])

        def get_next(self):
            return next(self.batches, None)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice on pre-processing, which quant_pre_process does
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fp32, pre, int8 = (str(Path(tmp) / name) for name in ('fp32.onnx', 'pre.onnx', 'int8.onnx'))
            Path(fp32).write_bytes(data)
            quant_pre_process(fp32, pre, skip_symbolic_shape=True)
            quantize_static(pre, int8, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            graph = onnx.load(int8)
    finally:
        root.setLevel(level)
    onnx.helper.set_model_props(graph, metadata)
    return graph.SerializeToString()


def graph_bytes(model, domain, img_size, metadata, calibration):
    """The graph `metadata` describes: exported, and for int8 quantized on images from `calibration`."""
    data = export_graph(model, domain, img_size, metadata)
    if metadata.get('precision') != 'int8':
        return data
    images = calibration_images(calibration, domain, img_size, model.interpolation)
    try:
        return quantize_graph(data, images, metadata)
    except Exception as error:  # ONNX Runtime's quantizer: an operator it cannot handle, a full temporary disk
        raise UserError(f'the int8 quantization of the {DOMAIN_NAMES[domain]} graph failed: {first_line(error)} '
                        f'(use --precision fp32)') from error


def ensure_graph(model, checkpoint_path, domain, img_size, sha256, method=None, quiet=False, precision='fp32',
                 calibration=None):
    """(ONNX Runtime session, path or None) of the up-to-date graph of one domain: the file beside the checkpoint
    when it matches, else exported again and saved there; held in memory only (path None) where nothing can be
    written beside the checkpoint (a read-only folder, a full disk, a name too long). precision 'int8': the int8
    graph, calibrated on the training split at `calibration`."""
    checkpoint_path = Path(checkpoint_path)
    path = graph_path(checkpoint_path, domain, precision)
    metadata = {'format': ONNX_FORMAT, 'checkpoint_sha256': sha256, 'checkpoint': checkpoint_path.name,
                'method': str(method), 'img_size': str(img_size), 'domain': DOMAIN_NAMES[domain],
                'torch': torch.__version__}
    if precision == 'int8':
        metadata.update(precision='int8', calibration=f'{CALIBRATION_IMAGES} images of {calibration}')
    try:
        found, problem = current_session(path, metadata)
        if found is not None:
            return found, path
        release = acquire_lock(path.with_name(f'.{path.name}.lock'), f"'{path}'", wait=3600)
    except OSError as error:
        return in_memory(model, checkpoint_path, domain, img_size, metadata, quiet, error, calibration), None
    try:
        found, problem = current_session(path, metadata)  # another process may have exported it meanwhile
        if found is not None:
            return found, path
        if path.is_dir():
            raise UserError(f"'{path}' is a folder, where the {DOMAIN_NAMES[domain]} graph of '{checkpoint_path}' "
                            f"goes: move it away, or pass --runtime torch")
        say(quiet, f'exporting {path} ({problem})' if precision == 'fp32' else
            f'exporting {path} ({problem}), calibrated on {metadata["calibration"]}')
        data = graph_bytes(model, domain, img_size, metadata, calibration)
        remove_stale_temporaries(path)  # left by a process killed while writing (we hold the lock)
        try:
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        except UserError as error:  # a full disk: the run goes on with the graph in memory
            say(quiet, f'{error}; this run keeps the graph in memory')
            return session(data), None
        return session(data), path
    finally:
        release()


def in_memory(model, checkpoint_path, domain, img_size, metadata, quiet, error, calibration=None):
    """A session of a graph exported into memory, for a checkpoint beside which nothing can be written."""
    say(quiet, f'exporting the {DOMAIN_NAMES[domain]} graph of {checkpoint_path} to ONNX in memory (nothing can be '
               f'written beside it: {error.strerror or error})')
    return session(graph_bytes(model, domain, img_size, metadata, calibration))


def current_session(path, metadata):
    """(session, None) of the file at `path` when it is the graph `metadata` describes, else (None, why not)."""
    if not path.is_file():
        return None, 'once per checkpoint'  # (a folder there is refused by ensure_graph)
    data = path.read_bytes()  # checked and loaded from the same bytes: a file replaced meanwhile cannot slip in
    try:
        found = session(data)
    except UserError:
        return None, 'the file there is damaged'
    recorded = found.get_modelmeta().custom_metadata_map
    why = {'format': 'the file there is of another export format',
           'checkpoint_sha256': 'the file there belongs to another version of the checkpoint',
           'img_size': 'the file there is for another image size',
           'domain': 'the file there is the graph of the other domain',
           'precision': 'the file there is not an int8 graph', 'calibration': 'the file there was calibrated elsewhere'}
    for key, problem in why.items():
        if recorded.get(key) != metadata.get(key):
            return None, problem
    return found, None


def read_metadata(path):
    """The metadata an ONNX file records."""
    return session(Path(path).read_bytes()).get_modelmeta().custom_metadata_map


def say(quiet, message):
    if not quiet:
        print(message, flush=True)


def session(data):
    """An ONNX Runtime session (CPU, as many threads as torch uses) of a graph's bytes."""
    import onnxruntime as ort
    ort.disable_telemetry_events()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(data, options, providers=['CPUExecutionProvider'])
    except Exception as error:
        raise UserError(f'ONNX Runtime cannot load the graph: {first_line(error)}') from error


# ----------------------------------------------------------------------------------------------- runtime

class OnnxModel(ModelWrapper):
    """A trained model whose `embed` runs its exported graphs in ONNX Runtime (the CPU); everything else it is asked
    (pictures, interpolation, backbone_tag, ...) the torch model answers. Each domain's graph is exported or loaded
    on its first use, so an index of photos never exports the sketch graph. `sha256`: that of the checkpoint file the
    model was loaded from."""
    runtime = 'onnx'

    def __init__(self, model, checkpoint_path, img_size, method, sha256, quiet=False, precision='fp32',
                 calibration=None):
        self.model, self.checkpoint_path, self.img_size, self.method = model, Path(checkpoint_path), img_size, method
        self.quiet, self.sessions, self.sha256 = quiet, {}, sha256
        self.precision, self.calibration = precision, calibration  # int8: graphs calibrated on that training split

    def prepare(self, domains=(SKETCH, PHOTO)):
        """Export (if need be) and load the graphs of `domains` now; returns their paths (None: held in memory)."""
        return [self.session_of(domain)[1] for domain in domains]

    def session_of(self, domain):
        if domain not in self.sessions:
            self.sessions[domain] = ensure_graph(self.model, self.checkpoint_path, domain, self.img_size, self.sha256,
                                                 self.method, self.quiet, self.precision, self.calibration)
        return self.sessions[domain]

    def embed(self, images, domains):
        """float32 embeddings (on the CPU) of uint8 images (B, 3, H, W), each taken as its domain."""
        images, domains = images.cpu().contiguous(), domains.cpu()
        parts = {domain: (rows, self.session_of(domain)[0].run(None, {'images': images[rows].numpy()})[0])
                 for domain in domains.unique().tolist() for rows in [(domains == domain).nonzero()[:, 0]]}
        if not parts:  # an empty batch
            width = self.session_of(PHOTO)[0].get_outputs()[0].shape[1]
            return torch.empty(0, width)
        out = torch.empty(len(images), next(iter(parts.values()))[1].shape[1])
        for rows, part in parts.values():
            out[rows] = torch.from_numpy(part)
        return out
