"""Fine-grained ZS-SBIR: Sketchy's file-name rule for instance pairs, Acc@k against a hand-worked example with ties
and a slow reference, the generated dataset's pairs, and train.py / test.py --fine_grained end to end."""
from pathlib import Path

import numpy as np
import pytest
import torch

import prepare
import test as retrieval
from helpers import DEVICE, TINY, cli_checker, tiny
from train import main as train_main, train
from utils import PHOTO, SKETCH, Split, fine_grained_accuracy, instance_pairs, scan_split
from zs_sbir.checkpoint import VECTORS_FORMAT, load_torch
from zs_sbir.config import parse_args
from zs_sbir.evaluation import fine_grained_metrics
from zs_sbir.safe_files import read_csv
from zs_sbir.synthetic import FAMILIES, make_synthetic, random_pose, random_shape


def split_of(items):
    """A Split of (path, class) items; the domain is the path's first folder."""
    classes = sorted({name for _, name in items})
    return Split(Path('/data'), classes, [p for p, _ in items], [classes.index(n) for _, n in items],
                 [SKETCH if p.startswith('sketch/') else PHOTO for p, _ in items])


def test_pairs_follow_sketchys_file_name_rule():
    split = split_of([('photo/cat/n01_10.jpg', 'cat'), ('photo/cat/n01_2.jpg', 'cat'), ('photo/cat/x-1.jpg', 'cat'),
                      ('photo/dog/n01_10.jpg', 'dog'),
                      ('sketch/cat/n01_10-1.png', 'cat'), ('sketch/cat/n01_10-12.png', 'cat'),
                      ('sketch/cat/n01_2.png', 'cat'),  # no -<n>
                      ('sketch/cat/n01_3-1.png', 'cat'),  # no such photo
                      ('sketch/cat/x-1-2.png', 'cat'),  # a photo stem with a dash of its own
                      ('sketch/cat/n01_2-a.png', 'cat'),  # not a number
                      ('sketch/dog/n01_2-1.png', 'dog'),  # that photo is a cat's
                      ('sketch/dog/n01_10-4.png', 'dog')])
    assert instance_pairs(split) == [-1, -1, -1, -1, 0, 0, -1, -1, 2, -1, -1, 3]


def test_acc_at_k_by_hand_with_ties():
    """One query direction, photos at similarity 1 (x2, a tie), 0 and -1 in its class, and a class-1 photo at 1
    that does not count. Own photo 2 ties with photo 0, whose lower index ranks first: rank 2."""
    gallery = torch.tensor([[1., 0], [0, 1], [1, 0], [-1, 0], [1, 0]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    queries = torch.tensor([[2., 0]] * 4)  # unnormalised: cosine similarity all the same
    own = torch.tensor([2, 0, 1, 3])
    ranks = fine_grained_accuracy(queries, torch.zeros(4), own, gallery, labels, per_query=True)
    assert ranks.tolist() == [2, 1, 3, 4]
    assert fine_grained_accuracy(queries, torch.zeros(4), own, gallery, labels, ks=(1, 2, 3, 5)) == \
        {'Acc@1': 0.25, 'Acc@2': 0.5, 'Acc@3': 0.75, 'Acc@5': 1.0}
    with pytest.raises(ValueError, match="own photo must be a gallery photo of the query's class"):
        fine_grained_accuracy(queries[:1], torch.zeros(1), torch.tensor([4]), gallery, labels)


def slow_ranks(queries, query_labels, own, gallery, gallery_labels):
    """From the definition: sort the query's own-class photos by (-cosine, index); the own photo's place."""
    ranks = []
    for q, label, mine in zip(queries.tolist(), query_labels.tolist(), own.tolist()):
        scored = []
        for j, (g, g_label) in enumerate(zip(gallery.tolist(), gallery_labels.tolist())):
            if g_label == label:
                cosine = float(np.dot(q, g) / np.linalg.norm(q) / np.linalg.norm(g))
                scored.append((-cosine, j))
        ranks.append([j for _, j in sorted(scored)].index(mine) + 1)
    return ranks


def test_the_gallery_is_the_photos_that_sketches_show():
    """A photo no sketch shows (Sketchy's extended photos) stays out of the gallery, as in CLIP-AT's: here it
    would take first place for sketch a-1."""
    split = split_of([('photo/cat/a.jpg', 'cat'), ('photo/cat/b.jpg', 'cat'), ('photo/cat/c.jpg', 'cat'),
                      ('sketch/cat/a-1.png', 'cat'), ('sketch/cat/b-1.png', 'cat')])
    vectors = torch.tensor([[0.9, 0.1], [0., 1], [1, 0], [1, 0], [0, 1]])
    assert fine_grained_metrics(vectors, split) == {'fg_Acc@1': 1.0, 'fg_Acc@5': 1.0, 'fg_Acc@10': 1.0}
    with_c = fine_grained_accuracy(vectors[[3, 4]], torch.zeros(2), torch.tensor([0, 1]), vectors[:3], torch.zeros(3))
    assert with_c['Acc@1'] == 0.5


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_acc_at_k_equals_a_slow_reference(seed):
    rng = np.random.default_rng(seed)
    gallery = torch.tensor(rng.integers(-2, 3, size=(40, 3)), dtype=torch.float64)  # few values: many ties
    gallery[(gallery == 0).all(1)] = 1.0
    gallery_labels = torch.tensor(rng.integers(0, 3, size=40))
    own = torch.tensor(rng.integers(0, 40, size=25))
    query_labels = gallery_labels[own]
    queries = torch.tensor(rng.integers(-2, 3, size=(25, 3)), dtype=torch.float64)
    queries[(queries == 0).all(1)] = 1.0
    expected = slow_ranks(queries, query_labels, own, gallery, gallery_labels)
    assert fine_grained_accuracy(queries, query_labels, own, gallery, gallery_labels, per_query=True,
                                 max_memory_mb=1e-4).tolist() == expected  # one query per block, too
    accuracy = fine_grained_accuracy(queries, query_labels, own, gallery, gallery_labels)
    assert accuracy == {f'Acc@{k}': np.mean(np.array(expected) <= k) for k in (1, 5, 10)}


@pytest.mark.parametrize('seed', [0, 1, 5])
def test_generated_pairs_are_sketchy_pairs_of_one_shape_and_pose(tmp_path, seed):
    make_synthetic(tmp_path, **{**TINY, 'seed': seed, 'num_sketches': 5}, pairs=True)
    for name in ('train', 'val'):
        split = scan_split(tmp_path, 'synthetic', name)
        pairs = instance_pairs(split)
        photos = split.count(PHOTO) // len(split.classes)
        assert all(pairs[i] >= 0 for i in split.indices(SKETCH))  # every sketch has its own photo
        for label in range(len(split.classes)):  # sketch j of a class: <class>_<j mod photos>-<j // photos + 1>
            names = sorted(Path(split.paths[i]).stem for i in split.indices(SKETCH) if split.labels[i] == label)
            assert names == sorted(f'{split.classes[label]}_{j % photos:04d}-{j // photos + 1}' for j in range(5))
        assert all(Path(split.paths[pairs[i]]).stem == Path(split.paths[i]).stem.rsplit('-', 1)[0]
                   for i in split.indices(SKETCH))
        # the sketch is drawn where its photo's pose puts the shape
        assert pose_agreement(split, pairs, seed) > 0.7
    plain = tmp_path / 'plain'
    make_synthetic(plain, **{**TINY, 'seed': seed})
    assert set(instance_pairs(scan_split(plain, 'synthetic', 'val'))) == {-1}


def pose_agreement(split, pairs, seed):
    """Share of sketches whose strokes' centroid lies nearer the centre of their own photo's pose than the mean
    distance to the other photos' centres of the class (photos draw a random pose from the instance's stream)."""
    from PIL import Image

    def pose_centre(photo_path, label):
        number = int(Path(photo_path).stem.rsplit('_', 1)[1])
        instance = np.random.default_rng([seed, list(FAMILIES).index(split.classes[label]), 2, number])
        random_shape(split.classes[label], instance)  # the stream's first draws: the shape
        return (0.5 + random_pose(instance)[2]) * TINY['img_size']  # (x, y) in pixels

    wins = []
    for i in split.indices(SKETCH):
        dark = np.asarray(Image.open(split.root / split.paths[i]).convert('L')) < 128
        ys, xs = dark.nonzero()
        centroid = np.array([xs.mean(), ys.mean()])
        others = [j for j in split.indices(PHOTO) if split.labels[j] == split.labels[i] and j != pairs[i]]
        own = np.linalg.norm(centroid - pose_centre(split.paths[pairs[i]], split.labels[i]))
        wins.append(own < np.mean([np.linalg.norm(centroid - pose_centre(split.paths[j], split.labels[j]))
                                   for j in others]))
    return np.mean(wins)


@pytest.fixture(scope='module')
def paired_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('paired')
    make_synthetic(root, **TINY, pairs=True)
    return root


check_train = cli_checker(train_main)
check_test = cli_checker(retrieval.main)


def test_train_and_test_score_fine_grained(paired_data, tiny_data, tmp_path, capsys):
    best = train(parse_args(tiny(paired_data, tmp_path, '--epochs', '1', '--fine_grained', '--warmup', '0')))
    prefix = tmp_path / 'synthetic_acnet_resnet50_8_fg'
    rows = read_csv(f'{prefix}_results.csv')
    assert len(rows) == 1 and all(f'fg_Acc@{k}' in rows[0] for k in (1, 5, 10))
    assert 'fine-grained Acc@1' in capsys.readouterr().out
    vectors = load_torch(f'{prefix}_vectors.pth', VECTORS_FORMAT, 'vectors')  # the best epoch's, in saved order
    split = Split(paired_data / 'synthetic' / 'val', vectors['classes'], vectors['paths'], vectors['labels'].tolist(),
                  vectors['domains'].tolist())
    expected = fine_grained_metrics(vectors['vectors'], split)
    assert best['fg_Acc@1'] == pytest.approx(expected['fg_Acc@1']) and 0 <= expected['fg_Acc@1'] <= 1
    assert expected['fg_Acc@1'] <= expected['fg_Acc@5'] <= expected['fg_Acc@10']
    metrics = retrieval.main(['--evaluate', '--fine_grained', '--data_base', f'{prefix}_model.pth', '--workers', '0',
                              '--device', DEVICE])
    for k in (1, 5, 10):
        assert metrics[f'fg_Acc@{k}'] == pytest.approx(expected[f'fg_Acc@{k}'], abs=1e-6)
    assert "fine-grained (each sketch's own photo among its class's photos): Acc@1" in capsys.readouterr().out
    free = retrieval.main(['--evaluate', '--training_free', '--fine_grained', '--no_pretrained', '--data_root',
                           str(paired_data), '--data_name', 'synthetic', '--img_size', '32', '--workers', '0',
                           '--device', DEVICE])
    assert 0 <= free['fg_Acc@1'] <= free['fg_Acc@10'] <= 1

    # --eval_queries: each epoch scores the sampled sketches' pairs, the selected epoch all of them
    train(parse_args(tiny(paired_data, tmp_path / 'sampled', '--epochs', '1', '--fine_grained', '--warmup', '0',
                          '--eval_queries', '3')))
    rows = read_csv(tmp_path / 'sampled' / 'synthetic_acnet_resnet50_8_fg_results.csv')
    assert [r['eval_queries'] for r in rows] == ['3', 'all'] and all(r['fg_Acc@1'] != '' for r in rows)
    full = retrieval.main(['--evaluate', '--fine_grained', '--data_base',
                           str(tmp_path / 'sampled' / 'synthetic_acnet_resnet50_8_fg_model.pth'), '--workers', '0',
                           '--device', DEVICE])
    assert all(float(rows[-1][f'fg_Acc@{k}']) == pytest.approx(full[f'fg_Acc@{k}'], abs=1e-6) for k in (1, 5, 10))

    # a dataset without pairs: one line, before anything is written
    check_train(capsys, tiny(tiny_data, tmp_path / 'none', '--epochs', '1', '--fine_grained'),
                r"--fine_grained: no sketch in '.*' has its own photo by Sketchy's file-name rule")
    assert not (tmp_path / 'none').exists()
    check_test(capsys, ['--evaluate', '--fine_grained', '--training_free', '--no_pretrained', '--data_root', tiny_data,
                        '--data_name', 'synthetic', '--img_size', '32'], r'--fine_grained: no sketch in')
    check_test(capsys, ['--fine_grained', '--data_base', f'{prefix}_model.pth'],
               '--training_free, --gzs and --fine_grained go with --evaluate')


def test_prepare_writes_pairs(tmp_path, capsys):
    prepare.main(['synthetic', '--data_root', str(tmp_path), '--pairs', '--num_classes', '3', '--num_val_classes', '1',
                  '--num_sketches', '3', '--num_photos', '2', '--num_val_photos', '2', '--img_size', '16',
                  '--workers', '1'])
    split = scan_split(tmp_path, 'synthetic', 'val')
    assert sorted(Path(split.paths[i]).stem.split('_')[-1] for i in split.indices(SKETCH)) == \
        ['0000-1', '0000-2', '0001-1']
