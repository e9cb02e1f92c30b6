"""Dataset preparation commands.

    python prepare.py synthetic --data_root data        # generated zero-shot dataset, offline, seconds
    python prepare.py sketchy --split 25 --sketch_dir RAW/sketch/tx_000000000000 \
                              --photo_dir RAW/photo/tx_000000000000 RAW/EXTEND_image_sketchy
    python prepare.py tuberlin --sketch_dir RAW/png --photo_dir RAW/ImageResized
    python prepare.py quickdraw --sketch_dir RAW/QuickDraw_sketches_final --photo_dir RAW/QuickDraw_images_final
    python prepare.py cache --data_name sketchy         # decode + resize every image once, for --cache

writes <data_root>/synthetic/{train,val}/{sketch,photo}/<class>/ with the same layout as Sketchy
and TU-Berlin. Every class is a procedural shape family: photos show the shape filled, coloured
and textured in a random pose on a cluttered background; sketches show it as wobbly, broken black
strokes on white. Val classes never appear in train. The same seed writes the same files.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from utils import (CACHE_FORMAT, RESIZE, ArgumentParser, DataError, UserError, atomic_write, cache_path,
                   check_writable_dir, describe_split, file_stats, is_image_file, load_image, run_cli, scan_split)

# ----------------------------------------------------------------------------------------------
# Shape families. Each returns a list of parts (points (M, 2) in about [-1, 1], is_hole).

TAU = 2 * np.pi


def _polar(radius, n=180):
    t = np.linspace(0, TAU, n, endpoint=False)
    r = radius(t)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _regular(k, phase=np.pi / 2):
    t = phase + TAU * np.arange(k) / k
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(k, inner, phase=np.pi / 2):
    t = phase + np.pi * np.arange(2 * k) / k
    r = np.where(np.arange(2 * k) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _poly(*xy):
    return np.array(xy, dtype=float).reshape(-1, 2)


def _solid(points):
    return [(points, False)]


def _heart(t):
    return np.stack([16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)], 1) / 16


def _teardrop(t):
    return np.stack([np.sin(t) * np.sin(t / 2) ** 1.5, np.cos(t)], 1)


FAMILIES = {
    'circle': lambda rng: _solid(_polar(lambda t: np.ones_like(t))),
    'ellipse': lambda rng: _solid(_polar(lambda t: np.ones_like(t)) * [1, rng.uniform(0.45, 0.6)]),
    'triangle': lambda rng: _solid(_regular(3)),
    'square': lambda rng: _solid(_regular(4, np.pi / 4)),
    'diamond': lambda rng: _solid(_regular(4) * [rng.uniform(0.55, 0.7), 1]),
    'pentagon': lambda rng: _solid(_regular(5)),
    'hexagon': lambda rng: _solid(_regular(6, 0)),
    'octagon': lambda rng: _solid(_regular(8, np.pi / 8)),
    'star4': lambda rng: _solid(_star(4, rng.uniform(0.3, 0.4))),
    'star5': lambda rng: _solid(_star(5, rng.uniform(0.38, 0.48))),
    'sun': lambda rng: _solid(_star(12, rng.uniform(0.65, 0.75))),
    'gear': lambda rng: _solid(_polar(lambda t: 0.78 + 0.22 * (np.cos(8 * t) > 0), 400)),
    'flower': lambda rng: _solid(_polar(lambda t: 0.45 + 0.55 * np.abs(np.cos(2.5 * t)))),
    'cloud': lambda rng: _solid(_polar(lambda t: 0.78 + 0.22 * np.abs(np.sin(3 * t)))),
    'heart': lambda rng: _solid(_heart(np.linspace(0, TAU, 180, endpoint=False))),
    'crescent': lambda rng: _solid(np.concatenate([
        _polar(lambda t: np.ones_like(t))[20:161],
        (_polar(lambda t: np.ones_like(t)) * 0.8 + [0.35, 0])[150:29:-1]])),
    'ring': lambda rng: [(_polar(lambda t: np.ones_like(t)), False),
                         (_polar(lambda t: np.full_like(t, rng.uniform(0.5, 0.6))), True)],
    'frame': lambda rng: [(_regular(4, np.pi / 4), False), (_regular(4, np.pi / 4) * 0.55, True)],
    'cross': lambda rng: _solid(_poly(-.3, 1, .3, 1, .3, .3, 1, .3, 1, -.3, .3, -.3, .3, -1, -.3, -1,
                                      -.3, -.3, -1, -.3, -1, .3, -.3, .3)),
    'xcross': lambda rng: _solid(_poly(-.3, 1, .3, 1, .3, .3, 1, .3, 1, -.3, .3, -.3, .3, -1, -.3, -1,
                                       -.3, -.3, -1, -.3, -1, .3, -.3, .3) @ _rotation(np.pi / 4)),
    'arrow': lambda rng: _solid(_poly(-1, -.25, .2, -.25, .2, -.65, 1, 0, .2, .65, .2, .25, -1, .25)),
    'chevron': lambda rng: _solid(_poly(-1, .8, 0, -.2, 1, .8, 1, .2, 0, -.8, -1, .2)),
    'lshape': lambda rng: _solid(_poly(-.7, 1, -.2, 1, -.2, -.5, .8, -.5, .8, -1, -.7, -1)),
    'tshape': lambda rng: _solid(_poly(-1, 1, 1, 1, 1, .5, .25, .5, .25, -1, -.25, -1, -.25, .5, -1, .5)),
    'ushape': lambda rng: _solid(_poly(-1, 1, -.5, 1, -.5, -.4, .5, -.4, .5, 1, 1, 1, 1, -1, -1, -1)),
    'house': lambda rng: _solid(_poly(-.75, -1, .75, -1, .75, .2, 0, 1, -.75, .2)),
    'trapezoid': lambda rng: _solid(_poly(-1, -.6, 1, -.6, .45, .6, -.45, .6)),
    'parallelogram': lambda rng: _solid(_poly(-1, -.5, .4, -.5, 1, .5, -.4, .5)),
    'semicircle': lambda rng: _solid(_polar(lambda t: np.ones_like(t), 181)[:91] - [0, .4]),
    'teardrop': lambda rng: _solid(_teardrop(np.linspace(0, TAU, 180, endpoint=False))),
    'lightning': lambda rng: _solid(_poly(.1, 1, -.6, -.1, -.05, -.1, -.3, -1, .6, .2, .05, .2, .45, 1)),
    'hourglass': lambda rng: _solid(_poly(-.8, -1, .8, -1, .12, 0, .8, 1, -.8, 1, -.12, 0)),
    'shield': lambda rng: _solid(_poly(-.8, 1, .8, 1, .8, 0, .55, -.5, 0, -1, -.55, -.5, -.8, 0)),
    'kite': lambda rng: _solid(_poly(0, 1, .6, .3, 0, -1, -.6, .3)),
}


def _rotation(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def random_shape(family, rng):
    """One instance of a family: the family's outline, slightly stretched and with jittered points."""
    parts = FAMILIES[family](rng)
    stretch = rng.uniform(0.85, 1.15, size=2)
    out = []
    for points, hole in parts:
        points = points * stretch
        points = points + rng.normal(0, 0.015, size=points.shape)
        out.append((points, hole))
    return out


def _pose(parts, rng, scale, canvas):
    """Rotate, scale and move a shape into pixel coordinates of a square canvas."""
    angle = np.deg2rad(rng.uniform(-25, 25))
    size = canvas / 2 * rng.uniform(*scale)
    centre = canvas / 2 + rng.uniform(-0.12, 0.12, size=2) * canvas
    flip = np.array([1, -1])  # y points up in the family definitions
    return [((p @ _rotation(angle).T) * flip * size + centre, hole) for p, hole in parts]


# ----------------------------------------------------------------------------------------------
# Rendering. Everything is drawn at 4x and downsampled, for smooth edges at any size.

SUPERSAMPLE = 4


def _random_colour(rng, low=0, high=256):
    return tuple(int(c) for c in rng.integers(low, high, size=3))


def _clutter(draw, rng, canvas):
    """Random translucent ellipses, boxes and thick lines: the background of a photo."""
    for _ in range(rng.integers(8, 15)):
        colour = _random_colour(rng) + (int(rng.integers(90, 220)),)
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * canvas
        w, h = rng.uniform(0.08, 0.45, size=2) * canvas
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.line([x0, y0, x0 + w, y0 + h], fill=colour, width=int(rng.integers(2, 8) * SUPERSAMPLE))


def _texture(rng, canvas):
    """A coloured, striped or spotted, shaded fill for the object."""
    base, second = np.array(_random_colour(rng, 30, 230)), np.array(_random_colour(rng, 30, 230))
    y, x = np.mgrid[0:canvas, 0:canvas] / canvas
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.05, 0.2)
    if rng.random() < 0.5:
        pattern = (np.sin((x * np.cos(angle) + y * np.sin(angle)) * TAU / period) > 0.3)
    else:
        cx, cy = rng.uniform(0, 1, size=2)
        pattern = np.sin((x - cx) * TAU / period) * np.sin((y - cy) * TAU / period) > 0.5
    mix = np.where(pattern[..., None], second, base).astype(float)
    shade = 0.75 + 0.5 * (x * np.cos(angle) + y * np.sin(angle)) / 2
    return Image.fromarray(np.clip(mix * shade[..., None], 0, 255).astype(np.uint8))


def render_photo(parts, rng, size):
    canvas = size * SUPERSAMPLE
    top, bottom = np.array(_random_colour(rng)), np.array(_random_colour(rng))
    ramp = np.linspace(0, 1, canvas)[:, None, None]
    background = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (canvas, canvas, 3))
    image = Image.fromarray(background.astype(np.uint8)).convert('RGBA')
    layer = Image.new('RGBA', image.size, (0, 0, 0, 0))
    _clutter(ImageDraw.Draw(layer), rng, canvas)
    image = Image.alpha_composite(image, layer).convert('RGB')
    mask = Image.new('L', image.size, 0)
    draw = ImageDraw.Draw(mask)
    for points, hole in _pose(parts, rng, (0.55, 0.8), canvas):
        draw.polygon([tuple(p) for p in points], fill=0 if hole else 255)
    image.paste(_texture(rng, canvas), mask=mask)
    image = image.resize((size, size), Image.LANCZOS)
    noise = rng.normal(0, 4, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def _resample(points, closed, spacing):
    """Evenly spaced points along a polyline (closed: back to the start)."""
    if closed:
        points = np.concatenate([points, points[:1]])
    steps = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0], np.cumsum(steps)])
    n = max(int(arc[-1] / spacing), 8)
    s = np.linspace(0, arc[-1], n)
    return np.stack([np.interp(s, arc, points[:, 0]), np.interp(s, arc, points[:, 1])], 1)


def _wobble(points, rng, canvas):
    """Hand-drawn look: a slow sideways drift plus a little tremor."""
    n = len(points)
    s = np.linspace(0, 1, n)[:, None]
    drift = sum(rng.normal(0, 0.012 * canvas) * np.sin(TAU * (f * s + rng.random(2)))
                for f in (1, 2, 3))
    return points + drift + rng.normal(0, 0.002 * canvas, size=points.shape)


def render_sketch(parts, rng, size):
    canvas = size * SUPERSAMPLE
    image = Image.new('L', (canvas, canvas), 255)
    draw = ImageDraw.Draw(image)
    for points, _ in _pose(parts, rng, (0.6, 0.85), canvas):
        line = _wobble(_resample(points, True, canvas / 150), rng, canvas)
        cuts = np.sort(rng.choice(np.arange(1, len(line) - 1), size=rng.integers(2, 6), replace=False))
        strokes = np.split(line, cuts)
        missing = rng.integers(len(strokes)) if rng.random() < 0.4 else -1  # at most one gap
        for k, stroke in enumerate(strokes):
            if len(stroke) < 2 or k == missing:
                continue
            width = round(SUPERSAMPLE * max(1.0, rng.uniform(0.8, 2.2) * size / 64))  # >= 1 output pixel
            draw.line([tuple(p) for p in stroke], fill=int(rng.integers(0, 70)), width=width, joint='curve')
    return image.resize((size, size), Image.LANCZOS)


# ----------------------------------------------------------------------------------------------
# The dataset

def synthetic_classes(num_classes, num_val_classes, seed):
    """Which families become train and val classes (disjoint, chosen by the seed)."""
    if not 1 <= num_val_classes < num_classes <= len(FAMILIES):
        raise DataError(f'--num_classes must be at most {len(FAMILIES)} and larger than '
                        f'--num_val_classes (at least 1); got {num_classes} and {num_val_classes}')
    names = list(FAMILIES)
    chosen = [names[i] for i in np.random.default_rng(seed).permutation(len(names))[:num_classes]]
    return sorted(chosen[num_val_classes:]), sorted(chosen[:num_val_classes])


def make_synthetic(data_root, num_classes=20, num_val_classes=5, num_sketches=40, num_photos=40,
                   num_val_photos=200, img_size=64, seed=0, overwrite=False, workers=1):
    """Write <data_root>/synthetic/{train,val}/{sketch,photo}/<class>/ and return its path.

    Every image has its own random stream derived from (seed, family, domain, index), so the files
    do not depend on the order in which they are drawn. An existing dataset is replaced only with
    `overwrite`, and only once the new one is complete. `workers` processes draw class folders in
    parallel; the files are the same for any number.
    """
    counts = dict(num_sketches=num_sketches, num_photos=num_photos, num_val_photos=num_val_photos)
    problems = [f'--{name} must be at least 1, got {value}' for name, value in counts.items() if value < 1]
    if img_size < 8:
        problems.append(f'--img_size must be at least 8, got {img_size}')
    if seed < 0:
        problems.append(f'--seed must be at least 0, got {seed}')
    if workers < 1:
        problems.append(f'--workers must be at least 1, got {workers}')
    if problems:
        raise UserError('; '.join(problems))
    train, val = synthetic_classes(num_classes, num_val_classes, seed)
    out = Path(data_root) / 'synthetic'
    check_writable_dir(data_root, '--data_root')
    if out.exists() and not overwrite:
        raise DataError(f"'{out}' already exists: pass --overwrite to replace it, or choose another --data_root")
    tmp = out.with_name('.synthetic.partial')
    shutil.rmtree(tmp, ignore_errors=True)
    folders = [(tmp / split / domain / name, name, domain, count, img_size, seed)
               for split, classes, photos in (('train', train, num_photos), ('val', val, num_val_photos))
               for name in classes for domain, count in (('sketch', num_sketches), ('photo', photos))]
    if workers > 1:
        with Pool(min(workers, len(folders))) as pool:
            pool.starmap(_draw_folder, folders)
    else:
        for job in folders:
            _draw_folder(*job)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # only a complete dataset ever appears under its real name
    return out


def _draw_folder(folder, name, domain, count, img_size, seed):
    folder.mkdir(parents=True)
    for i in range(count):
        rng = np.random.default_rng([seed, list(FAMILIES).index(name), domain == 'sketch', i])
        parts = random_shape(name, rng)
        if domain == 'sketch':
            render_sketch(parts, rng, img_size).save(folder / f'{name}_{i:04d}.png')
        else:
            render_photo(parts, rng, img_size).save(folder / f'{name}_{i:04d}.jpg', quality=92)


def preview(data_dir, out_path, per_class=1, size=64):
    """A picture of one sketch (top row) and one photo (bottom row) of every class."""
    from utils import SKETCH, PHOTO
    rows = {SKETCH: [], PHOTO: []}
    for split_name in ('train', 'val'):
        split = scan_split(Path(data_dir).parent, Path(data_dir).name, split_name)
        for label in range(len(split.classes)):
            for domain in rows:
                items = [i for i in range(len(split)) if split.labels[i] == label and split.domains[i] == domain]
                rows[domain] += [load_image(split.root / split.paths[i], size) for i in items[:per_class]]
    grid = np.concatenate([np.concatenate([im.permute(1, 2, 0).numpy() for im in rows[d]], 1)
                           for d in (SKETCH, PHOTO)], 0)
    atomic_write(out_path, lambda tmp: Image.fromarray(grid).save(tmp, format='PNG', optimize=True))


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
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))


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
    out = Path(data_root) / (data_name or dataset)
    if out.exists() and not overwrite:
        raise DataError(f"'{out}' already exists: remove it, pass --overwrite, or choose --data_name")
    partial = out.with_name(f'.{out.name}.partial')
    shutil.rmtree(partial, ignore_errors=True)
    summary = {s: {'classes': 0, 'sketch': 0, 'photo': 0, 'duplicates': 0} for s in ('train', 'val')}
    for name in all_classes:
        target_split = 'train' if name in train_classes else 'val'
        summary[target_split]['classes'] += 1
        for side, maps in sources.items():
            target = partial / target_split / side / name
            target.mkdir(parents=True)
            seen = set()
            for index, mapping in enumerate(maps):
                for path in _images(mapping[name]) if name in mapping else []:
                    if side == 'photo':
                        digest = hashlib.sha1(path.read_bytes()).hexdigest()
                        if digest in seen:
                            summary[target_split]['duplicates'] += 1
                            continue
                        seen.add(digest)
                    link = target / path.name
                    if link.exists():  # same name, different bytes, from another photo folder
                        link = target / f'{path.stem}__{index}{path.suffix}'
                    if copy:
                        shutil.copy2(path, link)
                    else:
                        link.symlink_to(path.resolve())
                    summary[target_split][side] += 1
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return {'out': out, 'split': split_name, **summary}


def print_split_summary(summary):
    print(f"wrote {summary['out']} ({summary['split']})")
    for name in ('train', 'val'):
        s = summary[name]
        print(f"  {name:<5} {s['classes']:>4} classes {s['sketch']:>7} sketches {s['photo']:>7} photos "
              f"({s['duplicates']} duplicate photos left out)")
    sketches, photos = KNOWN_TEST_SIZES[summary['split']]
    found = (summary['val']['sketch'], summary['val']['photo'])
    verdict = 'matches' if found == (sketches, photos) else f'differs: found {found[0]} and {found[1]}'
    print(f'  published test set of this split: {sketches} sketches, {photos} photos ({verdict})')


# ----------------------------------------------------------------------------------------------
# Image cache: every image of a split decoded and resized once, into one uint8 (N, 3, S, S) .npy

def _fill(task):
    array_path, root, paths, start, size, interpolation = task
    array = np.load(array_path, mmap_mode='r+')
    for offset, path in enumerate(paths):
        array[start + offset] = load_image(Path(root) / path, size, interpolation).numpy()
    array.flush()
    return len(paths)


def build_cache(data_root, data_name, size, method, workers=os.cpu_count()):
    """Write cache/<split>_<size>_<interpolation>.npy and .json for train and val; returns their paths.

    The index records every image's path, size and modification time, so a changed image is noticed.
    """
    from tqdm import tqdm
    if size < 32 or size % 4:
        raise UserError(f'--img_size must be a multiple of 4 and at least 32 (as train.py needs), got {size}')
    if workers < 1:
        raise UserError(f'--workers must be at least 1, got {workers}')
    interpolation, written = RESIZE[method], []
    for split_name in ('train', 'val'):
        split = scan_split(data_root, data_name, split_name)
        stats = file_stats(split.root, split.paths)  # before decoding: a change during the build is noticed too
        print(describe_split(split, split_name))
        path = cache_path(data_root, data_name, split_name, size, interpolation)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix('.json').unlink(missing_ok=True)  # no index: an old cache is never half-valid
        partial = path.with_name(f'.{path.name}.partial')
        np.lib.format.open_memmap(partial, mode='w+', dtype=np.uint8, shape=(len(split), 3, size, size)).flush()
        chunk = 256
        tasks = [(partial, split.root, split.paths[i:i + chunk], i, size, interpolation)
                 for i in range(0, len(split), chunk)]
        with Pool(max(1, workers)) as pool, tqdm(total=len(split), desc=f'cache {split_name}', disable=None) as bar:
            for done in pool.imap_unordered(_fill, tasks):
                bar.update(done)
        os.replace(partial, path)
        index = {'format': CACHE_FORMAT, 'size': size, 'interpolation': interpolation, 'paths': list(split.paths),
                 'stats': stats}
        atomic_write(path.with_suffix('.json'), lambda tmp: Path(tmp).write_text(json.dumps(index)))
        written.append(path)
        print(f'wrote {path} ({path.stat().st_size / 2 ** 30:.2f} GiB)')
    return written


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    syn = commands.add_parser('synthetic', help='write the generated zero-shot dataset')
    syn.add_argument('--data_root', default='data', help='datasets root; writes <data_root>/synthetic')
    syn.add_argument('--num_classes', type=int, default=20, help=f'classes in all (at most {len(FAMILIES)})')
    syn.add_argument('--num_val_classes', type=int, default=5, help='unseen (val) classes among them')
    syn.add_argument('--num_sketches', type=int, default=40, help='sketches per class')
    syn.add_argument('--num_photos', type=int, default=40, help='photos per train class')
    syn.add_argument('--num_val_photos', type=int, default=200, help='photos per val class (the gallery)')
    syn.add_argument('--img_size', type=int, default=64, help='image side in pixels')
    syn.add_argument('--seed', type=int, default=0)
    syn.add_argument('--preview', default=None, help='also save a PNG of one sketch and photo per class')
    syn.add_argument('--overwrite', action='store_true', help='replace an existing <data_root>/synthetic')
    syn.add_argument('--workers', type=int, default=1, help='drawing processes (same files for any number)')
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
    cache.add_argument('--method', default='acnet', choices=list(RESIZE),
                       help='whose resize filter to use (acnet: bilinear, msedge: bicubic)')
    cache.add_argument('--workers', type=int, default=os.cpu_count(), help='decoding processes')
    return parser.parse_args(argv)


def run(args):
    empty = [f'--{name}' for name, value in vars(args).items() if value == '' or (isinstance(value, list) and '' in value)]
    if empty:
        raise UserError(f'{", ".join(empty)} must not be empty')
    if args.command == 'synthetic' and args.preview:  # before minutes of work, not after
        check_writable_dir(Path(args.preview).parent, '--preview folder')
        if Path(args.preview).suffix.lower() != '.png' or Path(args.preview).is_dir():
            raise UserError(f"--preview '{args.preview}' must name a .png file")
    if args.command == 'synthetic':
        out = make_synthetic(args.data_root, args.num_classes, args.num_val_classes, args.num_sketches,
                             args.num_photos, args.num_val_photos, args.img_size, args.seed, args.overwrite,
                             args.workers)
        print(f'wrote {out}')
        if args.preview:
            preview(out, args.preview, size=args.img_size)
            print(f'wrote {args.preview}')
    elif args.command in SPLITS:
        print_split_summary(build_real_split(args.command, args.split, args.sketch_dir, args.photo_dir,
                                             args.data_root, args.data_name, args.copy, args.overwrite))
    elif args.command == 'cache':
        build_cache(args.data_root, args.data_name, args.img_size, args.method, args.workers)


def main(argv=None):
    run_cli(run, parse_args(argv))


if __name__ == '__main__':
    main()
