"""The generated zero-shot dataset: 34 procedural shape families drawn as photos and as sketches, written in the
layout of Sketchy and TU-Berlin, so that the whole pipeline runs offline on a CPU in minutes.

Every class is a shape family: photos show the shape filled, coloured and textured in a random pose on a
cluttered background; sketches show it as wobbly, broken black strokes on white. Val classes never appear
in train. The same seed writes the same files. `python prepare.py synthetic` is the command.
"""
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from zs_sbir.cli import MAX_WORKERS, DataError, UserError
from zs_sbir.images import load_image
from zs_sbir.pictures import save_png
from zs_sbir.processes import map_in_processes
from zs_sbir.safe_files import (acquire_lock, check_folder_replaceable, check_writable_dir, remove_stale_staging,
                        staging_folder, swap_in)
from utils import PHOTO, SKETCH, scan_split

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


def random_pose(rng):
    """A pose to share between a photo and its sketches: (angle in degrees, size within the domain's range from
    0 to 1, centre offset as a fraction of the canvas)."""
    return rng.uniform(-25, 25), rng.uniform(0, 1), rng.uniform(-0.12, 0.12, size=2)


def _pose(parts, rng, scale, canvas, pose=None):
    """Rotate, scale and move a shape into pixel coordinates of a square canvas; in a random pose, or in `pose`
    (random_pose's)."""
    if pose is None:
        angle = np.deg2rad(rng.uniform(-25, 25))
        size = canvas / 2 * rng.uniform(*scale)
        centre = canvas / 2 + rng.uniform(-0.12, 0.12, size=2) * canvas
    else:
        angle = np.deg2rad(pose[0])
        size = canvas / 2 * (scale[0] + pose[1] * (scale[1] - scale[0]))
        centre = canvas / 2 + pose[2] * canvas
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


def render_photo(parts, rng, size, pose=None):
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
    for points, hole in _pose(parts, rng, (0.55, 0.8), canvas, pose):
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


def render_sketch(parts, rng, size, pose=None):
    canvas = size * SUPERSAMPLE
    image = Image.new('L', (canvas, canvas), 255)
    draw = ImageDraw.Draw(image)
    for points, _ in _pose(parts, rng, (0.6, 0.85), canvas, pose):
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
                   num_val_photos=200, img_size=64, seed=0, overwrite=False, workers=1, wait=0, pairs=False):
    """Write <data_root>/synthetic/{train,val}/{sketch,photo}/<class>/ and return its path.

    Every image has its own random stream derived from (seed, family, domain, index), so the files
    do not depend on the order in which they are drawn. An existing dataset is replaced only with
    `overwrite`, only if this repo made it, and only once the new one is complete. One process writes
    it at a time: another is refused, or with `wait` (seconds) waits for it and then, unless
    `overwrite`, uses what it wrote. `workers` processes draw class folders in parallel; the files
    are the same for any number. With `pairs`, sketches come in instance pairs for fine-grained ZS-SBIR: sketch j
    of a class is drawn from the shape and pose of its photo p = j mod (photos of the class) and named
    `<class>_<p>-<j // photos + 1>.png`, Sketchy's file-name rule (utils.instance_pairs).
    """
    counts = dict(num_sketches=num_sketches, num_photos=num_photos, num_val_photos=num_val_photos)
    problems = [f'--{name} must be at least 1, got {value}' for name, value in counts.items() if value < 1]
    if img_size < 8:
        problems.append(f'--img_size must be at least 8, got {img_size}')
    if seed < 0:
        problems.append(f'--data_seed must be at least 0, got {seed}')
    if not 1 <= workers <= MAX_WORKERS:
        problems.append(f'--workers must be from 1 to {MAX_WORKERS}, got {workers}')
    if problems:
        raise UserError('; '.join(problems))
    train, val = synthetic_classes(num_classes, num_val_classes, seed)
    out = Path(data_root) / 'synthetic'
    check_writable_dir(data_root, '--data_root')
    if not wait:
        check_folder_replaceable(out, overwrite)
    Path(data_root).mkdir(parents=True, exist_ok=True)
    release = acquire_lock(Path(data_root) / '.synthetic.lock', f"dataset '{out}'", wait,
                           hint='wait for it, or choose another --data_root')
    try:
        if wait and out.exists() and not overwrite:
            return out  # written by the process this one waited for
        check_folder_replaceable(out, overwrite)
        remove_stale_staging(out)
        tmp = staging_folder(out)
        folders = [(tmp / split / domain / name, name, domain, count, img_size, seed, photos if pairs else 0)
                   for split, classes, photos in (('train', train, num_photos), ('val', val, num_val_photos))
                   for name in classes for domain, count in (('sketch', num_sketches), ('photo', photos))]
        drawn = (map_in_processes(_draw_folder_job, folders, min(workers, len(folders)),
                                  f"drawing the generated dataset '{out}'") if workers > 1 else
                 map(_draw_folder_job, folders))
        try:
            for _ in drawn:
                pass
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        swap_in(tmp, out)  # only a complete dataset ever appears under its real name
    finally:
        release()
    return out


def _draw_folder_job(job):
    return _draw_folder(*job)


def _draw_folder(folder, name, domain, count, img_size, seed, paired_photos=0):
    """One class folder; with `paired_photos` (the class's photo count) in instance pairs (make_synthetic)."""
    folder.mkdir(parents=True)
    family = list(FAMILIES).index(name)
    for i in range(count):
        rng = np.random.default_rng([seed, family, domain == 'sketch', i])
        if paired_photos:
            photo = i % paired_photos if domain == 'sketch' else i
            instance = np.random.default_rng([seed, family, 2, photo])  # the shape and pose photo and sketches share
            parts, pose = random_shape(name, instance), random_pose(instance)
            if domain == 'sketch':  # drawn by hand from the photo: a little turned, scaled and shifted
                pose = (pose[0] + rng.normal(0, 3), np.clip(pose[1] + rng.normal(0, 0.1), 0, 1),
                        pose[2] + rng.normal(0, 0.015, size=2))
                render_sketch(parts, rng, img_size, pose).save(folder / f'{name}_{photo:04d}-{i // paired_photos + 1}.png')
            else:
                render_photo(parts, rng, img_size, pose).save(folder / f'{name}_{i:04d}.jpg', quality=92)
        elif domain == 'sketch':
            render_sketch(random_shape(name, rng), rng, img_size).save(folder / f'{name}_{i:04d}.png')
        else:
            render_photo(random_shape(name, rng), rng, img_size).save(folder / f'{name}_{i:04d}.jpg', quality=92)


def preview(data_dir, out_path, per_class=1, size=64):
    """A picture of one sketch (top row) and one photo (bottom row) of every class."""
    rows = {SKETCH: [], PHOTO: []}
    for split_name in ('train', 'val'):
        split = scan_split(Path(data_dir).parent, Path(data_dir).name, split_name)
        for label in range(len(split.classes)):
            for domain in rows:
                items = [i for i in range(len(split)) if split.labels[i] == label and split.domains[i] == domain]
                rows[domain] += [load_image(split.root / split.paths[i], size) for i in items[:per_class]]
    grid = np.concatenate([np.concatenate([im.permute(1, 2, 0).numpy() for im in rows[d]], 1)
                           for d in (SKETCH, PHOTO)], 0)
    save_png(Image.fromarray(grid), out_path)  # marked: a later --preview replaces it, nothing else


