"""Dataset preparation commands.

    python prepare.py synthetic --data_root data        # generated zero-shot dataset, offline, seconds
    python prepare.py sketchy --split 25 --sketch_dir RAW/sketch/tx_000000000000 \
                              --photo_dir RAW/photo/tx_000000000000 RAW/EXTEND_image_sketchy
    python prepare.py tuberlin --sketch_dir RAW/png --photo_dir RAW/ImageResized
    python prepare.py quickdraw --sketch_dir RAW/QuickDraw_sketches_final --photo_dir RAW/QuickDraw_images_final
    python prepare.py cache --data_name sketchy         # decode + resize every image once, for --cache

`synthetic` writes <data_root>/synthetic/{train,val}/{sketch,photo}/<class>/ with the same layout as Sketchy
and TU-Berlin (synthetic.py draws it); the real datasets are built from their raw downloads as links (or
copies) in that layout; `cache` pre-resizes a dataset for train.py --cache.
"""
import argparse
import hashlib
import os
import re
import shutil
from itertools import chain, count
from pathlib import Path

import numpy as np

from methods import get_method, method_names
from zs_sbir.cli import DEFAULT_WORKERS, MAX_WORKERS, ArgumentParser, DataError, Limit, UserError, check_numbers, run_cli
from zs_sbir.images import is_image_file, read_rgb
from zs_sbir.image_cache import build_cache
from zs_sbir.safe_files import (acquire_lock, check_folder_replaceable, check_replaceable, check_writable_dir,
                        remove_stale_staging, staging_folder, swap_in)
from zs_sbir.synthetic import FAMILIES, make_synthetic, preview

# ----------------------------------------------------------------------------------------------
# Real datasets: raw class folders -> {train,val}/{sketch,photo}/<class>/ for a zero-shot split

SPLITS_DIR = Path(__file__).resolve().parent / 'splits'
SPLITS = {'sketchy': {'21': 'sketchy_zeroshot21', '25': 'sketchy_zeroshot25'},
          'tuberlin': {'30': 'tuberlin_zeroshot30'}, 'quickdraw': {'30': 'quickdraw_zeroshot30'}}
# (test sketches, test photos) of each split, from the published file lists (splits/README.md)
KNOWN_TEST_SIZES = {'sketchy_zeroshot21': (12694, 12553), 'sketchy_zeroshot25': (15229, 17101),
                    'tuberlin_zeroshot30': (2400, 27989), 'quickdraw_zeroshot30': (92291, 54151)}
# The raw QuickDraw-Extended download's top folders (some repos rename them sketches/ and images/): a
# --sketch_dir or --photo_dir that holds one of them is taken to mean that folder.
RAW_TOP_FOLDERS = {'quickdraw': {'sketch': ('QuickDraw_sketches_final', 'sketches'),
                                 'photo': ('QuickDraw_images_final', 'images')}}
# Folder names of the raw TU-Berlin Extended photo archive that no separator rule can match.
FOLDER_ALIASES = {'mouse': 'mouse (animal)', 'pipe': 'pipe (for smoking)', 'spacesshuttle': 'space shuttle',
                  'wristwatching': 'wrist-watch', 'tromobone': 'trombone', 'chandeler': 'chandelier',
                  'griaffe': 'giraffe', 'diamod': 'diamond', 'spidar': 'spider'}


def class_key(name):
    """Spelling-blind key: 'hot-air_balloon', 'hot air balloon' and 'hotairballoon' all match."""
    return re.sub('[^a-z0-9]', '', name.lower())


def read_class_list(name):
    return (SPLITS_DIR / f'{name}.txt').read_text().splitlines()


def match_class_folders(source, classes, what):
    """{class name: folder} for the class folders under `source`; unknown folders are an error."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{what} not found: '{source}'")
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith('.'))
    loose = [p.name for p in source.iterdir() if p.is_file() and is_image_file(p)]
    if loose or not folders:
        raise DataError(f"{what} '{source}' should hold one folder per class (<dir>/<class>/<images>), "
                        f"found {len(folders)} folders and {len(loose)} loose images")
    by_key = {class_key(c): c for c in classes}
    by_key.update({raw: name for raw, name in FOLDER_ALIASES.items() if name in classes and raw not in by_key})
    found, unknown = {}, []
    for folder in folders:
        name = by_key.get(class_key(folder.name))
        if name is None:
            unknown.append(folder.name)
        elif name in found:
            raise DataError(f"{what} '{source}': folders '{found[name].name}' and '{folder.name}' are both class '{name}'")
        else:
            found[name] = folder
    if unknown:
        raise DataError(f"{what} '{source}' has folders that are not classes of this dataset: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
                        f"(point it at the folder that holds the class folders)")
    return found


def _raw_top_folder(folder, dataset, side):
    """The raw download's top folder of `side` when `folder` holds it, else `folder` itself."""
    for name in RAW_TOP_FOLDERS.get(dataset, {}).get(side, ()):
        if (Path(folder) / name).is_dir():
            return Path(folder) / name
    return Path(folder)


def _images(folder):
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith('.'))


def _left_out(folder):
    """What a class folder holds that the build does not take: other files, subfolders (not searched)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith('.') and not (p.is_file() and is_image_file(p)))


def build_real_split(dataset, split, sketch_dirs, photo_dirs, data_root='data', data_name=None, copy=False,
                     overwrite=False):
    """Build <data_root>/<data_name>/{train,val}/... from raw class folders; returns a summary dict.

    Several photo folders (Sketchy's originals plus its extension) are merged per class; a photo whose
    bytes equal one already taken for that class is left out and counted.
    """
    split_name = SPLITS[dataset][split]
    sketch_dirs = [_raw_top_folder(d, dataset, 'sketch') for d in sketch_dirs]
    photo_dirs = [_raw_top_folder(d, dataset, 'photo') for d in photo_dirs]
    train_classes, test_classes = read_class_list(f'{split_name}_train'), read_class_list(f'{split_name}_test')
    all_classes = train_classes + test_classes
    sources = {'sketch': [match_class_folders(d, all_classes, 'sketch folder') for d in sketch_dirs],
               'photo': [match_class_folders(d, all_classes, 'photo folder') for d in photo_dirs]}
    for side, maps in sources.items():
        missing = [c for c in all_classes if not any(c in m for m in maps)]
        if missing:
            raise DataError(f"{len(missing)} {dataset} classes have no {side} folder: {', '.join(missing[:8])}"
                            f"{' ...' if len(missing) > 8 else ''}")
    check_not_swapped(dataset, sketch_dirs, photo_dirs, sources)
    out = Path(data_root) / (data_name or dataset)
    check_writable_dir(data_root, '--data_root')
    check_folder_replaceable(out, overwrite, [*sketch_dirs, *photo_dirs])
    Path(data_root).mkdir(parents=True, exist_ok=True)
    release = acquire_lock(Path(data_root) / f'.{out.name}.lock', f"dataset '{out}'",
                           hint='wait for it, or choose another --data_name')
    try:
        check_folder_replaceable(out, overwrite, [*sketch_dirs, *photo_dirs])
        remove_stale_staging(out)
        partial = staging_folder(out)
        summary = write_split(partial, sources, train_classes, test_classes, copy)
        swap_in(partial, out)
    finally:
        release()
    return {'out': out, 'split': split_name, **summary}


def write_split(folder, sources, train_classes, test_classes, copy):
    """Link (or copy) every class's images into folder/{train,val}/{sketch,photo}/<class>/; returns the counts.
    A photo whose bytes equal one already taken for its class is left out and counted."""
    summary = {s: {'classes': 0, 'sketch': 0, 'photo': 0, 'duplicates': 0} for s in ('train', 'val')}
    summary['left_out'] = []
    for name in train_classes + test_classes:
        target_split = 'train' if name in train_classes else 'val'
        summary[target_split]['classes'] += 1
        for side, maps in sources.items():
            target = folder / target_split / side / name
            target.mkdir(parents=True)
            seen = set()
            for index, mapping in enumerate(maps):
                summary['left_out'] += _left_out(mapping[name]) if name in mapping else []
                for path in _images(mapping[name]) if name in mapping else []:
                    if side == 'photo':
                        digest = hashlib.sha1(path.read_bytes()).hexdigest()
                        if digest in seen:
                            summary[target_split]['duplicates'] += 1
                            continue
                        seen.add(digest)
                    link = free_name(target, path, index)
                    if copy:
                        shutil.copy2(path, link)
                    else:
                        link.symlink_to(path.resolve())
                    summary[target_split][side] += 1
    return summary


def free_name(folder, path, index):
    """A name in `folder` for `path` that nothing has yet: its own, or (the same name with other bytes, from the
    `index`-th source folder) name__index, name__index_2, ..."""
    candidates = chain([path.name, f'{path.stem}__{index}{path.suffix}'],
                       (f'{path.stem}__{index}_{k}{path.suffix}' for k in count(2)))
    return next(folder / name for name in candidates if not os.path.lexists(folder / name))


def _sketch_like(path):
    """True for an image that looks like a sketch: no colour to speak of, and mostly white (None: unreadable)."""
    try:
        pixels = np.asarray(read_rgb(path).resize((64, 64)), dtype=np.int16)
    except DataError:
        return None
    colour = (pixels.max(axis=2) - pixels.min(axis=2)).mean()
    return colour < 10 and (pixels.min(axis=2) > 200).mean() > 0.5


def _named_like(folder, side):
    """True when a folder's name says it holds `side` ('sketch' or 'photo') and not the other."""
    words = ' '.join(Path(folder).resolve().parts[-2:]).lower()
    sketch, photo = 'sketch' in words, any(w in words for w in ('photo', 'image', 'img'))
    return sketch and not photo if side == 'sketch' else photo and not sketch


def check_not_swapped(dataset, sketch_dirs, photo_dirs, sources, per_side=12):
    """Stop when --sketch_dir and --photo_dir look swapped: by their names, or by their images (the first
    image of up to `per_side` classes of each side: sketches are grey strokes on white, photos are not)."""
    names_swapped = (all(_named_like(d, 'photo') for d in sketch_dirs) and
                     all(_named_like(d, 'sketch') for d in photo_dirs))
    shares = {}
    for side, maps in sources.items():
        folders = [folder for mapping in maps[:1] for _, folder in sorted(mapping.items())[:per_side]]
        firsts = [images[0] for images in map(_images, folders) if images]
        looks = [look for look in map(_sketch_like, firsts) if look is not None]
        shares[side] = np.mean(looks) if looks else None
    images_swapped = None not in shares.values() and shares['sketch'] < 0.5 < shares['photo']
    if names_swapped or images_swapped:
        why = ('by their names' if names_swapped else
               f"{shares['photo']:.0%} of the --photo_dir images look like sketches and "
               f"{shares['sketch']:.0%} of the --sketch_dir images do")
        raise DataError(f"--sketch_dir {' '.join(map(str, sketch_dirs))} and --photo_dir "
                        f"{' '.join(map(str, photo_dirs))} look swapped ({why}): pass the sketches as --sketch_dir "
                        f"and the photos as --photo_dir (nothing was written)")


def print_split_summary(summary):
    print(f"wrote {summary['out']} ({summary['split']})")
    for name in ('train', 'val'):
        s = summary[name]
        print(f"  {name:<5} {s['classes']:>4} classes {s['sketch']:>7} sketches {s['photo']:>7} photos "
              f"({s['duplicates']} duplicate photos left out)")
    left_out = summary.get('left_out', [])
    if left_out:
        print(f"  left out {len(left_out)} entries of class folders that are not .jpg/.jpeg/.png files (other "
              f"formats, subfolders), e.g. '{left_out[0]}'")
    sketches, photos = KNOWN_TEST_SIZES[summary['split']]
    found = (summary['val']['sketch'], summary['val']['photo'])
    verdict = 'matches' if found == (sketches, photos) else f'differs: found {found[0]} and {found[1]}'
    print(f'  published test set of this split: {sketches} sketches, {photos} photos ({verdict})')


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    syn = commands.add_parser('synthetic', help='write the generated zero-shot dataset', renamed={'--seed': '--data_seed'})
    syn.add_argument('--data_root', default='data', help='datasets root; writes <data_root>/synthetic')
    syn.add_argument('--num_classes', type=int, default=20, help=f'classes in all (at most {len(FAMILIES)})')
    syn.add_argument('--num_val_classes', type=int, default=5, help='unseen (val) classes among them')
    syn.add_argument('--num_sketches', type=int, default=40, help='sketches per class')
    syn.add_argument('--num_photos', type=int, default=40, help='photos per train class')
    syn.add_argument('--num_val_photos', type=int, default=200, help='photos per val class (the gallery)')
    syn.add_argument('--img_size', type=int, default=64, help='image side in pixels')
    syn.add_argument("--data_seed", type=int, default=0,
                     help="which families go to val, and every image (not train.py's seed)")
    syn.add_argument('--pairs', action='store_true',
                     help="sketches in instance pairs for fine-grained ZS-SBIR: each drawn from one photo's shape and "
                          'pose, named <photo stem>-<n>.png as in Sketchy (other images than without it)')
    syn.add_argument('--preview', default=None, help='also save a PNG of one sketch and photo per class')
    syn.add_argument('--overwrite', action='store_true', help='replace an existing <data_root>/synthetic')
    syn.add_argument('--workers', type=int, default=DEFAULT_WORKERS, help='drawing processes (same files for any number)')
    for dataset, splits in SPLITS.items():
        real = commands.add_parser(dataset, help=f'build data_root/{dataset} from the raw {dataset} download')
        real.add_argument('--sketch_dir', nargs='+', required=True, help='folders of class folders of sketches')
        real.add_argument('--photo_dir', nargs='+', required=True,
                          help='folders of class folders of photos (several are merged, duplicates dropped)')
        if len(splits) > 1:
            real.add_argument('--split', required=True, choices=list(splits),
                              help='21: Yelamarthi et al. (ECCV 2018); 25: SAKE (ICCV 2019)')
        else:
            real.add_argument('--split', default=next(iter(splits)), choices=list(splits))
        real.add_argument('--data_root', default='data')
        real.add_argument('--data_name', default=None, help=f'folder name under data_root (default {dataset})')
        real.add_argument('--copy', action='store_true', help='copy images instead of linking them')
        real.add_argument('--overwrite', action='store_true', help='replace an existing data_root/data_name')
    cache = commands.add_parser('cache', help='pre-resize a dataset into uint8 arrays for train.py --cache')
    cache.add_argument('--data_root', default='data')
    cache.add_argument('--data_name', default='sketchy')
    cache.add_argument('--img_size', type=int, default=224)
    cache.add_argument('--method', default='acnet', choices=method_names(),
                       help='whose resize filter to use (' + ', '.join(f'{name}: {get_method(name).interpolation}'
                                                                       for name in method_names()) + ')')
    cache.add_argument('--workers', type=int, default=DEFAULT_WORKERS, help='decoding processes')
    return parser.parse_args(argv)


def run(args):
    empty = [f'--{name}' for name, value in vars(args).items() if value == '' or (isinstance(value, list) and '' in value)]
    if empty:
        raise UserError(f'{", ".join(empty)} must not be empty')
    # the generator draws images of any size from 8 px, with one process or more
    images = Limit(1, 100_000)  # per class: more would fill a disk, not test anything
    check_numbers(args, **({'img_size': Limit(8, 2048), 'workers': Limit(1, MAX_WORKERS), 'num_sketches': images,
                            'num_photos': images, 'num_val_photos': images}
                           if args.command == 'synthetic' else {'workers': Limit(1, MAX_WORKERS)}))
    if args.command == 'synthetic' and args.preview:  # before minutes of work, not after
        check_writable_dir(Path(args.preview).parent, '--preview folder')
        if Path(args.preview).suffix.lower() != '.png' or Path(args.preview).is_dir():
            raise UserError(f"--preview '{args.preview}' must name a .png file")
        check_replaceable(args.preview, 'choose another --preview')
    if args.command == 'synthetic':
        out = make_synthetic(args.data_root, args.num_classes, args.num_val_classes, args.num_sketches,
                             args.num_photos, args.num_val_photos, args.img_size, args.data_seed, args.overwrite,
                             args.workers, pairs=args.pairs)
        print(f'wrote {out}')
        if args.preview:
            preview(out, args.preview, size=args.img_size)
            print(f'wrote {args.preview}')
    elif args.command in SPLITS:
        print_split_summary(build_real_split(args.command, args.split, args.sketch_dir, args.photo_dir,
                                             args.data_root, args.data_name, args.copy, args.overwrite))
    elif args.command == 'cache':
        build_cache(args.data_root, args.data_name, args.img_size, get_method(args.method).interpolation, args.workers)


def main(argv=None):
    run_cli(run, parse_args(argv))


if __name__ == '__main__':
    main()
