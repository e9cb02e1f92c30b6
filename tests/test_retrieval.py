"""test.py: retrieval pictures, loose files, frame colours, --evaluate, and its one-line errors."""
import shutil

import pytest
import torch
from PIL import Image

import test as retrieval
from zs_sbir import pictures
from helpers import DEVICE, cli_checker, tiny, write_image
from methods import get_method
from train import train
from utils import METRIC_NAMES, PHOTO
from zs_sbir.checkpoint import CHECKPOINT_FORMAT, VECTORS_FORMAT, load_torch
from zs_sbir.config import parse_args as train_args
from zs_sbir.images import load_image
from zs_sbir.retrieval import model_from_checkpoint
from zs_sbir.safe_files import FOLDER_MARK, read_csv

K = 3


check_error = cli_checker(retrieval.main, literal=True)


def run(*argv):
    return retrieval.main([str(a) for a in argv])


def frame_colours(picture, num_tiles):
    """The colour of each tile's frame (its top-left pixel)."""
    return [picture.getpixel((pictures.GAP + i * (pictures.TILE + pictures.GAP) + 1, pictures.GAP + 1))
            for i in range(num_tiles)]


@pytest.mark.parametrize('method, extra_args, extra_tiles', [('acnet', [], 0), ('acnet', ['--show_generated'], 1),
                                                             ('msedge', [], 3)])
def test_picture_size_frames_and_loose_files(runs, tiny_data, tmp_path, method, extra_args, extra_tiles):
    checkpoint = load_torch(runs[method], CHECKPOINT_FORMAT, 'checkpoint')
    vectors = load_torch(runs[method].parent / checkpoint['vectors_file'], VECTORS_FORMAT, 'vectors')
    root = tiny_data / 'synthetic' / 'val'
    query = sorted((root / 'sketch').rglob('*.png'))[1]
    run('--query_name', query, '--data_base', runs[method], '--num', K, '--save_root', tmp_path, *extra_args)

    picture = Image.open(tmp_path / f'{query.stem}.png')
    tiles = 1 + extra_tiles + K
    assert picture.size == (pictures.GAP + tiles * (pictures.TILE + pictures.GAP),
                            2 * pictures.GAP + pictures.TILE + pictures.CAPTION)

    # the expected top K, computed independently from the saved gallery embeddings
    model = model_from_checkpoint(checkpoint)
    with torch.no_grad():
        q = model.embed(load_image(query, 32, get_method(method).interpolation)[None], torch.tensor([1]))[0]
    photos = (vectors['domains'] == PHOTO).nonzero()[:, 0]
    sims = vectors['vectors'][photos] @ q
    top = photos[torch.sort(sims, descending=True, stable=True).indices[:K]]
    matches = [vectors['classes'][vectors['labels'][i]] == query.parent.name for i in top]
    expected = [pictures.COLOURS['query']] + [pictures.COLOURS[None]] * extra_tiles + \
        [pictures.COLOURS[m] for m in matches]
    assert frame_colours(picture, tiles) == expected

    loose = sorted(p.name for p in (tmp_path / query.stem).iterdir() if p.name != FOLDER_MARK)
    assert loose[0] == 'query.jpg' and len(loose) == K + 1 and (tmp_path / query.stem / FOLDER_MARK).is_file()
    assert [name.split('_')[1] for name in loose[1:]] == [str(r) for r in range(1, K + 1)]
    assert float(loose[1].split('_')[2][:-4]) == pytest.approx(sims.max().item(), abs=1e-4)


def test_draw_retrieval_frames_on_a_constructed_case():
    white = Image.new('RGB', (20, 20), 'white')
    results = [(white, '0.9\ncat', True), (white, '0.8\ndog', False), (white, '0.7\ncat', True),
               (white, '0.1\n?', None)]
    picture = pictures.draw_retrieval(white, [('generated', white)], results)
    green, red, grey, blue = (pictures.COLOURS[k] for k in (True, False, None, 'query'))
    assert frame_colours(picture, 6) == [blue, grey, green, red, green, grey]


def test_any_image_from_outside_the_val_set(runs, tmp_path):
    write_image(tmp_path / 'mine' / 'doodle.PNG', 'RGBA', size=(100, 37), colour=(0, 0, 0, 255))
    write_image(tmp_path / 'mine' / 'other.jpg', 'L', size=(50, 80), fmt='JPEG')
    run('--query_name', tmp_path / 'mine', '--data_base', runs['acnet'], '--num', K, '--save_root', tmp_path / 'out')
    for stem in ('doodle', 'other'):
        picture = Image.open(tmp_path / 'out' / f'{stem}.png')
        assert frame_colours(picture, K + 1)[1:] == [pictures.COLOURS[None]] * K  # class unknown: grey


def test_defaults_take_one_sketch_per_val_class(runs, tmp_path, capsys):
    run('--data_base', runs['acnet'], '--save_root', tmp_path)
    assert len(list(tmp_path.glob('*.png'))) == 2  # two val classes in the tiny dataset
    assert capsys.readouterr().out.count(' of class ') == 2


def test_evaluate_matches_the_training_log(runs):
    for method, path in runs.items():
        metrics = run('--evaluate', '--data_base', path, '--workers', 0)
        best = max(read_csv(str(path).replace('_model.pth', '_results.csv')), key=lambda r: float(r['precise']))
        for name in (*METRIC_NAMES, 'precise'):
            assert metrics[name] == pytest.approx(float(best[name]), abs=1e-6), (method, name)


def test_errors(runs, tiny_data, tmp_path, capsys):
    check_error(capsys, ['--query_name', tmp_path / 'nope.png', '--data_base', runs['acnet']], "query image not found: '")
    check_error(capsys, ['--data_base', tmp_path / 'missing.pth'], 'checkpoint not found')
    vectors_file = str(runs['acnet']).replace('_model', '_vectors')
    check_error(capsys, ['--data_base', vectors_file], "is not a checkpoint of this repo")
    msedge_vectors = str(runs['msedge']).replace('_model', '_vectors')
    check_error(capsys, ['--data_base', runs['acnet'], '--vectors', msedge_vectors], 'holds the embeddings of another run than')
    # a dataset that changed since training
    changed = tmp_path / 'changed'
    shutil.copytree(tiny_data, changed)
    next((changed / 'synthetic' / 'val' / 'photo').rglob('*.jpg')).unlink()
    check_error(capsys, ['--data_base', runs['acnet'], '--data_root', changed], 'do not match the dataset at')
    check_error(capsys, ['--data_base', runs['acnet'], '--num', 0], '--num must be from 1 to 10000')


def test_an_extractor_only_model_retrieves_and_only_show_generated_is_refused(tiny_data, tmp_path, capsys):
    train(train_args(tiny(tiny_data, tmp_path, '--epochs', '1', '--extractor_only')))
    checkpoint = tmp_path / 'synthetic_acnet_resnet50_8_extractor-normsoftmax_model.pth'
    query = sorted((tiny_data / 'synthetic' / 'val' / 'sketch').rglob('*.png'))[0]
    run('--query_name', query, '--data_base', checkpoint, '--num', K, '--save_root', tmp_path / 'out', '--device',
        DEVICE)
    picture = Image.open(tmp_path / 'out' / f'{query.stem}.png')  # the query and its K photos, nothing generated
    assert picture.size[0] == pictures.GAP + (1 + K) * (pictures.TILE + pictures.GAP)
    assert f'{K}' in capsys.readouterr().out
    check_error(capsys, ['--query_name', query, '--data_base', checkpoint, '--show_generated', '--save_root',
                         tmp_path / 'other'], "--show_generated: '")
    assert not (tmp_path / 'other').exists()
