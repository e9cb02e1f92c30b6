"""plot.py: the data behind each figure, checked against the files it comes from or an independent
computation; the figures themselves are written, marked as ours, and bad input is one line."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from zs_sbir import pictures
import plot
from helpers import DEVICE, cli_checker, fake_run
from zs_sbir.retrieval import model_from_checkpoint
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, VECTORS_FORMAT, load_torch
from zs_sbir.images import load_image
from zs_sbir.safe_files import read_csv, save_torch, written_by_this_repo
from model import sobel_edges
from utils import METRIC_NAMES, PHOTO, SKETCH


check_error = cli_checker(plot.main)
# plot.py drew on DEVICE, and so do the references below; on a GPU cuDNN may choose other kernels for them than for
# plot.py's batches, so there a picture may differ by one grey level and a map in its last bits
PIXEL_TOLERANCE, MAP_TOLERANCE = (0, 1e-6) if DEVICE == 'cpu' else (1, 1e-5)


def assert_pixels_match(saved, expected):
    assert saved.shape == expected.shape and (saved.int() - expected.int()).abs().max() <= PIXEL_TOLERANCE


def test_curve_data_is_the_csv_with_each_runs_selected_epoch(runs, tmp_path):
    fake_run(tmp_path, 'synthetic_acnet_resnet50_64', [0.2, 0.5, 0.4])
    fake_run(tmp_path, 'synthetic_msedge_resnet50_64', [0.1, 0.3, 0.6], heldout=[0.9, 0.2, 0.1], select_on='heldout')
    real = runs['acnet'].with_name('synthetic_acnet_resnet50_8_results.csv')
    paths = [tmp_path / 'synthetic_acnet_resnet50_64_results.csv', tmp_path / 'synthetic_msedge_resnet50_64_results.csv',
             real]
    data = plot.main(['curves', '--results', *map(str, paths), '--save_root', str(tmp_path / 'figs')])
    for path in paths:
        rows, run = read_csv(path), path.name.removesuffix('_results.csv')
        mine = data[data['run'] == run]
        quantities = [c for c in rows[0] if c.endswith('_loss')] + \
            [c for c in rows[0] if c in (*METRIC_NAMES, 'precise') or c.startswith('heldout_')]
        assert len(mine) == len(rows) * len(quantities)
        for row in rows:
            for quantity in quantities:
                value = mine[(mine['epoch'] == int(row['epoch'])) & (mine['quantity'] == quantity)]['value']
                assert value.item() == pytest.approx(float(row[quantity]))
    selected = data[data['selected']].groupby('run')['epoch'].unique().to_dict()
    assert selected['synthetic_acnet_resnet50_64'].tolist() == [2]  # best precise
    assert selected['synthetic_msedge_resnet50_64'].tolist() == [1]  # best held-out precise, not best test
    best = max(read_csv(real), key=lambda r: float(r['precise']))
    assert selected['synthetic_acnet_resnet50_8'].tolist() == [int(best['epoch'])]
    stem = tmp_path / 'figs' / 'synthetic_acnet_resnet50_64_and_2_more_curves'
    assert written_by_this_repo(f'{stem}.png') and Image.open(f'{stem}.png').size[0] > 500
    written = pd.read_csv(f'{stem}.csv')
    assert list(written.columns) == plot.CURVE_COLUMNS and np.allclose(written['value'], data['value'])


def test_tsne_is_seeded_sampled_and_keeps_each_points_identity(runs, tmp_path):
    record = load_torch(runs['msedge'].with_name('synthetic_msedge_resnet50_8_vectors.pth'), VECTORS_FORMAT, 'v')
    assert len(record['paths']) == 20  # 2 val classes x (4 sketches + 6 photos)
    first = plot.tsne_data(record, max_points=12, seed=3)
    again = plot.tsne_data(record, max_points=12, seed=3)
    other = plot.tsne_data(record, max_points=12, seed=4)
    assert first.shape == (12, 5) and np.isfinite(first[['x', 'y']].to_numpy()).all()
    pd.testing.assert_frame_equal(first, again)
    assert set(first['path']) != set(other['path'])
    index = {p: i for i, p in enumerate(record['paths'])}
    for _, row in first.iterrows():
        i = index[row['path']]
        assert row['class'] == record['classes'][record['labels'][i]]
        assert row['domain'] == ('sketch' if record['domains'][i] == SKETCH else 'photo')
    everything = plot.tsne_data(record, max_points=10 ** 6)
    assert len(everything) == len(record['paths'])
    data = plot.main(['tsne', '--data_base', str(runs['msedge']), '--max_points', '12', '--seed', '3', '--save_root',
                      str(tmp_path)])
    pd.testing.assert_frame_equal(data, first)
    assert written_by_this_repo(tmp_path / 'synthetic_msedge_resnet50_8_tsne.png')


def slow_per_class(vectors, labels, domains):
    """mAP@all and P@100 per class from the definitions: a full ranking per query, the precision envelope."""
    v = torch.nn.functional.normalize(vectors.double(), dim=1).numpy()
    labels, domains = labels.numpy(), domains.numpy()
    gallery, gallery_labels = v[domains == PHOTO], labels[domains == PHOTO]
    scores = {}
    for q, label in zip(v[domains == SKETCH], labels[domains == SKETCH]):
        relevant = gallery_labels[np.argsort(-(gallery @ q), kind='stable')] == label
        precision = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        ap = envelope[relevant].sum() / relevant.sum()
        scores.setdefault(label, []).append((ap, relevant[:100].sum() / min(100, len(relevant))))
    return {label: tuple(np.mean(values, axis=0)) for label, values in scores.items()}


def test_per_class_values_match_an_independent_computation(runs, tmp_path):
    record = load_torch(runs['acnet'].with_name('synthetic_acnet_resnet50_8_vectors.pth'), VECTORS_FORMAT, 'v')
    data = plot.main(['per_class', '--data_base', str(runs['acnet']), '--save_root', str(tmp_path)])
    expected = slow_per_class(record['vectors'], record['labels'], record['domains'])
    assert len(data) == len(record['classes']) and list(data.columns) == ['class', 'mAP@all', 'P@100']
    for _, row in data.iterrows():
        ap, p100 = expected[record['classes'].index(row['class'])]
        assert row['mAP@all'] == pytest.approx(ap, abs=1e-6) and row['P@100'] == pytest.approx(p100, abs=1e-9)
    assert list(data['mAP@all']) == sorted(data['mAP@all'], reverse=True)
    written = pd.read_csv(tmp_path / 'synthetic_acnet_resnet50_8_per_class.csv')
    assert list(written['class']) == list(data['class']) and np.allclose(written['mAP@all'], data['mAP@all'])


def test_generated_images_are_the_generators_output(runs, tiny_data, tmp_path):
    sketches = tiny_data / 'synthetic' / 'val' / 'sketch'
    folder = sorted(sketches.iterdir())[0]
    outputs = plot.main(['generated', '--data_base', str(runs['acnet']), '--query_name', str(folder), '--save_root',
                         str(tmp_path), '--device', DEVICE, '--limit', '2'])
    files = sorted(folder.glob('*.png'))[:2]  # --limit: as many generated, saved and shown
    assert sorted(outputs) == [f.stem for f in files]
    assert sorted(p.stem for p in (tmp_path / 'synthetic_acnet_resnet50_8_generated').glob('*.png')) == sorted(outputs)
    model = model_from_checkpoint(load_torch(runs['acnet'], CHECKPOINT_FORMAT, 'checkpoint')).to(DEVICE)
    with torch.no_grad():
        images = torch.stack([load_image(f, 32, 'bilinear') for f in files]).to(DEVICE)
        expected = model.pictures(images, SKETCH)['generated'].cpu()
    for f, image in zip(files, expected):
        saved = torch.from_numpy(np.array(Image.open(tmp_path / 'synthetic_acnet_resnet50_8_generated' / f'{f.stem}.png')))
        assert_pixels_match(saved.permute(2, 0, 1), image)
    sheet = Image.open(tmp_path / 'synthetic_acnet_resnet50_8_generated.png')
    assert written_by_this_repo(tmp_path / 'synthetic_acnet_resnet50_8_generated.png')
    assert sheet.size[1] == 18 + 1 * (pictures.SHEET_TILE + 4) + 4  # --limit 2: one row of two pairs


def test_attention_maps_are_the_models(runs, tiny_data, tmp_path, capsys):
    photos = sorted((tiny_data / 'synthetic' / 'val' / 'photo').iterdir())[0]
    drawn = plot.main(['attention', '--data_base', str(runs['msedge']), '--query_name', str(photos), '--save_root',
                       str(tmp_path), '--device', DEVICE, '--limit', '3'])
    files = sorted(photos.glob('*.jpg'))[:3]
    model = model_from_checkpoint(load_torch(runs['msedge'], CHECKPOINT_FORMAT, 'checkpoint')).to(DEVICE)
    with torch.no_grad():
        images = torch.stack([load_image(f, 32, 'bicubic') for f in files]).to(DEVICE)
        _, (a3, a4) = model(images, torch.full((3,), PHOTO, device=DEVICE))
        edges = (sobel_edges(images.float() / 255) * 255).byte().cpu()
    assert len(drawn) == 3 and all(list(d) == ['edge map', 'attention 3', 'attention 4'] for d in drawn)  # both
    for pictures_, e3, e4, edge in zip(drawn, a3[:, 0].cpu(), a4[:, 0].cpu(), edges):
        assert torch.allclose(pictures_['attention 3'], e3, atol=MAP_TOLERANCE)
        assert torch.allclose(pictures_['attention 4'], e4, atol=MAP_TOLERANCE)
        assert_pixels_match(pictures_['edge map'], edge)
    assert written_by_this_repo(tmp_path / 'synthetic_msedge_resnet50_8_attention.png')
    loose = tmp_path / 'mixed'
    loose.mkdir()
    Image.open(files[0]).save(loose / 'a.png')
    check_error(capsys, ['attention', '--data_base', runs['msedge'], '--query_name', loose, '--save_root', tmp_path],
                r"cannot tell whether '.*mixed' holds sketches or photos .*: pass --domain sketch or --domain photo")


def test_bad_inputs_are_one_line(runs, tiny_data, tmp_path, capsys):
    (tmp_path / 'table.csv').write_text('a,b\n1,2\n')
    check_error(capsys, ['curves', '--results', tmp_path / 'table.csv'],
                r"'.*table.csv' is not a results CSV of train.py: it has no rows, or not the columns epoch")
    check_error(capsys, ['curves', '--results', tmp_path / 'none.csv'], r"results CSV not found: '.*none.csv'")
    vectors = runs['acnet'].with_name('synthetic_acnet_resnet50_8_vectors.pth')
    check_error(capsys, ['tsne', '--data_base', vectors], 'is not a checkpoint of this repo')
    check_error(capsys, ['generated', '--data_base', runs['msedge'], '--query_name', tiny_data],
                r"is a msedge model, which draws no generated images: `plot.py generated` needs a model of acnet")
    check_error(capsys, ['attention', '--data_base', runs['acnet'], '--query_name', tiny_data],
                r"is a acnet model, which draws no attention maps: `plot.py attention` needs a model of msedge")
    check_error(capsys, ['generated', '--data_base', runs['acnet'], '--query_name', tmp_path / 'nowhere'],
                "--query_name folder not found")
    converted = {**load_torch(runs['acnet'], CHECKPOINT_FORMAT, 'checkpoint'), 'vectors_file': None}
    save_torch(converted, tmp_path / 'converted.pth')
    check_error(capsys, ['per_class', '--data_base', tmp_path / 'converted.pth'], 'has no saved val embeddings')
    (tmp_path / 'figs').mkdir()
    (tmp_path / 'figs' / 'synthetic_acnet_resnet50_8_per_class.csv').write_text('my,own\n')
    check_error(capsys, ['per_class', '--data_base', runs['acnet'], '--save_root', tmp_path / 'figs'],
                r"file '.*per_class.csv' exists and was not written by this repo")
    assert sorted(p.name for p in (tmp_path / 'figs').iterdir()) == ['synthetic_acnet_resnet50_8_per_class.csv']
    check_error(capsys, ['tsne', '--data_base', runs['acnet'], '--max_points', '2'], '--max_points must be from 10 to ')
    check_error(capsys, ['generated', '--data_base', runs['acnet'], '--query_name', tiny_data, '--limit', '0'],
                '--limit must be from 1 to ')


def test_sheets_deal_files_out_across_class_folders(tmp_path):
    files = [tmp_path / c / f'{c}_{i}.png' for c in ('b', 'a', 'c') for i in range(3 if c != 'c' else 1)]
    order = [p.stem for p in plot.across_folders(sorted(files))]
    assert order == ['a_0', 'b_0', 'c_0', 'a_1', 'b_1', 'a_2', 'b_2']


def test_figures_never_go_into_the_dataset_or_the_query_folder_and_a_collapsed_run_has_no_map(runs, tiny_data,
                                                                                               tmp_path, capsys):
    dataset = tiny_data / 'synthetic'
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob('*') if p.is_file()}
    for command in (['tsne', '--data_base', runs['acnet']], ['per_class', '--data_base', runs['acnet']]):
        check_error(capsys, [*command, '--save_root', dataset / 'val' / 'photo'],
                    r"--save_root '.*photo' is inside the dataset '.*synthetic': pictures written there would become")
    queries = tmp_path / 'mine'
    queries.mkdir()
    Image.new('RGB', (32, 32), 'white').save(queries / 'a.png')
    check_error(capsys, ['generated', '--data_base', runs['acnet'], '--query_name', queries, '--save_root', queries,
                         '--device', DEVICE], r"is inside the --query_name folder '.*mine'")
    check_error(capsys, ['attention', '--data_base', runs['msedge'], '--query_name', dataset / 'val' / 'photo',
                         '--save_root', dataset / 'val' / 'x', '--device', DEVICE], 'is inside the dataset')
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob('*') if p.is_file()} == before  # nothing added or changed
    assert sorted(queries.iterdir()) == [queries / 'a.png']

    vectors = load_torch(str(runs['acnet']).replace('_model.pth', '_vectors.pth'), VECTORS_FORMAT, 'vectors')
    save_torch({**vectors, 'vectors': torch.zeros_like(vectors['vectors'])}, tmp_path / 'zero_vectors.pth')
    check_error(capsys, ['tsne', '--data_base', runs['acnet'], '--vectors', tmp_path / 'zero_vectors.pth', '--save_root',
                         tmp_path / 'figures'], 'every saved embedding is the same vector')
