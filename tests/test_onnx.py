"""ONNX Runtime (zs_sbir/onnx_runtime.py): every method and backbone family the CLI takes embeds as torch does (1e-4),
in any batch size and domain mix; the torch model is left as it was; the same metrics and top-10 photos on the
generated data through test.py and search.py; a damaged or stale graph is exported again; a read-only folder keeps
its graphs in memory; bad requests are one line."""
import re

import pytest
import torch
import torch.nn.functional as F

import convert
import search
import test as test_script
from helpers import TINY_CLIP, build, check_cli, rng_images, saved_checkpoint
from utils import PHOTO, SKETCH
from zs_sbir.cli import UserError
from zs_sbir.onnx_runtime import OnnxModel, choose_runtime, explicit_adaptive_pooling, graph_path, read_metadata
from zs_sbir.retrieval import embed, load_model

DOMAINS = torch.tensor([SKETCH, PHOTO, PHOTO, SKETCH, PHOTO])


def embeddings(model, images, domains):
    return torch.cat([embed(model, images[i:i + n], domains[i:i + n]) for i, n in ((0, 1), (1, 4))])


@pytest.mark.parametrize('method, backbone, size', [
    ('acnet', 'resnet18', 32), ('msedge', 'resnet18', 32),                         # ResNet (the seeds' family)
    ('acnet', 'convnext_atto', 32), ('msedge', 'convnext_atto', 32),               # ConvNeXt
    ('acnet', 'vit_tiny_patch16_224', 32), ('msedge', 'vit_tiny_patch16_224', 48),  # ViT at a size not its own
    ('msedge', 'vit_small_patch14_dinov2', 32),                                    # ViT with padded patches
    ('msedge', 'vgg16', 64), ('acnet', 'vgg16', 64),                               # VGG: fc6 pools 2x2 up to 7x7
    ('clipprompt', TINY_CLIP, 32),                                                 # two CLIP towers with prompts
])
def test_onnx_embeds_as_torch_for_every_family(tmp_path, method, backbone, size):
    path = saved_checkpoint(tmp_path, method, backbone, size)
    onnx_model, _ = load_model(path, 'cpu', 'onnx', quiet=True)
    domains = DOMAINS if backbone != 'vgg16' else torch.full_like(DOMAINS, PHOTO)  # one 550 MB graph is enough
    images = rng_images(len(domains), size, seed=1)
    before = embeddings(onnx_model.model, images, domains)  # torch's
    exported = embeddings(onnx_model, images, domains)  # batches of 1 and 4, both domains mixed
    assert exported.shape == before.shape and exported.dtype == torch.float32
    assert (exported - before).abs().max() < 1e-4
    assert torch.equal(embeddings(onnx_model.model, images, domains), before)  # exporting changed nothing in torch
    for domain in domains.unique().tolist():
        meta = read_metadata(graph_path(path, domain))
        assert meta['domain'] == {SKETCH: 'sketch', PHOTO: 'photo'}[domain] and meta['img_size'] == str(size)


@pytest.mark.parametrize('size_in, size_out', [(2, 7), (3, 7), (5, 7), (1, 7), (14, 7), (6, 4)])
def test_explicit_adaptive_pooling_has_pytorchs_bins(size_in, size_out):
    x = torch.randn(2, 3, size_in, size_in + 1)
    expected = F.adaptive_avg_pool2d(x, (size_out, size_out))
    with explicit_adaptive_pooling():
        pooled = F.adaptive_avg_pool2d(x, (size_out, size_out))
    assert F.adaptive_avg_pool2d is not None and torch.allclose(pooled, expected, atol=1e-6)
    # by hand: output (0, 0) of 2 -> 7 averages input row 0 (bin [0, 1)), of 5 -> 7 rows [0, 1)
    if size_in in (2, 5):
        assert torch.allclose(pooled[..., 0, 0], x[..., 0, 0], atol=1e-6)


def test_the_same_metrics_and_top_10_on_the_generated_data(runs, tiny_data, tmp_path, capsys):
    for method, checkpoint in runs.items():
        # both on the CPU: ONNX Runtime's CPU build is the one here (on a GPU, --runtime onnx is refused)
        scores = {runtime: test_script.main(['--evaluate', '--data_base', str(checkpoint), '--workers', '0',
                                             '--device', 'cpu', '--runtime', runtime]) for runtime in ('torch', 'onnx')}
        assert scores['torch'].keys() == scores['onnx'].keys()
        assert all(abs(scores['torch'][k] - scores['onnx'][k]) < 1e-6 for k in scores['torch']), (method, scores)
        capsys.readouterr()
        tops = []
        for runtime in ('torch', 'auto'):  # auto on a CPU: onnx (test_bad_runtime_requests checks the choice)
            test_script.main(['--data_base', str(checkpoint), '--num', '10', '--save_root', str(tmp_path / runtime),
                              '--device', 'cpu', '--runtime', runtime])
            tops.append(re.findall(r'^\s+\d+\s+[\d.]+\s+\S+\s+(\S+)$', capsys.readouterr().out, re.M))
        assert len(tops[0]) == 2 * 10 and tops[0] == tops[1], method  # 2 val classes, one query each


def test_search_index_and_query_agree_across_runtimes(checkpoints, gallery, tmp_path, capsys):
    metas = {runtime: build(checkpoints[0], gallery, tmp_path / runtime, '--runtime', runtime, '--device', 'cpu')
             for runtime in ('torch', 'onnx')}
    assert metas['torch']['model'] == metas['onnx']['model']  # the same model, whatever embeds it
    import numpy as np
    vectors = {runtime: np.load(next((tmp_path / runtime).glob('vectors-*.npy'))) for runtime in metas}
    assert np.abs(vectors['torch'] - vectors['onnx']).max() < 1e-5
    sketch = next(gallery.rglob('*.*'))
    answers = [search.main(['query', '--index', str(tmp_path / runtime), '--query_name', str(sketch), '--num', '10',
                            '--save_root', str(tmp_path / f'q-{runtime}'), '--device', 'cpu', '--runtime', runtime])
               for runtime in ('torch', 'onnx')]
    assert [hit.path for hit in answers[0][0]] == [hit.path for hit in answers[1][0]]


def test_a_damaged_or_stale_graph_is_exported_again(tmp_path, capsys):
    path = saved_checkpoint(tmp_path, 'msedge', 'resnet18', 32)
    images = rng_images(3, 32, seed=2)
    domains = torch.tensor([SKETCH, PHOTO, PHOTO])
    load_model(path, 'cpu', 'onnx')[0].prepare()
    assert capsys.readouterr().out.count('(once per checkpoint)') == 2
    sketch_graph = graph_path(path, SKETCH)
    sketch_graph.write_bytes(sketch_graph.read_bytes()[:1000])  # cut short
    model = load_model(path, 'cpu', 'onnx')[0]
    model.prepare()
    assert re.search(r'exporting .*sketch\.onnx \(the file there is damaged\)', capsys.readouterr().out)
    assert (embed(model, images, domains) - embed(model.model, images, domains)).abs().max() < 1e-4
    saved_checkpoint(tmp_path, 'msedge', 'resnet18', 32, seed=1)  # the run trained again: other weights, same file
    model = load_model(path, 'cpu', 'onnx')[0]
    fresh = embed(model, images, domains)
    assert capsys.readouterr().out.count('belongs to another version of the checkpoint') == 2
    assert (fresh - embed(model.model, images, domains)).abs().max() < 1e-4
    model = load_model(path, 'cpu', 'onnx')[0]
    model.prepare()
    assert capsys.readouterr().out == ''  # current graphs are loaded as they are
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.') or 'tmp' in p.name]  # no lock or temporary left


def test_a_read_only_folder_keeps_its_graphs_in_memory(tmp_path, capsys, monkeypatch):
    path = saved_checkpoint(tmp_path, 'acnet', 'resnet18', 32)

    def read_only(lock, *args, **kwargs):  # what os.open raises in a folder this user cannot write (root can)
        raise PermissionError(13, 'Permission denied', str(lock))
    monkeypatch.setattr('zs_sbir.onnx_runtime.acquire_lock', read_only)
    model = load_model(path, 'cpu', 'onnx')[0]
    images, domains = rng_images(2, 32), torch.tensor([SKETCH, PHOTO])
    assert (embed(model, images, domains) - embed(model.model, images, domains)).abs().max() < 1e-4
    assert capsys.readouterr().out.count('in memory (nothing can be written beside it: Permission denied)') == 2
    check_cli(capsys, convert.main, ['--onnx', path], r"could not write the graphs beside '.*' \(said above\)", [tmp_path])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_convert_onnx_exports_both_graphs(tmp_path, capsys):
    path = saved_checkpoint(tmp_path, 'clipprompt', TINY_CLIP, 32)
    assert convert.main(['--onnx', str(path)]) is None
    out = capsys.readouterr().out
    assert out.count(': current (clipprompt') == 2
    assert graph_path(path, SKETCH).is_file() and graph_path(path, PHOTO).is_file()
    assert read_metadata(graph_path(path, PHOTO))['method'] == 'clipprompt'


def test_bad_runtime_requests_are_one_line(tmp_path, capsys, tiny_data):
    path = saved_checkpoint(tmp_path, 'acnet', 'resnet18', 32)
    with pytest.raises(UserError, match='--runtime onnx runs on the CPU'):
        choose_runtime('onnx', 'cuda')
    assert choose_runtime('auto', 'cuda') == 'torch' and choose_runtime('auto', 'cpu') == 'onnx'
    check_cli(capsys, convert.main, ['--onnx', path, '--save', tmp_path / 'x.pth'], 'run them apart', [tmp_path])
    check_cli(capsys, convert.main, ['--onnx', tmp_path / 'missing.pth'], "checkpoint not found: '", [tmp_path])
    check_cli(capsys, test_script.main, ['--evaluate', '--training_free', '--no_pretrained', '--data_root', tiny_data,
                                         '--data_name', 'synthetic', '--runtime', 'onnx'],
              '--training_free has none', [tmp_path])
    check_cli(capsys, convert.main, [], 'name the checkpoint to write with --save', [tmp_path])
    assert isinstance(load_model(path, 'cpu', 'auto')[0], OnnxModel)
    assert not isinstance(load_model(path, 'cpu', 'torch')[0], OnnxModel)


def test_every_way_a_graph_file_can_be_wrong(tmp_path, capsys, monkeypatch):
    path = saved_checkpoint(tmp_path, 'acnet', 'resnet18', 32)  # ACNet: the two domains embed differently
    images, domains = rng_images(3, 32, seed=3), torch.tensor([SKETCH, PHOTO, PHOTO])
    load_model(path, 'cpu', 'onnx', quiet=True)[0].prepare()
    sketch_graph, photo_graph = graph_path(path, SKETCH), graph_path(path, PHOTO)
    photo_graph.write_bytes(sketch_graph.read_bytes())  # the other domain's graph under this one's name
    model = load_model(path, 'cpu', 'onnx')[0]
    assert (embed(model, images, domains) - embed(model.model, images, domains)).abs().max() < 1e-4
    assert 'photo.onnx (the file there is the graph of the other domain)' in capsys.readouterr().out
    # a temporary file of a process killed while writing is cleared by the next export
    (tmp_path / f'.{sketch_graph.name}.killed.tmp').write_bytes(b'x' * 100)
    sketch_graph.unlink()
    sketch_graph.mkdir()  # a folder where the graph goes: one line, and nothing written
    with pytest.raises(UserError, match=r"sketch\.onnx' is a folder, where the sketch graph of .* goes"):
        load_model(path, 'cpu', 'onnx', quiet=True)[0].prepare()
    sketch_graph.rmdir()
    load_model(path, 'cpu', 'onnx', quiet=True)[0].prepare()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, sketch_graph.name, photo_graph.name])
    # a full disk: the run goes on with the graph in memory, and says so
    sketch_graph.unlink()

    def full_disk(target, write):
        raise UserError(f"could not write '{target}' (No space left on device; 0 MB free there)")
    monkeypatch.setattr('zs_sbir.onnx_runtime.atomic_write', full_disk)
    model = load_model(path, 'cpu', 'onnx')[0]
    assert (embed(model, images, domains) - embed(model.model, images, domains)).abs().max() < 1e-4
    assert 'No space left on device; 0 MB free there); this run keeps the graph in memory' in capsys.readouterr().out
    assert not sketch_graph.exists()
    assert embed(model, images[:0], domains[:0]).shape == (0, 8)  # an empty batch, as torch gives it


def test_a_name_too_long_for_its_graph_keeps_the_graph_in_memory(tmp_path, capsys):
    path = saved_checkpoint(tmp_path, 'msedge', 'resnet18', 32)
    long = path.rename(tmp_path / ('L' * 245 + '.pth'))  # a legal name; + '.sketch.onnx' is not
    model = load_model(long, 'cpu', 'onnx')[0]
    images, domains = rng_images(2, 32), torch.tensor([SKETCH, PHOTO])
    assert (embed(model, images, domains) - embed(model.model, images, domains)).abs().max() < 1e-4
    assert 'in memory (nothing can be written beside it: File name too long)' in capsys.readouterr().out


def test_a_checkpoint_replaced_while_it_is_read_is_refused(tmp_path, monkeypatch):
    path = saved_checkpoint(tmp_path, 'msedge', 'resnet18', 32)
    import zs_sbir.retrieval as retrieval
    rebuild = retrieval.model_from_checkpoint

    def replaced_meanwhile(checkpoint, device):
        model = rebuild(checkpoint, device)
        saved_checkpoint(tmp_path, 'msedge', 'resnet18', 32, seed=1)  # train.py saving a new best just then
        return model
    monkeypatch.setattr(retrieval, 'model_from_checkpoint', replaced_meanwhile)
    with pytest.raises(UserError, match='changed while it was read'):
        load_model(path, 'cpu', 'onnx')
    assert not graph_path(path, PHOTO).exists()


def runtimes_row(out, method):
    """speed.py runtimes' row of `method`, as {column header: cell}."""
    table = [[c.strip() for c in line.strip('|').split('|')] for line in out.splitlines() if line.startswith('| ')]
    rows = [row for row in table[1:] if row[0] == method]
    assert len(rows) == 1 and len(rows[0]) == len(table[0])
    return dict(zip(table[0], rows[0]))


@pytest.mark.parametrize('method', ['acnet', 'msedge'])
def test_speed_runtimes_prints_rates_and_the_same_top_10(method, capsys):
    """speed.py runtimes, each method in its own process: positive rates and ratios, ONNX within 1e-4 of torch,
    the same top 10 photos."""
    import speed
    # 24 photos: a sketch's top 10 is a choice among them (with 10 or fewer every runtime keeps them all)
    speed.main(['runtimes', '--quick', '--methods', method, '--img_size', '32', '--photos', '24', '--batch_size', '8'])
    row = runtimes_row(capsys.readouterr().out, method)
    ratios = [float(v.rstrip('x')) for k, v in row.items() if 'ratio' in k or ' / eager' in k]
    rates = [float(v) for k, v in row.items() if k not in ('method', 'backbone') and
             not any(word in k for word in ('ratio', ' / eager', 'diff', 'recall'))]
    assert len(rates) == 9 and len(ratios) == 6 and all(r > 0 for r in rates + ratios)
    assert float(row['ONNX max abs diff']) <= 1e-4 and row['recall@10 ONNX'] == '1.000'
    assert all(0 <= float(row[f'recall@10 {name}']) <= 1 for name in ('bf16', 'int8'))


def test_speed_runtimes_on_a_trained_checkpoint(runs, capsys, tmp_path):
    """speed.py runtimes --data_base: the checkpoint's method, image size and val split; ONNX keeps fp32's top 10."""
    import speed
    speed.main(['runtimes', '--data_base', str(runs['msedge']), '--photos', '12', '--batch_size', '4', '--repeats', '1',
                '--workers', '0'])  # the tiny val split's 12 photos: a top 10 among 12
    out = capsys.readouterr().out
    assert '32 px' in out and f"{runs['msedge']} on its val split (its sketches against 12 of its photos" in out
    row = runtimes_row(out, 'msedge')
    assert row['recall@10 ONNX'] == '1.000' and 0 <= float(row['recall@10 int8']) <= 1
    check_cli(capsys, speed.main, ['runtimes', '--data_base', tmp_path / 'missing.pth'], "checkpoint not found: '")
