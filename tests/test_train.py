"""train.py end to end on a tiny generated dataset (32 px, random init), and its option checks."""
import pytest
import torch

from helpers import BITWISE, DEVICE, tiny
from zs_sbir.retrieval import model_from_checkpoint
from zs_sbir.config import parse_args
from train import main, train
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, VECTORS_FORMAT, load_torch
from zs_sbir.cli import UserError
from methods import get_method
from zs_sbir.images import load_image
from zs_sbir.safe_files import read_csv
from utils import METRIC_NAMES, SKETCH, retrieval_metrics


def tiny_args(data_root, save_root, *extra):
    return parse_args(tiny(data_root, save_root, '--epochs', '2', '--emb_dim', '512', *extra))


LOSSES = {'acnet': ['adv_loss', 'identity_loss', 'class_loss', 'dis_loss'], 'msedge': ['proxy_loss']}


@pytest.mark.parametrize('method', ['acnet', 'msedge'])
def test_tiny_run_writes_results_checkpoint_and_aligned_vectors(tiny_data, tmp_path, method):
    args = tiny_args(tiny_data, tmp_path, '--method', method, '--emb_dim', '16')
    best = train(args)
    prefix = tmp_path / f'synthetic_{method}_resnet50_16'

    rows = read_csv(f'{prefix}_results.csv')
    assert [r['epoch'] for r in rows] == ['1', '2']
    seeds_order = ['P@100', 'P@200', 'mAP@200', 'mAP@all', 'precise']  # the seeds' CSV columns, then torchmetrics'
    assert list(rows[0]) == ['epoch', *LOSSES[method], *seeds_order, *(f'torchmetrics_{m}' for m in seeds_order),
                             'eval_queries', 'select_on', 'metric_convention', 'val_classes']
    assert {r['metric_convention'] for r in rows} == {'sake'}
    assert {r['eval_queries'] for r in rows} == {'all'}
    assert {r['select_on'] for r in rows} == {'test'}
    for row in rows:
        values = [float(row[m]) for m in METRIC_NAMES]
        assert all(0 <= v <= 1 for v in values) and float(row['precise']) == pytest.approx(sum(values) / 4)
    best_row = max(rows, key=lambda r: float(r['precise']))
    assert best['epoch'] == int(best_row['epoch'])

    checkpoint = load_torch(f'{prefix}_model.pth', CHECKPOINT_FORMAT, 'checkpoint')
    assert checkpoint['method'] == method and checkpoint['epoch'] == best['epoch']
    assert checkpoint['metrics']['precise'] == pytest.approx(float(best_row['precise']))
    assert checkpoint['args']['emb_dim'] == 16 and len(checkpoint['train_classes']) == 4
    vectors = load_torch(f'{prefix}_vectors.pth', VECTORS_FORMAT, 'vectors file')
    assert vectors['vectors'].shape == (len(vectors['paths']), 16) and vectors['epoch'] == best['epoch']

    # the saved vectors reproduce the logged metrics
    v, labels, sketch = vectors['vectors'], vectors['labels'], vectors['domains'] == SKETCH
    recomputed = retrieval_metrics(v[sketch], labels[sketch], v[~sketch], labels[~sketch])
    assert recomputed['precise'] == pytest.approx(float(best_row['precise']), abs=1e-6)
    assert recomputed['torchmetrics_precise'] == pytest.approx(float(best_row['torchmetrics_precise']), abs=1e-6)

    # row i belongs to paths[i]: re-embedding the files with the reloaded model gives the same rows
    model = model_from_checkpoint(checkpoint)
    picks = [0, len(v) // 2, len(v) - 1]
    root = tiny_data / 'synthetic' / 'val'
    images = torch.stack([load_image(root / vectors['paths'][i], 32, get_method(method).interpolation) for i in picks])
    with torch.no_grad():
        again = model.embed(images, vectors['domains'][picks])
    assert torch.allclose(again, v[picks], atol=1e-5)


def test_select_on_heldout_picks_the_epoch_by_seen_class_images(tiny_data, tmp_path):
    best = train(tiny_args(tiny_data, tmp_path, '--epochs', '3', '--emb_dim', '8', '--select_on', 'heldout',
                           '--heldout_fraction', '0.25', '--warmup', '0'))
    rows = read_csv(tmp_path / 'synthetic_acnet_resnet50_8_heldout_results.csv')  # not the plain run's files
    assert {r['select_on'] for r in rows} == {'heldout'}
    assert {'heldout_P@100', 'heldout_precise'} <= set(rows[0])
    chosen = max(rows, key=lambda r: float(r['heldout_precise']))
    assert best['epoch'] == int(chosen['epoch'])
    checkpoint = load_torch(tmp_path / 'synthetic_acnet_resnet50_8_heldout_model.pth', CHECKPOINT_FORMAT, 'checkpoint')
    assert checkpoint['epoch'] == int(chosen['epoch'])
    assert checkpoint['metrics']['precise'] == pytest.approx(float(chosen['precise']))  # the test metrics of it
    assert checkpoint['args']['select_on'] == 'heldout'


def test_results_do_not_depend_on_worker_count(tiny_data, tmp_path):
    rows = []
    for workers in ('0', '2'):
        train(tiny_args(tiny_data, tmp_path / workers, '--epochs', '1', '--emb_dim', '8', '--workers', workers,
                        *BITWISE))
        rows.append(read_csv(tmp_path / workers / 'synthetic_acnet_resnet50_8_results.csv'))
    assert rows[0] == rows[1]


def test_loss_variants_and_edge_modes_get_their_own_files(tiny_data, tmp_path):
    """Each ablation is one command, and its files never overwrite the original's."""
    train(tiny_args(tiny_data, tmp_path, '--epochs', '1', '--emb_dim', '8', '--loss_weights', '1', '0', '1',
                    '--class_on', 'fake', 'photo'))
    rows = read_csv(tmp_path / 'synthetic_acnet_resnet50_8_w1-0-1_on-photo-fake_results.csv')
    assert list(rows[0])[:4] == ['epoch', 'adv_loss', 'class_loss', 'dis_loss']  # identity weight 0: not computed
    checkpoint = load_torch(tmp_path / 'synthetic_acnet_resnet50_8_w1-0-1_on-photo-fake_model.pth',
                            CHECKPOINT_FORMAT, 'checkpoint')
    assert checkpoint['args']['loss_weights'] == [1, 0, 1] and checkpoint['args']['class_on'] == ['photo', 'fake']
    assert checkpoint['backbone_tag'] == 'resnet50.ram_in1k'
    train(tiny_args(tiny_data, tmp_path, '--epochs', '1', '--warmup', '0', '--emb_dim', '8', '--method', 'msedge',
                    '--edge_mode', 'none'))
    assert (tmp_path / 'synthetic_msedge_resnet50_8_edge-none_results.csv').is_file()
    assert sorted(p.name for p in tmp_path.glob('*_results.csv')) == [
        'synthetic_acnet_resnet50_8_w1-0-1_on-photo-fake_results.csv', 'synthetic_msedge_resnet50_8_edge-none_results.csv']


@pytest.mark.parametrize('extra, message', [
    (['--loss_weights', '1', '0.1', '0'], '--loss_weights must be >= 0 with a class weight above 0'),
    (['--method', 'msedge', '--class_on', 'photo'], '--class_on applies to --method acnet only'),
    (['--method', 'msedge', '--class_loss', 'ce', '--extractor_only'],
     '--class_loss and --extractor_only apply to --method acnet only'),
    (['--edge_mode', 'photo'], '--edge_mode applies to --method msedge only'),
    (['--backbone_type', 'resnt50'], r"timm has no model 'resnt50' \(close matches: "),
    (['--batch_size', '1'], '--batch_size must be from 2 to 65536, got 1'),
    (['--emb_dim', '0'], '--emb_dim must be from 1 to 65536'),
    (['--warmup', '3'], r'--warmup must be between 0 and --epochs \(2\)'),
    (['--method', 'msedge', '--batch_size', '1'], '--batch_size must be from 2 to 65536'),  # BatchNorm trains
    (['--extractor_only', '--batch_size', '1'], '--batch_size must be from 2 to 65536'),
    (['--extractor_only', '--class_loss', 'ce'], r'--extractor_only --class_loss ce: no commit of the original had'),
    (['--img_size', '30'], '--img_size must be a multiple of 4'),
    (['--heldout_fraction', '1.5'], '--heldout_fraction must be between 0 and 1'),
])
def test_nonsense_options_fail_before_any_work(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train(tiny_args(tmp_path / 'no-data-here', tmp_path / 'out', *extra))
    assert not (tmp_path / 'out').exists()


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['--data_root', str(tmp_path / 'missing'), '--data_name', 'sketchy', '--no_pretrained'])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: data root not found') and 'Traceback' not in err


def test_eval_queries_scores_epochs_on_a_sample_and_the_selected_epoch_on_all(tiny_data, tmp_path):
    import test as retrieval
    from train import sample_queries
    from utils import PHOTO, scan_split
    from zs_sbir.results import read_results
    args = tiny_args(tiny_data, tmp_path, '--epochs', '2', '--emb_dim', '8', '--eval_queries', '3', '--device', DEVICE)
    best = train(args)
    prefix = tmp_path / 'synthetic_acnet_resnet50_8'
    rows = read_csv(f'{prefix}_results.csv')
    assert [(r['epoch'], r['eval_queries']) for r in rows] == [('1', '3'), ('2', '3'), (str(best['epoch']), 'all')]
    checkpoint = load_torch(f'{prefix}_model.pth', CHECKPOINT_FORMAT, 'checkpoint')
    vectors = load_torch(f'{prefix}_vectors.pth', VECTORS_FORMAT, 'vectors file')
    val = scan_split(tiny_data, 'synthetic', 'val')
    assert sorted(vectors['paths']) == sorted(val.paths)  # the full val set, not the sample
    v, labels, sketch = vectors['vectors'], vectors['labels'], vectors['domains'] == SKETCH
    full = retrieval_metrics(v[sketch], labels[sketch], v[~sketch], labels[~sketch])
    assert float(rows[-1]['precise']) == pytest.approx(full['precise'], abs=1e-6)
    assert checkpoint['metrics']['precise'] == pytest.approx(full['precise'], abs=1e-6)
    # the selected epoch's row is the metric of the seeded sample: 3 sketches, every photo
    sample = sample_queries(val, 3, args.seed)
    assert sample.count(SKETCH) == 3 and sample.count(PHOTO) == val.count(PHOTO)
    model = model_from_checkpoint(checkpoint)
    with torch.no_grad():
        images = torch.stack([load_image(val.root / p, 32, 'bilinear') for p in sample.paths])
        e = model.embed(images, torch.tensor(sample.domains))
    s, lab = torch.tensor(sample.domains) == SKETCH, torch.tensor(sample.labels)
    on_sample = retrieval_metrics(e[s], lab[s], e[~s], lab[~s])
    assert float(rows[best['epoch'] - 1]['precise']) == pytest.approx(on_sample['precise'], abs=1e-5)
    # reports, test.py and resume take the full row of the selected epoch
    _, reported = read_results(f'{prefix}_results.csv')
    assert reported['eval_queries'] == 'all' and reported['precise'] == pytest.approx(full['precise'], abs=1e-6)
    assert load_torch(f'{prefix}_last.pth', CHECKPOINT_FORMAT, 'checkpoint')['epoch'] == 2
    metrics = retrieval.main(['--data_base', f'{prefix}_model.pth', '--evaluate', '--workers', '0', '--device', DEVICE])
    assert metrics['precise'] == pytest.approx(full['precise'], abs=1e-6)
    train(tiny_args(tiny_data, tmp_path, '--epochs', '3', '--emb_dim', '8', '--eval_queries', '3', '--device', DEVICE,
                    '--resume'))
    rows = read_csv(f'{prefix}_results.csv')
    assert [r['eval_queries'] for r in rows] == ['3', '3', '3', 'all']  # the earlier full row is gone


def test_the_metric_convention_selects_the_epoch_and_names_its_files(tiny_data, tmp_path, capsys):
    best = train(tiny_args(tiny_data, tmp_path, '--epochs', '3', '--emb_dim', '8', '--warmup', '0',
                           '--metric_convention', 'torchmetrics'))
    rows = read_csv(tmp_path / 'synthetic_acnet_resnet50_8_torchmetrics_results.csv')  # not the SAKE run's files
    assert {r['metric_convention'] for r in rows} == {'torchmetrics'}
    assert best['epoch'] == int(max(rows, key=lambda r: float(r['torchmetrics_precise']))['epoch'])
    out = capsys.readouterr().out
    assert 'unseen (torchmetrics) mAP@200' in out and f"precise {float(rows[0]['torchmetrics_precise']):.4f}" in out
    from zs_sbir.results import read_results
    assert read_results(tmp_path / 'synthetic_acnet_resnet50_8_torchmetrics_results.csv')[1]['epoch'] == best['epoch']


def test_a_methods_warm_up_fits_a_shorter_run():
    assert parse_args(['--method', 'msedge', '--epochs', '1']).warmup == 1  # MSEdge warms up for 2 epochs of 10
    assert parse_args(['--method', 'msedge']).warmup == 2 and parse_args(['--epochs', '1', '--warmup', '0']).warmup == 0
