"""Shared fixtures: tiny image trees and a tiny generated dataset (32 px, a few images per class)."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)
# ZS_SBIR_TEST_DEVICE=cuda runs the tests that name a device on the GPU (the rest follow train.py's default,
# which is cuda wherever one is visible).
DEVICE = os.environ.get('ZS_SBIR_TEST_DEVICE', 'cpu')

from prepare import make_synthetic  # noqa: E402

TINY = dict(num_classes=6, num_val_classes=2, num_sketches=4, num_photos=4, num_val_photos=6, img_size=32, seed=3)


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


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """data_root of a tiny generated dataset: 4 train classes, 2 val classes, 32 px."""
    root = tmp_path_factory.mktemp('data')
    make_synthetic(root, **TINY)
    return root


def rng_images(n, size=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))
