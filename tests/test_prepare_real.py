"""prepare.py sketchy/tuberlin: the split builder on fake raw download trees."""
import pytest
from PIL import Image

from helpers import raw_quickdraw

from prepare import FOLDER_ALIASES, build_real_split, class_key, print_split_summary, read_class_list
from zs_sbir.cli import DataError, UserError
from utils import PHOTO, SKETCH, scan_split


def image(path, shade):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (4, 4), (shade % 256, shade // 256 % 256, 7)).save(path, format='PNG')  # lossless: unique bytes


def raw_sketchy(root, classes, sketches=2, photos=2):
    """sketch/<class>/, photo/<class>/ and an extension folder that repeats every original photo
    (byte-identical, as Sketchy Extended does) and adds one new photo per class."""
    for c, name in enumerate(classes):
        for i in range(sketches):
            image(root / 'sketch' / name / f'{name}_{i}-1.png', 1000 + 10 * c + i)
        for i in range(photos):
            image(root / 'photo' / name / f'n{c}_{i}.jpg', 5000 + 10 * c + i)
            image(root / 'extension' / name.replace('-', '_') / f'n{c}_{i}.jpg', 5000 + 10 * c + i)
        image(root / 'extension' / name.replace('-', '_') / f'ext_{c}.jpg', 30000 + c)
    return root


def test_sketchy_split_counts_duplicates_and_links(tmp_path):
    classes = read_class_list('sketchy_all')
    raw = raw_sketchy(tmp_path / 'raw', classes)
    # the same file name with different bytes in the two photo folders: both kept, renamed
    image(raw / 'extension' / 'airplane' / 'n0_0.jpg', 777)
    summary = build_real_split('sketchy', '25', [raw / 'sketch'], [raw / 'photo', raw / 'extension'],
                               tmp_path / 'data')
    assert summary['train']['classes'] == 100 and summary['val']['classes'] == 25
    assert summary['train']['sketch'] == 200 and summary['val']['sketch'] == 50
    # per class: 2 originals + 1 new, the 2 repeats left out (airplane: 1 repeat + 1 renamed)
    assert summary['train']['photo'] + summary['val']['photo'] == 125 * 3 + 1
    assert summary['train']['duplicates'] + summary['val']['duplicates'] == 125 * 2 - 1

    val = scan_split(tmp_path / 'data', 'sketchy', 'val')
    assert val.classes == read_class_list('sketchy_zeroshot25_test')
    assert val.count(SKETCH) == 50 and val.count(PHOTO) == 25 * 3 + 1  # airplane (a test class) has the extra
    linked = val.root / val.paths[0]
    assert linked.is_symlink() and linked.resolve().is_relative_to((tmp_path / 'raw').resolve())
    airplane = scan_split(tmp_path / 'data', 'sketchy', 'val').root / 'photo' / 'airplane'
    assert sorted(p.name for p in airplane.iterdir()) == ['ext_0.jpg', 'n0_0.jpg', 'n0_0__1.jpg', 'n0_1.jpg']
    train = scan_split(tmp_path / 'data', 'sketchy', 'train')
    assert not set(train.classes) & set(val.classes)


def test_copy_mode_and_refusing_to_overwrite(tmp_path):
    raw = raw_sketchy(tmp_path / 'raw', read_class_list('sketchy_all'), photos=1)
    build_real_split('sketchy', '21', [raw / 'sketch'], [raw / 'photo'], tmp_path / 'data', copy=True)
    split = scan_split(tmp_path / 'data', 'sketchy', 'val')
    assert len(split.classes) == 21 and not (split.root / split.paths[0]).is_symlink()
    with pytest.raises(UserError, match="already exists: remove it, pass --overwrite"):
        build_real_split('sketchy', '21', [raw / 'sketch'], [raw / 'photo'], tmp_path / 'data')
    build_real_split('sketchy', '21', [raw / 'sketch'], [raw / 'photo'], tmp_path / 'data', overwrite=True)


def test_tuberlin_raw_spellings_are_matched(tmp_path):
    classes = read_class_list('tuberlin_all')
    misspelled = {v: k for k, v in FOLDER_ALIASES.items()}  # class name -> raw folder name
    for c, name in enumerate(classes):
        image(tmp_path / 'png' / name / f'{c}.png', c)
        raw_name = misspelled.get(name, class_key(name))  # separators dropped, as the raw archive does
        image(tmp_path / 'ImageResized' / raw_name / f'{c}.jpg', 2000 + c)
    summary = build_real_split('tuberlin', '30', [tmp_path / 'png'], [tmp_path / 'ImageResized'], tmp_path / 'data')
    assert summary['val']['classes'] == 30 and summary['val']['photo'] == 30
    photos = tmp_path / 'data' / 'tuberlin' / 'train' / 'photo'
    assert (photos / 'giraffe').is_dir() and (photos / 'mouse (animal)').is_dir()


def test_missing_classes_and_unexpected_trees(tmp_path):
    classes = read_class_list('sketchy_all')
    raw = raw_sketchy(tmp_path / 'raw', classes, photos=1)
    for name in ('cow', 'zebra'):
        for f in (raw / 'photo' / name).iterdir():
            f.unlink()
        (raw / 'photo' / name).rmdir()
    with pytest.raises(DataError, match=r'2 sketchy classes have no photo folder: cow, zebra'):
        build_real_split('sketchy', '25', [raw / 'sketch'], [raw / 'photo'], tmp_path / 'data')
    with pytest.raises(DataError, match=r"folders that are not classes of this dataset: extension, photo, sketch \(point it at"):
        build_real_split('sketchy', '25', [raw], [raw / 'photo'], tmp_path / 'data')
    image(tmp_path / 'flat' / 'a.png', 1)
    with pytest.raises(DataError, match=r"should hold one folder per class .*1 loose images"):
        build_real_split('sketchy', '25', [tmp_path / 'flat'], [raw / 'photo'], tmp_path / 'data')
    with pytest.raises(DataError, match="sketch folder not found"):
        build_real_split('sketchy', '25', [tmp_path / 'nowhere'], [raw / 'photo'], tmp_path / 'data')
    assert not (tmp_path / 'data').exists()  # nothing half-written


def test_summary_compares_with_the_published_test_set(capsys):
    summary = {'out': 'data/sketchy', 'split': 'sketchy_zeroshot25',
               'train': {'classes': 100, 'sketch': 1, 'photo': 1, 'duplicates': 0},
               'val': {'classes': 25, 'sketch': 15229, 'photo': 17101, 'duplicates': 12500}}
    print_split_summary(summary)
    assert '(matches)' in capsys.readouterr().out
    summary['val']['photo'] = 29601
    print_split_summary(summary)
    assert 'differs: found 15229 and 29601' in capsys.readouterr().out


def test_quickdraw_lists_are_the_published_split():
    train, test = read_class_list('quickdraw_zeroshot30_train'), read_class_list('quickdraw_zeroshot30_test')
    assert len(train) == 80 and len(test) == 30 and not set(train) & set(test)
    assert sorted(train + test) == read_class_list('quickdraw_all') and 'class_labels.txt' not in train + test
    assert {'bat', 'zebra', 'fan', 'palm tree', 'fire_hydrant', 'megaphone'} <= set(test)
    assert {'pear', 'sword', 'bed'}.isdisjoint(train + test)  # from an older, wrong zero-shot list


@pytest.mark.parametrize('tops', [('QuickDraw_sketches_final', 'QuickDraw_images_final'), ('sketches', 'images')])
def test_quickdraw_builds_from_the_raw_download(tmp_path, tops):
    classes = read_class_list('quickdraw_all')
    spelled = [c.replace(' ', '_') if c == 'palm tree' else c for c in classes]  # doodle2search's spelling
    raw = raw_quickdraw(tmp_path / 'raw', spelled, per_class=2, sketch_top=tops[0], photo_top=tops[1])
    summary = build_real_split('quickdraw', '30', [raw], [raw], tmp_path / 'data')  # the download's root works
    assert (summary['train']['classes'], summary['val']['classes']) == (80, 30)
    assert (summary['val']['sketch'], summary['val']['photo']) == (60, 60)
    assert (summary['train']['sketch'], summary['train']['photo']) == (160, 160)
    val = scan_split(tmp_path / 'data', 'quickdraw', 'val')
    assert val.classes == sorted(read_class_list('quickdraw_zeroshot30_test'))
    first = f'image_{2 * classes.index("palm tree")}.jpg'
    link = tmp_path / 'data' / 'quickdraw' / 'val' / 'photo' / 'palm tree' / first
    assert link.is_symlink() and link.resolve() == (raw / tops[1] / 'palm_tree' / first).resolve()
    assert not list((tmp_path / 'data').glob('.*partial'))
    assert val.count(SKETCH) == 60 and val.count(PHOTO) == 60


def test_quickdraw_errors_name_the_classes(tmp_path, capsys):
    classes = read_class_list('quickdraw_all')
    raw = raw_quickdraw(tmp_path / 'raw', [c for c in classes if c != 'zebra'], per_class=2)
    with pytest.raises(DataError, match="1 quickdraw classes have no sketch folder: zebra"):
        build_real_split('quickdraw', '30', [raw], [raw], tmp_path / 'data')
    image(raw / 'QuickDraw_sketches_final' / 'zebra' / '1.png', 1)
    image(raw / 'QuickDraw_images_final' / 'zebra' / 'image_1.jpg', 2)
    image(raw / 'QuickDraw_sketches_final' / 'unicorn' / '1.png', 3)
    with pytest.raises(DataError, match="has folders that are not classes of this dataset: unicorn"):
        build_real_split('quickdraw', '30', [raw], [raw], tmp_path / 'data')
    assert not (tmp_path / 'data' / 'quickdraw').exists()
    print_split_summary({'out': tmp_path, 'split': 'quickdraw_zeroshot30', 'train': {'classes': 80, 'sketch': 1,
                         'photo': 1, 'duplicates': 0}, 'val': {'classes': 30, 'sketch': 92291, 'photo': 54151,
                                                              'duplicates': 0}})
    assert 'published test set of this split: 92291 sketches, 54151 photos (matches)' in capsys.readouterr().out
