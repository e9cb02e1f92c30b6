"""Dataset folders, image loading, training items, the sampler and the generated dataset."""
import hashlib

import numpy as np
import pytest
import torch

import prepare
from helpers import TINY, make_tree, write_image
from zs_sbir.synthetic import FAMILIES, make_synthetic, random_shape, render_photo, render_sketch, synthetic_classes
from zs_sbir.cli import DataError
from zs_sbir.images import load_image, FileImages
from utils import PHOTO, SKETCH, describe_split, hold_out, scan_split
from zs_sbir.datasets import EpochSampler, SketchPhotoPairs, SplitDataset


def test_scan_labels_domains_and_formats(tmp_path):
    root = tmp_path / 'toy' / 'train'
    write_image(root / 'sketch' / 'cat' / 'a.PNG', 'L')
    write_image(root / 'sketch' / 'cat' / 'b.jpeg')
    write_image(root / 'photo' / 'cat' / 'c.JPG', fmt='JPEG')
    write_image(root / 'sketch' / 'ant' / 'd.png', 'RGBA')
    write_image(root / 'photo' / 'ant' / 'e.jpg')
    write_image(root / 'photo' / 'ant' / 'f.png', 'P')
    (root / 'photo' / 'ant' / 'notes.txt').write_text('not an image')
    (root / 'photo' / 'ant' / '.DS_Store').write_text('hidden')

    split = scan_split(tmp_path, 'toy', 'train')
    assert split.classes == ['ant', 'cat']  # sorted: label = index in sorted order
    items = sorted(zip(split.paths, split.labels, split.domains))
    assert items == [('photo/ant/e.jpg', 0, PHOTO), ('photo/ant/f.png', 0, PHOTO), ('photo/cat/c.JPG', 1, PHOTO),
                     ('sketch/ant/d.png', 0, SKETCH), ('sketch/cat/a.PNG', 1, SKETCH),
                     ('sketch/cat/b.jpeg', 1, SKETCH)]
    assert [p.name for p in split.ignored_files] == ['notes.txt']
    assert 'ignored 1 files that are not .jpg/.jpeg/.png, e.g.' in describe_split(split, 'train')
    assert split.count(SKETCH) == 3 and split.count(PHOTO) == 3


@pytest.mark.parametrize('mode, expected', [('RGB', (200, 30, 40)), ('L', (90, 90, 90)),
                                            ('RGBA', (255, 255, 255)), ('LA', (90, 90, 90))])
def test_load_image_any_mode_to_rgb(tmp_path, mode, expected):
    path = write_image(tmp_path / 'x.png', mode, size=(7, 5))
    image = load_image(path, 8)
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert image[:, 4, 4].tolist() == list(expected)  # transparent pixels become white


def test_load_image_corrupt_file_names_it(tmp_path):
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'\xff\xd8 not really a jpeg')
    with pytest.raises(DataError, match='broken.jpg'):
        load_image(bad, 8)


def test_tuberlin_val_drops_classes_with_few_photos(tmp_path):
    make_tree(tmp_path / 'tuberlin', {'val': {'sketch': {'big': 2, 'small': 3}, 'photo': {'big': 400, 'small': 399}}})
    split = scan_split(tmp_path, 'tuberlin', 'val')
    assert split.classes == ['big'] and split.dropped_classes == ['small']
    assert split.count(SKETCH) == 2 and split.count(PHOTO) == 400  # the small class's sketches go too
    # the rule is TU-Berlin val only
    make_tree(tmp_path / 'other', {'val': {'sketch': {'big': 1, 'small': 1}, 'photo': {'big': 1, 'small': 1}}})
    assert scan_split(tmp_path, 'other', 'val').classes == ['big', 'small']


@pytest.mark.parametrize('layout, data_name, pattern', [
    (None, 'toy', 'data root not found'),
    ({}, 'toy', r"train folder of dataset 'toy' not found: .* \(expected <data_root>/<data_name>/\{train,val\}"),
    ({'train': {'sketch': {'a': 1}}}, 'toy', r"'photo' folder not found"),
    ({'train': {'sketch': {'a': 1, 'cow': 1}, 'photo': {'a': 1}}}, 'toy', r"one side only: 'cow' \(only in sketch/\)"),
    ({'train': {'sketch': {'a': 1}, 'photo': {'a': 0}}}, 'toy', r"class 'a' has no images in .*photo/a"),
    ({'train': {'sketch': {}, 'photo': {}}}, 'toy', 'no class folders'),
])
def test_scan_errors_are_clear(tmp_path, layout, data_name, pattern):
    root = tmp_path / 'root'
    if layout is not None:
        root.mkdir()
        (root / data_name).mkdir()
        for split, sides in layout.items():
            for side in sides:
                (root / data_name / split / side).mkdir(parents=True)
        make_tree(root / data_name, layout)
    with pytest.raises(DataError, match=pattern) as error:
        scan_split(root, data_name, 'train')
    assert '\n' not in str(error.value)  # one line


def test_a_data_root_that_is_a_file_is_named(tmp_path):
    (tmp_path / 'file').write_text('x')
    with pytest.raises(DataError, match=r"data root '.*file' is a file, not a folder"):
        scan_split(tmp_path / 'file', 'toy', 'train')


def test_links_to_missing_files_are_named_not_dropped(tmp_path):
    root = make_tree(tmp_path / 'root' / 'toy', {'val': {'sketch': {'a': 2, 'b': 1}, 'photo': {'a': 3, 'b': 1}}})
    gone = tmp_path / 'raw' / 'moved.jpg'
    (root / 'val' / 'photo' / 'a' / 'linked.jpg').symlink_to(gone)
    with pytest.raises(DataError, match=r"1 files in .* are links to files that no longer exist, e\.g\. "
                                        r"'.*photo/a/linked.jpg' -> '.*raw/moved.jpg': rebuild"):
        scan_split(tmp_path / 'root', 'toy', 'val')
    kept = scan_split(tmp_path / 'root', 'toy', 'val', keep_broken_links=True)
    assert 'photo/a/linked.jpg' in kept.paths and kept.count(PHOTO) == 5  # --skip_bad_images drops it later
    for old in (root / 'val' / 'photo' / 'b').iterdir():  # a class of dangling links only
        old.unlink()
    (root / 'val' / 'photo' / 'b' / 'x.jpg').symlink_to(gone)
    with pytest.raises(DataError, match='2 files in .* are links to files that no longer exist'):
        scan_split(tmp_path / 'root', 'toy', 'val')


def test_pairs_draw_a_photo_of_the_sketch_class(tiny_data):
    split = scan_split(tiny_data, 'synthetic', 'train')
    images = FileImages(split.root, split.paths, 32, 'bilinear')
    pairs = SketchPhotoPairs(split, images)
    assert len(pairs) == split.count(SKETCH)
    drawn = set()
    for i in range(len(pairs)):
        sketch, photo, label = pairs[(i, 7)]
        assert sketch.shape == photo.shape == (3, 32, 32)
        # the photo is one of the photos of the same class
        matches = [j for j in split.indices(PHOTO) if torch.equal(images[j], photo)]
        assert matches and all(split.labels[j] == label for j in matches)
        assert label == split.labels[pairs.sketches[i]]
        drawn.add(matches[0])
    assert len(drawn) > 1
    # the same key always gives the same item
    assert all(torch.equal(a, b) for a, b in zip(pairs[(3, 7)][:2], pairs[(3, 7)][:2]))


def test_split_dataset_items(tiny_data):
    split = scan_split(tiny_data, 'synthetic', 'val')
    data = SplitDataset(split, FileImages(split.root, split.paths, 32, 'bicubic'))
    image, label, domain, index = data[5]
    assert (label, domain, index) == (split.labels[5], split.domains[5], 5)
    assert torch.equal(image, load_image(split.root / split.paths[5], 32, 'bicubic'))


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    def order(epoch, rank=0, replicas=1, seed=1):
        sampler = EpochSampler(10, seed, rank=rank, num_replicas=replicas)
        sampler.set_epoch(epoch)
        return list(sampler)
    assert order(1) == order(1) and order(1) != order(2) and order(1, seed=2) != order(1)
    assert sorted(i for i, _ in order(1)) == list(range(10))
    shards = [order(1, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded to equal shares, as DistributedSampler
    assert set(i for s in shards for i, _ in s) == set(range(10))
    plain = EpochSampler(5, 0, shuffle=False, rank=1, num_replicas=2)
    assert [i for i, _ in plain] == [1, 3] and len(plain) == 2


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob('*') if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_synthetic_is_deterministic_and_zero_shot(tmp_path, tiny_data):
    again = make_synthetic(tmp_path / 'again', **TINY, workers=3)  # parallel drawing: the same files
    assert _digest(again) == _digest(tiny_data / 'synthetic')
    other = make_synthetic(tmp_path / 'other', **{**TINY, 'seed': TINY['seed'] + 1})
    assert _digest(other) != _digest(again)

    train, val = scan_split(tiny_data, 'synthetic', 'train'), scan_split(tiny_data, 'synthetic', 'val')
    assert not set(train.classes) & set(val.classes)
    assert len(train.classes) == TINY['num_classes'] - TINY['num_val_classes'] and len(val.classes) == 2
    assert train.count(SKETCH) == 4 * TINY['num_sketches'] and val.count(PHOTO) == 2 * TINY['num_val_photos']
    assert [p.suffix for p in (train.root / p for p in train.paths)].count('.png') == train.count(SKETCH)


def test_synthetic_sketches_are_strokes_on_white_and_photos_are_not(tiny_data):
    split = scan_split(tiny_data, 'synthetic', 'train')
    images = FileImages(split.root, split.paths, 32, 'bilinear')
    sketches = torch.stack([images[i] for i in split.indices(SKETCH)]).float()
    photos = torch.stack([images[i] for i in split.indices(PHOTO)]).float()
    white = (sketches > 230).all(dim=1).float().mean(dim=(1, 2))
    dark = (sketches < 128).all(dim=1).float().mean(dim=(1, 2))
    assert (white > 0.7).all() and (dark > 0.01).all()  # mostly white, some dark stroke pixels
    assert (sketches.std(dim=1) < 1).all()  # grey: channels equal
    assert photos.std(dim=1).mean() > 20  # colourful
    assert ((photos > 230).all(dim=1).float().mean(dim=(1, 2)) < 0.5).all()


def test_synthetic_class_choice_errors():
    train, val = synthetic_classes(10, 3, seed=0)
    assert len(train) == 7 and len(val) == 3 and not set(train) & set(val)
    with pytest.raises(DataError, match='--num_classes'):
        synthetic_classes(len(FAMILIES) + 1, 3, seed=0)
    with pytest.raises(DataError, match='--num_val_classes'):
        synthetic_classes(5, 5, seed=0)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_every_family_draws_a_closed_outline_as_sketch_and_photo(family):
    rng = np.random.default_rng(7)
    parts = random_shape(family, rng)
    outline = parts[0][0]
    assert outline.ndim == 2 and outline.shape[1] == 2 and len(outline) >= 3 and np.isfinite(outline).all()
    x, y = outline.T
    area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace formula
    assert 0.2 < area < 5, area  # a shape of about unit size, not a point, a line or an explosion
    sketch, photo = np.asarray(render_sketch(parts, rng, 32)), np.asarray(render_photo(parts, rng, 32))
    assert sketch.shape == (32, 32) and (sketch < 100).mean() > 0.01 and (sketch > 200).mean() > 0.5
    assert photo.shape == (32, 32, 3) and photo.std() > 10


@pytest.mark.parametrize('seed', [1, 2, 5])
def test_other_seeds_build_a_dataset(tmp_path, seed):
    """Every seed draws other families (seed 0 alone missed the heart and the teardrop once)."""
    out = make_synthetic(tmp_path, num_classes=20, num_val_classes=5, num_sketches=1, num_photos=1,
                         num_val_photos=1, img_size=32, seed=seed)
    train, val = synthetic_classes(20, 5, seed)
    assert scan_split(tmp_path, 'synthetic', 'train').classes == train
    assert scan_split(tmp_path, 'synthetic', 'val').classes == val
    assert len(list(out.rglob('*.png'))) == 20 and len(list(out.rglob('*.jpg'))) == 20


def test_all_families_build_from_the_command_line(tmp_path):
    prepare.main(['synthetic', '--data_root', str(tmp_path), '--num_classes', str(len(FAMILIES)), '--num_sketches',
                  '1', '--num_photos', '1', '--num_val_photos', '1', '--img_size', '32', '--seed', '4'])
    classes = {p.name for p in (tmp_path / 'synthetic').glob('*/sketch/*')}
    assert classes == set(FAMILIES) and len(FAMILIES) == 34


def test_hold_out_takes_a_share_of_every_class_and_domain(tiny_data):
    split = scan_split(tiny_data, 'synthetic', 'train')  # 4 classes x 4 sketches + 4 photos
    kept, held = hold_out(split, 0.25, seed=1)
    assert not set(kept.paths) & set(held.paths) and len(kept) + len(held) == len(split)
    assert kept.classes == held.classes == split.classes
    for label in range(4):
        for domain in (SKETCH, PHOTO):
            count = sum(1 for l, d in zip(held.labels, held.domains) if (l, d) == (label, domain))
            assert count == 1  # round(0.25 * 4)
    assert hold_out(split, 0.25, seed=1)[1].paths == held.paths != hold_out(split, 0.25, seed=2)[1].paths
    lonely = split.subset([i for i in range(len(split)) if not (split.labels[i] == 0 and split.domains[i] == PHOTO)]
                          + [split.indices(PHOTO)[0]])
    with pytest.raises(DataError, match="has 1 photo: holding out part of every seen class needs at least 2"):
        hold_out(lonely, 0.25, seed=1)
