"""The fixtures the tests share: a tiny generated dataset (32 px, a few images per class), tiny trained runs of each
method, two MSEdge checkpoints for search.py, and a folder of photos. The helpers are in helpers.py."""
import shutil

import pytest

from helpers import DEVICE, TINY  # helpers puts the repository root on sys.path
from train import train
from zs_sbir.config import parse_args
from zs_sbir.synthetic import make_synthetic


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """data_root of a tiny generated dataset: 4 train classes, 2 val classes, 32 px."""
    root = tmp_path_factory.mktemp('data')
    make_synthetic(root, **TINY)
    return root


def tiny_run(data_root, save_root, method, epochs, *extra):
    """A tiny run (32 px, 8-d, random init, lr 1e-3); `extra` options come last, so they win."""
    train(parse_args(['--method', method, '--data_root', str(data_root), '--data_name', 'synthetic', '--no_pretrained',
                      '--img_size', '32', '--batch_size', '8', '--epochs', str(epochs), '--warmup', '0', '--workers',
                      '0', '--lr', '1e-3', '--emb_dim', '8', '--device', DEVICE, '--save_root', str(save_root),
                      *extra]))


@pytest.fixture(scope='session')
def runs(tiny_data, tmp_path_factory):
    """A 3-epoch ACNet run and a 2-epoch MSEdge run (8-d, random init): {method: checkpoint path}."""
    out = tmp_path_factory.mktemp('runs')
    for method, epochs in (('acnet', 3), ('msedge', 2)):
        tiny_run(tiny_data, out, method, epochs)
    return {m: out / f'synthetic_{m}_resnet50_8_model.pth' for m in ('acnet', 'msedge')}


@pytest.fixture(scope='session')
def checkpoints(tiny_data, tmp_path_factory):
    """Two tiny MSEdge runs (seeds 1 and 2): the model an index is built with, and another one."""
    out = tmp_path_factory.mktemp('search-runs')
    for seed in ('1', '2'):
        tiny_run(tiny_data, out / seed, 'msedge', 1, '--seed', seed, '--lr', '1e-5')
    return [out / seed / 'synthetic_msedge_resnet50_8_model.pth' for seed in ('1', '2')]


@pytest.fixture()
def gallery(tiny_data, tmp_path):
    """Photos in two class folders: line drawings (the dataset's sketches) and photos."""
    root = tmp_path / 'gallery'
    for side, name in (('sketch', 'drawing'), ('photo', 'photo')):
        (root / name).mkdir(parents=True)
        for path in sorted((tiny_data / 'synthetic' / 'train' / side).rglob('*.*'))[:10]:
            shutil.copy(path, root / name / f'{path.parent.name}_{path.name}')
    return root
