"""Helpers the tests share, imported by name (`from helpers import tiny, check_cli`); the fixtures are in conftest.py."""
import hashlib
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)
# ZS_SBIR_TEST_DEVICE=cuda runs the tests that name a device on the GPU (the rest follow train.py's default,
# which is cuda wherever one is visible).
DEVICE = os.environ.get('ZS_SBIR_TEST_DEVICE', 'cpu')
# Tests compare GPU results with references at 1e-5 and rankings of near-tied random-init embeddings:
# full fp32 convolutions (cuDNN's default TF32 keeps 10 mantissa bits).
torch.backends.cudnn.allow_tf32 = False
# Tests of bit-for-bit equality between two training runs: CUDA has no deterministic kernel for some
# backward passes these models use (reflection padding, bilinear upsampling).
BITWISE = ('--device', 'cpu')

import search  # noqa: E402
from methods import create_model  # noqa: E402
from utils import METRIC_NAMES  # noqa: E402
from zs_sbir.checkpoint import checkpoint_record  # noqa: E402
from zs_sbir.config import parse_args  # noqa: E402
from zs_sbir.safe_files import save_torch, write_csv  # noqa: E402

TINY = dict(num_classes=6, num_val_classes=2, num_sketches=4, num_photos=4, num_val_photos=6, img_size=32, seed=3)
# A tiny open_clip model (2 blocks of width 64, 32-d embeddings) for ClipPrompt's tests: --backbone_type ViT-Tiny-16
TINY_CLIP = 'ViT-Tiny-16'


def register_tiny_clip():
    import open_clip
    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(ROOT / 'tests' / 'fixtures' / 'open_clip')


register_tiny_clip()


def make_model(method, num_classes=3, backbone_type='resnet50', emb_dim=512, pretrained=True, weights=None, **options):
    """A method's networks for `num_classes` training classes (create_model with train.py's option names)."""
    return create_model(method, [f'class{i}' for i in range(num_classes)],
                        dict(backbone_type=backbone_type, emb_dim=emb_dim, **options), pretrained, weights)


def private_copy(tiny_data, tmp_path):
    """A copy of the shared tiny dataset, for tests that write into it (a cache folder): test_data digests the
    shared one, and a test that wrote there would make the suite's outcome depend on its order."""
    shutil.copytree(tiny_data / 'synthetic', tmp_path / 'synthetic')
    return tmp_path


def saved_checkpoint(folder, method, backbone, size, seed=0):
    """A random-init checkpoint of `method` (8-d where the size is free) as train.py writes one."""
    torch.manual_seed(seed)
    emb = [] if method == 'clipprompt' else ['--emb_dim', '8']
    options = parse_args(['--method', method, '--backbone_type', backbone, '--img_size', str(size), '--data_name',
                          'synthetic', '--no_pretrained', *emb])
    model = make_model(method, 3, backbone, options.emb_dim, pretrained=False, img_size=size)
    path = folder / f'synthetic_{method}_{backbone}_model.pth'
    save_torch(checkpoint_record(model, options, train_classes=['a', 'b', 'c']), path)
    return path


def lr(value=1e-5):
    """The options make_optimizers reads, at learning rate `value`."""
    return Namespace(lr=value)

def write_image(path, mode='RGB', size=(12, 10), colour=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is None:
        colour = {'RGB': (200, 30, 40), 'L': 90, 'RGBA': (10, 20, 30, 0), 'LA': (90, 255), 'P': 3}[mode]
    Image.new(mode, size, colour).save(path, format=fmt)
    return path


def make_tree(root, layout):
    """layout: {split: {side: {class: number_of_images}}} -> <root>/<split>/<side>/<class>/img_i.png"""
    for split, sides in layout.items():
        for side, classes in sides.items():
            for name, count in classes.items():
                (root / split / side / name).mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    write_image(root / split / side / name / f'img_{i}.png', size=(4, 4))
    return root


def sketch_like(path, i):
    """A unique small sketch (for i < 256): dark strokes on white."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((16, 16), 255, np.uint8)
    pixels[i % 16, :] = pixels[:, (i // 16) % 16] = 20
    Image.fromarray(pixels, 'L').save(path)


def photo_like(path, i):
    """A unique small colourful photo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path, format='PNG')


def raw_quickdraw(root, classes=None, per_class=1, sketch_top='QuickDraw_sketches_final',
                  photo_top='QuickDraw_images_final'):
    """The raw QuickDraw-Extended layout: <sketch_top>/<class>/<n>.png sketches and <photo_top>/<class>/image_<n>.jpg
    photos of every class (default: all 110), `per_class` each, every file unique; n counts over all classes."""
    from prepare import read_class_list
    for c, name in enumerate(classes or read_class_list('quickdraw_all')):
        for n in range(c * per_class, (c + 1) * per_class):
            sketch_like(root / sketch_top / name / f'{n}.png', n)
            photo_like(root / photo_top / name / f'image_{n}.jpg', n)
    return root


def kill_self(*args):
    """A worker's job that dies as an out-of-memory kill does: SIGKILL, no exception."""
    os.kill(os.getpid(), signal.SIGKILL)


def double_or_die(item):
    if item == 'die':
        kill_self()
    return item * 2


def rng_images(n, size=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))


def tiny(data_root, save_root, *extra):
    """train.py options for a tiny, fast, repeatable run on the tiny dataset (random init, 32 px, 8-d);
    options in `extra` come last, so they win."""
    return ['--data_root', str(data_root), '--data_name', 'synthetic', '--no_pretrained', '--img_size', '32',
            '--batch_size', '8', '--workers', '0', '--lr', '1e-3', '--emb_dim', '8', '--device', DEVICE,
            '--deterministic', '--save_root', str(save_root), *map(str, extra)]


def digests(*folders):
    """Every file under the folders (links followed) with the SHA-256 of its bytes."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob('*')) if p.is_file()}


def check_cli(capsys, main, argv, match, unchanged=()):
    """main(argv) exits 2 with one line on stderr matching the regex `match`, no traceback, and every file
    under the `unchanged` folders byte-identical."""
    before = digests(*unchanged)
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert digests(*unchanged) == before
    return err


def cli_checker(main, literal=False):
    """check_cli for one command: check(capsys, argv, match, unchanged=()); `literal`: match is plain text."""
    def check(capsys, argv, match, unchanged=()):
        return check_cli(capsys, main, argv, re.escape(match) if literal else match, unchanged)
    return check


def fake_run(folder, prefix, precise, heldout=None, select_on='test', metric_scale=1.0, epochs=None, seed=1):
    """A results CSV whose metrics are all `precise[e] * metric_scale` at epoch e (+ held-out columns), and the
    _last.pth of a run started for `epochs` (default: as many as there are values) that got to the last of them."""
    rows = []
    for epoch, value in enumerate(precise, 1):
        row = {'epoch': epoch, 'class_loss': 1.0, **{m: value * metric_scale for m in METRIC_NAMES},
               'precise': value}
        if heldout is not None:
            row['heldout_precise'] = heldout[epoch - 1]
        row['select_on'] = select_on
        rows.append(row)
    write_csv(rows, folder / f'{prefix}_results.csv')
    torch.save({'format': 'zs-sbir-checkpoint-2', 'args': {'epochs': epochs or len(precise), 'eval_queries': 0, 'seed': seed},
                'epoch': len(precise)}, folder / f'{prefix}_last.pth')


def build(checkpoint, gallery, index, *extra):
    return search.main(['index', '--data_base', str(checkpoint), '--photos', str(gallery), '--index', str(index),
                        '--workers', '0', '--device', DEVICE, *map(str, extra)])


def drawn_x(size=384):
    image = Image.new('RGB', (size, size), 'white')
    draw = ImageDraw.Draw(image)
    draw.line([(size * 0.4, size * 0.25), (size * 0.65, size * 0.75)], fill='black', width=4)
    draw.line([(size * 0.65, size * 0.25), (size * 0.4, size * 0.75)], fill='black', width=4)
    return image


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def running(server):
    """A uvicorn server started in a thread, once it accepts connections."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    assert server.started
    return server
