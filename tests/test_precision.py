"""--precision bf16 (zs_sbir/precision.py): every method and backbone family the CLI takes embeds within cosine 0.99
of fp32, really in bf16 (not fp32 under another name), and leaves fp32's embeddings as they were; test.py and
search.py take it on every path that embeds; --runtime onnx with it is one line. --precision int8: ONNX Runtime's
int8 graphs for every family but VGG16, calibrated where the command says, and what cannot be is one line."""
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import search
import test as test_script
from helpers import DEVICE, TINY_CLIP, build, check_cli, rng_images, saved_checkpoint
from utils import PHOTO, SKETCH
from zs_sbir.cli import UserError
from zs_sbir.onnx_runtime import choose_runtime, graph_path, read_metadata
from zs_sbir.precision import Bf16Model
from zs_sbir.retrieval import embed, load_model
from zs_sbir.search_index import Searcher

DOMAINS = torch.tensor([SKETCH, PHOTO, PHOTO, SKETCH, PHOTO])


@pytest.mark.parametrize('method, backbone, size', [
    ('acnet', 'resnet18', 32), ('msedge', 'resnet18', 32),
    ('acnet', 'convnext_atto', 32), ('msedge', 'convnext_atto', 32),
    ('acnet', 'vit_tiny_patch16_224', 32), ('msedge', 'vit_small_patch14_dinov2', 32),
    ('acnet', 'vgg16', 64), ('clipprompt', TINY_CLIP, 32),
])
def test_bf16_embeds_close_to_fp32_for_every_family(tmp_path, method, backbone, size):
    path = saved_checkpoint(tmp_path, method, backbone, size)
    fp32, _ = load_model(path, 'cpu', 'torch')
    images = rng_images(len(DOMAINS), size, seed=1)
    before = embed(fp32, images, DOMAINS)
    bf16, _ = load_model(path, 'cpu', 'torch', precision='bf16')
    assert isinstance(bf16, Bf16Model)
    low = embed(bf16, images, DOMAINS)
    assert low.dtype == torch.float32 and low.shape == before.shape
    assert F.cosine_similarity(low, before).min() > 0.99
    assert (low - before).abs().max() > 1e-4  # computed in bf16 (8 bits of mantissa), not in fp32
    assert torch.equal(embed(bf16.model, images, DOMAINS), before)  # the fp32 model beside it: as it was


@pytest.fixture()
def bf16_calls(monkeypatch):
    """How many batches each Bf16Model embedded: proof that a command's --precision bf16 reached its embedding."""
    calls = []
    real = Bf16Model.embed

    def counted(self, images, domains):
        calls.append(len(images))
        return real(self, images, domains)
    monkeypatch.setattr(Bf16Model, 'embed', counted)
    return calls


def test_test_py_and_search_py_take_bf16(runs, checkpoints, gallery, tmp_path, capsys, bf16_calls):
    for method, checkpoint in runs.items():
        scores = {}
        for precision in ('fp32', 'bf16'):
            before = len(bf16_calls)
            scores[precision] = test_script.main(['--evaluate', '--data_base', str(checkpoint), '--workers', '0',
                                                  '--runtime', 'torch', '--precision', precision, '--gzs'])
            assert (len(bf16_calls) > before) == (precision == 'bf16')
        assert scores['fp32'].keys() == scores['bf16'].keys()
        # the same split and model: a metric moves only where bf16 reorders near-equal similarities; on this data
        # one reordered pair moves one by about 0.005 (the CPU's bf16 moved them by 0.0052 at most), and a GPU's
        # bf16 kernels round differently: a few such pairs are allowed
        moved = {k: abs(scores['fp32'][k] - scores['bf16'][k]) for k in scores['fp32']}
        assert max(moved.values()) < 0.03, (method, moved)
        before = len(bf16_calls)
        test_script.main(['--data_base', str(checkpoint), '--num', '5', '--save_root', str(tmp_path / method),
                          '--device', 'cpu', '--precision', 'bf16'])  # retrieval: the query, and MSEdge's pictures
        assert bf16_calls[before:] == [1, 1]  # one query per val class, each embedded in bf16
        assert len(list((tmp_path / method).glob('*.png'))) == 2
    metas = {precision: build(checkpoints[0], gallery, tmp_path / precision, '--precision', precision)
             for precision in ('fp32', 'bf16')}
    assert metas['fp32']['model'] == metas['bf16']['model']
    vectors = {p: np.load(next((tmp_path / p).glob('vectors-*.npy'))) for p in metas}
    cosines = (vectors['fp32'] * vectors['bf16']).sum(1)  # both L2-normalised
    assert cosines.min() > 0.99 and np.abs(vectors['fp32'] - vectors['bf16']).max() > 1e-4
    sketch = next(gallery.rglob('*.*'))
    before = len(bf16_calls)
    hits = search.main(['query', '--index', str(tmp_path / 'fp32'), '--query_name', str(sketch), '--num', '5',
                        '--save_root', str(tmp_path / 'q'), '--device', DEVICE, '--precision', 'bf16'])[0]
    assert len(hits) == 5 and len(bf16_calls) - before == 2  # the warm-up and the query (serve shares this Searcher)
    assert isinstance(Searcher(tmp_path / 'fp32', precision='bf16').model, Bf16Model)


def test_training_free_takes_bf16(tiny_data, bf16_calls):
    common = ['--evaluate', '--training_free', '--no_pretrained', '--data_root', str(tiny_data), '--data_name',
              'synthetic', '--img_size', '32', '--backbone_type', 'resnet18', '--workers', '0', '--device', 'cpu']
    scores = {precision: test_script.main([*common, '--precision', precision]) for precision in ('fp32', 'bf16')}
    assert bf16_calls and all(abs(scores['fp32'][k] - scores['bf16'][k]) < 0.01 for k in scores['fp32'])


def test_a_bf16_copy_can_be_copied_and_a_cpu_without_bf16_is_told(monkeypatch, capsys, tmp_path):
    import copy
    from zs_sbir import precision
    model = Bf16Model(torch.nn.Linear(2, 2))
    assert isinstance(copy.copy(model), Bf16Model) and isinstance(copy.deepcopy(model), Bf16Model)
    flags = tmp_path / 'cpuinfo'
    for line, lacks in (('flags\t: fpu avx2 avx512f', True), ('flags\t: fpu avx512f avx512_bf16', False),
                        ('flags\t: fpu amx_bf16 amx_tile', False), ('processor\t: 0', False)):
        flags.write_text(line + '\n')
        real_open = open
        monkeypatch.setattr('builtins.open', lambda path, *a, **k: real_open(flags if path == '/proc/cpuinfo' else path,
                                                                             *a, **k))
        assert precision.cpu_lacks_bf16() is lacks
        precision.with_precision(torch.nn.Linear(2, 2), 'bf16', 'cpu')
        assert ('emulated here and slower than fp32' in capsys.readouterr().out) is lacks
        monkeypatch.undo()


def test_bf16_with_onnx_is_one_line(tmp_path, capsys, runs):
    assert choose_runtime('auto', 'cpu', precision='bf16') == 'torch'
    with pytest.raises(UserError, match='--precision bf16 embeds through torch'):
        choose_runtime('onnx', 'cpu', precision='bf16')
    check_cli(capsys, test_script.main, ['--evaluate', '--data_base', runs['acnet'], '--runtime', 'onnx',
                                         '--precision', 'bf16'], '--precision bf16 embeds through torch',
              [runs['acnet'].parent])
    check_cli(capsys, search.main, ['index', '--data_base', runs['acnet'], '--photos', tmp_path, '--index',
                                    tmp_path / 'i', '--runtime', 'onnx', '--precision', 'bf16'],
              '--precision bf16 embeds through torch', [runs['acnet'].parent])
    check_cli(capsys, test_script.main, ['--evaluate', '--data_base', runs['acnet'], '--precision', 'fp16'],
              "invalid choice: 'fp16'")
    for argv in (['index', '--data_base', runs['acnet'], '--photos', tmp_path], ['query', '--query_name', 'x.png'],
                 ['serve']):
        # the device is checked before the runtime it decides
        check_cli(capsys, search.main, [*argv, '--index', tmp_path / 'i', '--device', 'foo', '--precision', 'bf16'],
                  "--device 'foo' is not a device name")


# ------------------------------------------------------------------------------------------------- int8

@pytest.mark.parametrize('method, backbone, size', [
    ('acnet', 'resnet18', 32), ('msedge', 'resnet18', 32), ('acnet', 'convnext_atto', 32),
    ('acnet', 'vit_tiny_patch16_224', 32), ('msedge', 'vit_small_patch14_dinov2', 32), ('clipprompt', TINY_CLIP, 32),
])  # not VGG16: its 550-MB graphs take a minute to quantize (docs/speed.md#int8)
def test_int8_embeds_close_to_fp32_for_every_family(tmp_path, tiny_data, method, backbone, size):
    path = saved_checkpoint(tmp_path, method, backbone, size)
    calibration = tiny_data / 'synthetic' / 'train'
    fp32, _ = load_model(path, 'cpu', 'torch')
    int8, _ = load_model(path, 'cpu', 'onnx', quiet=True, precision='int8', calibration=calibration)
    images = rng_images(len(DOMAINS), size, seed=1)
    before, low = embed(fp32, images, DOMAINS), embed(int8, images, DOMAINS)
    assert low.dtype == torch.float32 and low.shape == before.shape
    assert F.cosine_similarity(low, before).min() > 0.95, F.cosine_similarity(low, before)
    assert (low - before).abs().max() > 1e-4  # quantized, not the fp32 graph under another name
    load_model(path, 'cpu', 'onnx', quiet=True)[0].prepare()  # the fp32 graphs, to compare sizes
    for domain in (SKETCH, PHOTO):
        meta = read_metadata(graph_path(path, domain, 'int8'))
        assert meta['precision'] == 'int8' and meta['calibration'] == f'32 images of {calibration}'
        assert graph_path(path, domain, 'int8').stat().st_size < graph_path(path, domain).stat().st_size / 2 or \
            method == 'clipprompt'  # (the tiny CLIP's graphs are mostly not weights)
    assert torch.equal(embed(int8.model, images, DOMAINS), before)  # the fp32 model beside it: as it was


def test_test_py_and_search_py_take_int8(runs, tiny_data, gallery, tmp_path, capsys):
    for method, trained in runs.items():
        checkpoint = tmp_path / method / trained.name  # a private copy: the int8 graphs are written beside it
        checkpoint.parent.mkdir()
        checkpoint.write_bytes(trained.read_bytes())
        scores = {precision: test_script.main(['--evaluate', '--data_base', str(checkpoint), '--workers', '0',
                                               '--device', 'cpu', '--precision', precision])
                  for precision in ('fp32', 'int8')}
        assert f'calibrated on 32 images of {tiny_data / "synthetic" / "train"}' in capsys.readouterr().out
        moved = {k: abs(scores['fp32'][k] - scores['int8'][k]) for k in scores['fp32']}
        assert max(moved.values()) < 0.03, (method, moved)  # as bf16's (test_test_py_and_search_py_take_bf16)
        assert graph_path(checkpoint, SKETCH, 'int8').is_file() and graph_path(checkpoint, PHOTO, 'int8').is_file()
    metas = {precision: build(checkpoint, gallery, tmp_path / precision, '--device', 'cpu', '--precision', precision)
             for precision in ('fp32', 'int8')}
    assert metas['fp32']['model'] == metas['int8']['model']  # one model: an fp32 index takes int8 queries
    vectors = {p: np.load(next((tmp_path / p).glob('vectors-*.npy'))) for p in metas}
    cosines = (vectors['fp32'] * vectors['int8']).sum(1)
    assert cosines.min() > 0.95 and np.abs(vectors['fp32'] - vectors['int8']).max() > 1e-4
    hits = search.main(['query', '--index', str(tmp_path / 'fp32'), '--query_name', str(next(gallery.rglob('*.*'))),
                        '--num', '5', '--save_root', str(tmp_path / 'q'), '--device', 'cpu', '--precision', 'int8'])[0]
    assert len(hits) == 5
    searcher = Searcher(tmp_path / 'fp32', runtime='auto', precision='int8')
    assert searcher.model.precision == 'int8'


def test_int8_requests_that_cannot_be_are_one_line(runs, tiny_data, tmp_path, capsys, monkeypatch, gallery):
    assert choose_runtime('auto', 'cpu', precision='int8') == 'onnx'
    with pytest.raises(UserError, match='--precision int8 runs on the CPU'):
        choose_runtime('auto', 'cuda', precision='int8')
    checkpoint = tmp_path / runs['acnet'].name
    checkpoint.write_bytes(runs['acnet'].read_bytes())
    check_cli(capsys, test_script.main, ['--evaluate', '--data_base', checkpoint, '--runtime', 'torch',
                                         '--precision', 'int8'], '--precision int8 runs through ONNX Runtime',
              [tmp_path])
    check_cli(capsys, test_script.main, ['--evaluate', '--training_free', '--no_pretrained', '--data_root', tiny_data,
                                         '--data_name', 'synthetic', '--device', 'cpu', '--precision', 'int8'],
              '--training_free has none', [tmp_path])
    check_cli(capsys, search.main, ['index', '--data_base', checkpoint, '--photos', tmp_path, '--index',
                                    tmp_path / 'i', '--runtime', 'torch', '--precision', 'int8'],
              '--precision int8 runs through ONNX Runtime', [tmp_path])
    # calibration images are the checkpoint's training split: where it is gone, one line naming the folder
    with pytest.raises(UserError, match=r"calibrates on the checkpoint's training images, and '.*nowhere/sketch' has none"):
        load_model(checkpoint, 'cpu', 'onnx', quiet=True, precision='int8', calibration=tmp_path / 'nowhere')[0] \
            .prepare()
    assert not graph_path(checkpoint, SKETCH, 'int8').exists()
    # test.py calibrates on the dataset it is given (--data_root), here one whose training split is gone
    moved = tmp_path / 'moved'
    shutil.copytree(tiny_data / 'synthetic' / 'val', moved / 'synthetic' / 'val')
    check_cli(capsys, test_script.main, ['--evaluate', '--data_base', checkpoint, '--data_root', moved, '--device',
                                         'cpu', '--workers', '0', '--precision', 'int8'],
              "training images, and '" + re.escape(str(moved / 'synthetic' / 'train')) + '/', [tmp_path])
    # search.py index: a checkpoint whose recorded (relative) data_root is not here is told before any work
    monkeypatch.chdir(tmp_path)
    elsewhere = saved_checkpoint(tmp_path, 'acnet', 'resnet18', 32)  # trained on data/synthetic, not here
    check_cli(capsys, search.main, ['index', '--data_base', elsewhere, '--photos', gallery, '--index', tmp_path / 'ix',
                                    '--device', 'cpu', '--precision', 'int8'],
              "training images, and 'data/synthetic/train/photo' has none", [tmp_path])
    assert not (tmp_path / 'ix').exists()
    # an fp32 graph where the int8 one goes is quantized again, with a line saying why
    load_model(checkpoint, 'cpu', 'onnx', quiet=True)[0].prepare()
    graph_path(checkpoint, SKETCH, 'int8').write_bytes(graph_path(checkpoint, SKETCH).read_bytes())
    load_model(checkpoint, 'cpu', 'onnx', precision='int8')[0].prepare([SKETCH])
    assert 'sketch.int8.onnx (the file there is not an int8 graph)' in capsys.readouterr().out
    assert read_metadata(graph_path(checkpoint, SKETCH, 'int8'))['precision'] == 'int8'
