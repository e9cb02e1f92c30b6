"""`--precision bf16` of test.py and search.py (docs/speed.md#bf16): the model embeds with a bfloat16 copy of its
networks under autocast, weights and inputs channels_last, through torch. On a CPU with AVX512-BF16 or AMX (AMD Zen 4
and later, Intel Sapphire Rapids and later) it embeds 2.0x to 3.1x as fast as fp32 torch (GPUs: not measured yet);
on an older CPU bf16 is emulated and slower than fp32, and a line says so. Embeddings stay within cosine 0.99 of
fp32's (the tests hold every method and backbone family to it); fp32 is the default, and every number in README is
fp32's. `--precision int8` is ONNX Runtime's: int8 graphs (zs_sbir/onnx_runtime.py), not a torch wrapper.

    model = with_precision(load_model(path, 'cpu', 'torch')[0], 'bf16')     # what load_model(..., precision='bf16') does
"""
import copy

import torch

PRECISIONS = ('fp32', 'bf16', 'int8')  # int8: ONNX Runtime's int8 graphs (zs_sbir/onnx_runtime.py)
PRECISION_HELP = ('bf16: embed in bfloat16 through torch, faster on CPUs with AVX512-BF16 or AMX, within cosine 0.99 '
                  'of fp32 (docs/speed.md#bf16); int8: through int8 ONNX graphs calibrated on the checkpoint\'s '
                  'training images, on the CPU (docs/speed.md#int8)')


def with_precision(model, precision, device='cpu'):
    """The model itself for fp32; for bf16, a model whose embed runs under bfloat16 autocast."""
    if precision != 'bf16':
        return model
    if torch.device(device).type == 'cpu' and cpu_lacks_bf16():
        print('note: this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): --precision bf16 is emulated here and '
              'slower than fp32', flush=True)
    return Bf16Model(model)


def cpu_lacks_bf16():
    """True where /proc/cpuinfo (Linux) lists neither AVX512-BF16 nor AMX-BF16; False where it cannot be read."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith('flags')), '').split()
    except OSError:
        return False
    return bool(flags) and not {'avx512_bf16', 'amx_bf16'} & set(flags)


class ModelWrapper:
    """A trained model seen through another embedding path: `embed` is the wrapper's own, everything else
    (pictures, interpolation, backbone_tag, ...) the wrapped fp32 torch model `model` answers (Bf16Model here,
    onnx_runtime.OnnxModel)."""

    def __getattr__(self, name):
        if name == 'model':  # not set yet (a copy or unpickling in progress): no endless lookup
            raise AttributeError(name)
        return getattr(self.model, name)

    def eval(self):
        return self


class Bf16Model(ModelWrapper):
    """A model whose `embed` runs a bfloat16 copy of its networks under autocast, channels_last (float32 out)."""
    precision = 'bf16'

    def __init__(self, model):
        self.model = model
        # bf16 weights once: autocast alone casts every fp32 weight again at every call, which on a CPU costs
        # ViT-B/32 more than its products (0.5x fp32's photos/s; with this copy 2x). channels_last: oneDNN's
        # blocked bf16 convolutions, 1.2x NCHW's. The copy holds half the model's size in memory.
        self.low = copy.deepcopy(model).to(torch.bfloat16, memory_format=torch.channels_last)

    def embed(self, images, domains):
        # products, convolutions and norms run in bf16; MSEdge's edge maps and max pooling in fp32 (its own
        # autocast-free islands), from the copy's bf16-rounded normalisation constants
        with torch.autocast(images.device.type, torch.bfloat16):
            return self.low.embed(images.contiguous(memory_format=torch.channels_last), domains).float()
