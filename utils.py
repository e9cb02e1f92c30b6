"""Data folders, image loading, retrieval metrics and safe file I/O shared by every script.

Dataset layout (see README):  <data_root>/<data_name>/{train,val}/{sketch,photo}/<class>/<images>
Domain codes: photo = 0, sketch = 1. Labels: class index in sorted class-name order.
"""
import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

PHOTO, SKETCH = 0, 1
DOMAINS = {'photo': PHOTO, 'sketch': SKETCH}
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
# Both seeds drop the TU-Berlin test classes that have fewer photos than this.
TUBERLIN_MIN_VAL_PHOTOS = 400

LAYOUT_HELP = ('expected <data_root>/<data_name>/{train,val}/{sketch,photo}/<class>/<images>; '
               '`python prepare.py synthetic --data_root DIR` writes a small dataset of this shape')


class UserError(Exception):
    """A problem a user can fix (data, options, files): scripts print it as one line and exit 2."""


class DataError(UserError):
    """A problem with the dataset folders or an image file."""


# ----------------------------------------------------------------------------------------------
# Scanning the dataset folders

@dataclass
class Split:
    """One split (train or val) of a dataset: every image with its label and domain.

    `paths` are relative to `root`, so a split can be saved and reloaded under another data_root.
    """
    root: Path
    classes: list
    paths: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    domains: list = field(default_factory=list)
    dropped_classes: list = field(default_factory=list)
    ignored_files: list = field(default_factory=list)

    def __len__(self):
        return len(self.paths)

    def indices(self, domain):
        return [i for i, d in enumerate(self.domains) if d == domain]

    def count(self, domain):
        return sum(1 for d in self.domains if d == domain)

    def subset(self, keep):
        """A split with only the items at positions `keep` (same classes and labels)."""
        return Split(self.root, self.classes, [self.paths[i] for i in keep],
                     [self.labels[i] for i in keep], [self.domains[i] for i in keep])


def is_image_file(path):
    return path.suffix.lower() in IMAGE_SUFFIXES


def _list_class_folders(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith('.'))


def _require_dir(path, what):
    if path.exists() and not path.is_dir():
        raise DataError(f"{what} '{path}' is a file, not a folder ({LAYOUT_HELP})")
    if not path.is_dir():
        raise DataError(f"{what} not found: '{path}' ({LAYOUT_HELP})")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"{what} is not readable: '{path}' (check its permissions)")


def scan_split(data_root, data_name, split, min_photos=None, keep_broken_links=False):
    """Scan `<data_root>/<data_name>/<split>/{sketch,photo}/<class>/` into a Split.

    Classes with fewer than `min_photos` photos are left out on both sides (TU-Berlin val rule);
    by default that rule applies to the val split of datasets named tuberlin*. Raises DataError for a missing folder,
    a class on one side only, an empty class, a split with no images, and links to files that no longer
    exist (prepare.py links by default), unless `keep_broken_links` (they are then listed as images, which
    --skip_bad_images leaves out).
    """
    if min_photos is None:
        min_photos = TUBERLIN_MIN_VAL_PHOTOS if (data_name.startswith('tuberlin') and split == 'val') else 0
    _require_dir(Path(data_root), 'data root')
    root = Path(data_root) / data_name / split
    _require_dir(root, f'{split} folder of dataset {data_name!r}')
    for side in DOMAINS:
        _require_dir(root / side, f"'{side}' folder")
    sketch_classes, photo_classes = _list_class_folders(root / 'sketch'), _list_class_folders(root / 'photo')
    one_sided = sorted(set(sketch_classes) ^ set(photo_classes))
    if one_sided:
        where = ', '.join(f"'{c}' (only in {'sketch' if c in sketch_classes else 'photo'}/)"
                          for c in one_sided[:10])
        more = f' and {len(one_sided) - 10} more' if len(one_sided) > 10 else ''
        raise DataError(f'{root}: every class needs both a sketch/ and a photo/ folder; '
                        f'one side only: {where}{more}')
    if not sketch_classes:
        raise DataError(f'{root}: no class folders under sketch/ and photo/ ({LAYOUT_HELP})')

    files, ignored, broken = {}, [], []
    for name in sketch_classes:
        for side in DOMAINS:
            folder = root / side / name
            visible = [p for p in folder.iterdir() if not p.name.startswith('.')]
            dangling = [p for p in visible if p.is_symlink() and not p.exists()]
            broken += dangling
            entries = sorted(p for p in visible if p.is_file() or (keep_broken_links and p in dangling))
            images = [p for p in entries if is_image_file(p)]
            ignored += [p for p in entries if not is_image_file(p)]
            files[side, name] = images

    if broken and not keep_broken_links:
        raise DataError(f"{len(broken)} files in '{root}' are links to files that no longer exist, e.g. '{broken[0]}' "
                        f"-> '{os.readlink(broken[0])}': rebuild the dataset with prepare.py (moved raw download?), "
                        f"or train with --skip_bad_images to leave them out")
    for (side, name), images in files.items():
        if not images:
            raise DataError(f"class '{name}' has no images in '{root / side / name}' "
                            f"(looked for {', '.join(IMAGE_SUFFIXES)} in any case)")
    classes = [c for c in sketch_classes if len(files['photo', c]) >= min_photos]
    result = Split(root, classes, dropped_classes=[c for c in sketch_classes if c not in classes],
                   ignored_files=ignored)
    if not classes:
        raise DataError(f'{root}: no class has at least {min_photos} photos')
    for side, domain in DOMAINS.items():
        for label, name in enumerate(classes):
            for p in files[side, name]:
                result.paths.append(str(p.relative_to(root)))
                result.labels.append(label)
                result.domains.append(domain)
    return result


def split_fingerprint(split):
    """What identifies a split's data: its classes, counts and a digest of every (path, label, domain)."""
    digest = hashlib.sha256()
    for path, label, domain in zip(split.paths, split.labels, split.domains):
        digest.update(f'{path}\t{label}\t{domain}\n'.encode())
    return {'classes': list(split.classes), 'sketches': split.count(SKETCH), 'photos': split.count(PHOTO),
            'digest': digest.hexdigest()}


def fingerprint_changes(saved, current):
    """What differs between two split fingerprints, in words ([] when they match)."""
    changes = []
    gone = [c for c in saved['classes'] if c not in current['classes']]
    new = [c for c in current['classes'] if c not in saved['classes']]
    if gone or new:
        changes.append(f"classes {len(gone)} gone{f' (e.g. {gone[0]!r})' if gone else ''}, "
                       f"{len(new)} new{f' (e.g. {new[0]!r})' if new else ''}")
    changes += [f'{saved[key]} -> {current[key]} {key}' for key in ('sketches', 'photos') if saved[key] != current[key]]
    if not changes and saved['digest'] != current['digest']:
        changes.append('the same classes and counts, but other files')
    return changes


def hold_out(split, fraction, seed):
    """(train part, held-out part) of a seen-class split: `fraction` of every class's sketches and
    photos (at least one each, chosen by the seed) are held out for model selection."""
    groups = {}
    for i, key in enumerate(zip(split.labels, split.domains)):
        groups.setdefault(key, []).append(i)
    rng, held = np.random.default_rng(seed), []
    for (label, domain), items in sorted(groups.items()):
        if len(items) < 2:
            side = 'sketch' if domain == SKETCH else 'photo'
            raise DataError(f"class '{split.classes[label]}' has {len(items)} {side}: holding out part of every "
                            f"seen class needs at least 2 sketches and 2 photos per class")
        count = min(len(items) - 1, max(1, round(fraction * len(items))))
        held += rng.choice(items, count, replace=False).tolist()
    held_set = set(held)
    return split.subset([i for i in range(len(split)) if i not in held_set]), split.subset(sorted(held))


def _is_readable(path):
    try:
        with Image.open(path) as img:
            img.load()  # a full decode: catches truncated files too
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def drop_unreadable(split, workers=0):
    """(the split without images that fail to decode, their paths). Decodes every image once."""
    paths = [split.root / p for p in split.paths]
    if workers > 0:
        from multiprocessing import Pool
        with Pool(workers) as pool:
            readable = pool.map(_is_readable, paths, chunksize=64)
    else:
        readable = [_is_readable(p) for p in paths]
    kept = split.subset([i for i, ok in enumerate(readable) if ok])
    present = set(zip(kept.labels, kept.domains))
    for label, name in enumerate(split.classes):
        for domain, side in ((SKETCH, 'sketch'), (PHOTO, 'photo')):
            if (label, domain) not in present:
                raise DataError(f"class '{name}' has no readable {side} left in '{split.root}'")
    return kept, [p for p, ok in zip(split.paths, readable) if not ok]


def describe_split(split, name):
    """A one-line summary of a split and the notes a user should see (dropped classes, stray files)."""
    lines = [f'{name}: {len(split.classes)} classes, {split.count(SKETCH)} sketches, '
             f'{split.count(PHOTO)} photos ({split.root})']
    if split.dropped_classes:
        lines.append(f'  left out {len(split.dropped_classes)} classes with fewer than '
                     f'{TUBERLIN_MIN_VAL_PHOTOS} photos: {", ".join(split.dropped_classes)}')
    if split.ignored_files:
        shown = ', '.join(str(p) for p in split.ignored_files[:3])
        lines.append(f'  ignored {len(split.ignored_files)} files that are not .jpg/.jpeg/.png, e.g. {shown}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# Images and datasets

INTERPOLATION = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}


def read_rgb(path):
    """Any .jpg/.jpeg/.png (any mode) as an RGB PIL image; transparent pixels become white, so an RGBA
    sketch stays dark strokes on white. A file that does not decode is a DataError naming it."""
    try:
        with Image.open(path) as img:
            img.load()
            return on_white(img)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image '{path}': {_first_line(error)}") from error


def on_white(img):
    """A PIL image of any mode as RGB, its transparent pixels white."""
    if img.mode in ('RGBA', 'LA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        img = Image.new('RGB', rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel('A'))
    return img.convert('RGB')


def image_tensor(img, size, interpolation='bilinear'):
    """An RGB PIL image resized to a uint8 tensor of shape (3, size, size)."""
    img = img.resize((size, size), INTERPOLATION[interpolation])
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def load_image(path, size, interpolation='bilinear'):
    """Read any .jpg/.jpeg/.png (any mode) as a uint8 RGB tensor of shape (3, size, size)."""
    return image_tensor(read_rgb(path), size, interpolation)


# Resize filter of each method's input transform.
RESIZE = {'acnet': 'bilinear', 'msedge': 'bicubic'}


def train_transform(method, p=None):
    """Per-image training augmentation on uint8 tensors (the resize already happened at load time).

    `p` overrides every probability (p=0: identity), for tests that compare input paths.
    """
    from torchvision.transforms import v2
    if method == 'acnet':
        return v2.RandomHorizontalFlip(0.5 if p is None else p)
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8 if p is None else p),
        v2.RandomHorizontalFlip(0.5 if p is None else p),
        # bilinear: the original's PIL transform interpolates bicubic, which tensors do not offer here
        v2.RandomApply([v2.RandomAffine(degrees=30, translate=(0.1, 0.1), scale=(0.7, 1.3),
                                        interpolation=v2.InterpolationMode.BILINEAR)],
                       p=0.5 if p is None else p)])


class FileImages:
    """Decodes and resizes image files on every access."""

    def __init__(self, root, paths, size, interpolation):
        self.root, self.paths, self.size, self.interpolation = Path(root), paths, size, interpolation

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return load_image(self.root / self.paths[index], self.size, self.interpolation)


CACHE_FORMAT = 'zs-sbir-cache-2'  # -2: the index records each image's size and modification time


def file_stats(root, paths):
    """[size, modification time in ns] of every file (links followed): what tells that an image changed."""
    stats = []
    for path in paths:
        try:
            info = os.stat(Path(root) / path)
            stats.append([info.st_size, info.st_mtime_ns])
        except OSError:
            stats.append(None)
    return stats


def cache_path(data_root, data_name, split, size, interpolation):
    """Where `prepare.py cache` puts a split's pre-resized images (.npy) and their index (.json)."""
    return Path(data_root) / data_name / 'cache' / f'{split}_{size}_{interpolation}.npy'


class CachedImages:
    """Pre-resized uint8 images of a split from one memory-mapped .npy file: no image is decoded.

    Opened lazily, so a DataLoader worker maps the file itself instead of receiving a copy.
    """

    def __init__(self, data_root, data_name, split_name, split, size, method):
        self.path = cache_path(data_root, data_name, split_name, size, RESIZE[method])
        build = (f'python prepare.py cache --data_root {data_root} --data_name {data_name} '
                 f'--img_size {size} --method {method}')
        index_file = self.path.with_suffix('.json')
        if not index_file.is_file() or not self.path.is_file():
            raise DataError(f"no image cache at '{self.path}': build it with `{build}` or leave out --cache")
        try:
            index = json.loads(index_file.read_text())
        except ValueError:
            index = {}
        if index.get('format') != CACHE_FORMAT:
            raise DataError(f"image cache '{self.path}' was built by another version of prepare.py: rebuild it "
                            f"with `{build}`")
        row_of = {path: row for row, path in enumerate(index['paths'])}
        missing = [p for p in split.paths if p not in row_of]
        if missing:
            raise DataError(f"image cache '{self.path}' does not match the {split_name} folder "
                            f"({len(missing)} images are not in it): rebuild it with `{build}`")
        self.rows, self._array = [row_of[p] for p in split.paths], None  # a split may be a subset
        now = file_stats(split.root, split.paths)
        changed = [p for p, row, stat in zip(split.paths, self.rows, now) if index['stats'][row] != stat]
        if changed:
            raise DataError(f"image cache '{self.path}' is stale: {len(changed)} images changed since it was built "
                            f"(size or modification time), e.g. '{changed[0]}': rebuild it with `{build}`")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode='r')
        return torch.from_numpy(np.array(self._array[self.rows[index]]))

    def __getstate__(self):
        return {**self.__dict__, '_array': None}


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, item_seed): the epoch's order and every item's random draws depend only on
    (seed, epoch, index), never on the number of workers or on where a run was resumed.

    With `num_replicas` > 1 each rank takes every num_replicas-th position of the (padded) order,
    as DistributedSampler does; `shuffle=False` keeps dataset order and adds no padding.
    """

    def __init__(self, size, seed, shuffle=True, rank=0, num_replicas=1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.num_replicas, self.epoch = rank, num_replicas, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _epoch_seed(self):
        return self.seed * 100_003 + self.epoch

    def __iter__(self):
        epoch_seed = self._epoch_seed()
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
            order += order[:len(self) * self.num_replicas - self.size]  # equal share per rank
        else:
            order = list(range(self.size))
        return ((i, epoch_seed) for i in order[self.rank::self.num_replicas])

    def __len__(self):
        if not self.shuffle:
            return len(range(self.rank, self.size, self.num_replicas))
        return -(-self.size // self.num_replicas)


def _item_rng(key):
    """Seed torch's RNG for one item (inside fork_rng) from the sampler's (index, epoch_seed) key."""
    index, epoch_seed = key if isinstance(key, tuple) else (key, 0)
    torch.manual_seed(epoch_seed * 1_000_003 + index)
    return index


class SplitDataset(Dataset):
    """Single images of a split: (uint8 image, label, domain, index). MSEdge training and evaluation."""

    def __init__(self, split, images, transform=None):
        self.split, self.images, self.transform = split, images, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):
            index = _item_rng(key)
            image = self.images[index]
            if self.transform is not None:
                image = self.transform(image)
        return image, self.split.labels[index], self.split.domains[index], index


class SketchPhotoPairs(Dataset):
    """ACNet training items: each sketch with a photo drawn at random from the same class.

    The draw and the augmentations are seeded from the EpochSampler's key, so pairs are reproducible.
    """

    def __init__(self, split, images, transform=None):
        self.split, self.images, self.transform = split, images, transform
        self.sketches = split.indices(SKETCH)
        self.photos_of_class = [[] for _ in split.classes]
        for i in split.indices(PHOTO):
            self.photos_of_class[split.labels[i]].append(i)

    def __len__(self):
        return len(self.sketches)

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):
            sketch_index = self.sketches[_item_rng(key)]
            label = self.split.labels[sketch_index]
            candidates = self.photos_of_class[label]
            photo_index = candidates[torch.randint(len(candidates), ()).item()]
            sketch, photo = self.images[sketch_index], self.images[photo_index]
            if self.transform is not None:
                sketch, photo = self.transform(sketch), self.transform(photo)
        return sketch, photo, label


# ----------------------------------------------------------------------------------------------
# Retrieval metrics

METRIC_NAMES = ('mAP@200', 'mAP@all', 'P@100', 'P@200')
# Bytes of working memory per (query, gallery) pair: similarity, sort keys, sorted keys, indices, relevance.
_BYTES_PER_PAIR = 4 + 8 + 8 + 8 + 1


def _as_tensor(x, device):
    return (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).to(device)


def rank_gallery(similarity):
    """Gallery indices by descending similarity per row; ties go to the lower gallery index.

    On the CPU, float32 rows are ranked by one int64 key per item: the similarity's bits, mapped so
    that integer order is float order, in the high word and the gallery index in the low word. The
    keys are unique, so NumPy's SIMD sort needs no stability and is about 9x faster than torch's
    stable sort. Elsewhere torch's stable sort is used.
    """
    if similarity.device.type != 'cpu' or similarity.dtype != torch.float32:
        return torch.sort(similarity, dim=1, descending=True, stable=True).indices
    bits = (similarity + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ascending = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order == float order
    keys = (~ascending).long() << 32  # descending similarity first
    keys |= torch.arange(similarity.shape[1], dtype=torch.int64)
    keys = torch.from_numpy(np.sort(keys.numpy(), axis=1))
    return keys & 0xFFFFFFFF


def _reverse_cummax(x):
    """y[:, i] = max(x[:, i:]) along dim 1: the interpolated precision envelope."""
    return torch.flip(torch.cummax(torch.flip(x, [1]), dim=1).values, [1])


def _class_block_metrics(similarity, is_relevant, num_relevant, map_ks, p_ks):
    """Per-query metrics for a block of queries that all have `num_relevant` relevant gallery items.

    Ranks the gallery by descending similarity (ties: lower gallery index first), then works on the
    ranks of the relevant items only: the m-th relevant item at rank r_m has precision m / r_m, and
    the precision envelope at a relevant rank is the running max of those from the end.
    """
    num_queries, gallery_size = similarity.shape
    relevant = is_relevant[rank_gallery(similarity)]
    ranks = relevant.nonzero()[:, 1].view(num_queries, num_relevant).double() + 1  # ascending per row
    del relevant
    precision = torch.arange(1, num_relevant + 1, dtype=torch.float64, device=ranks.device) / ranks
    out = {'mAP@all': _reverse_cummax(precision).mean(dim=1)}
    for k in map_ks:
        in_top = ranks <= k
        envelope = _reverse_cummax(precision * in_top)  # envelope within the top k only
        out[f'mAP@{k}'] = (envelope * in_top).sum(dim=1) / min(k, num_relevant)
        # pytorch-metric-learning's variant: no envelope, divided by the relevant items *found*.
        out[f'mAP@{k}_found'] = (precision * in_top).sum(dim=1) / in_top.sum(dim=1).clamp_min(1)
    for k in p_ks:
        out[f'P@{k}'] = (ranks <= k).sum(dim=1).double() / min(k, gallery_size)
    return out


def retrieval_metrics(query_vectors, query_labels, gallery_vectors, gallery_labels, *, device=None,
                      max_memory_mb=1024, per_query=False, map_ks=(200,), p_ks=(100, 200)):
    """Zero-shot SBIR metrics: mAP@200, mAP@all, P@100, P@200 and 'precise' (their mean).

    Similarity is cosine (vectors are L2-normalised here), computed in the vectors' precision (at
    least float32; pass float64 for rankings free of float32 rounding). For each query the gallery is
    ranked by descending similarity, ties broken by lower gallery index. With R relevant items:
      AP@k    = sum over relevant ranks i <= k of p*_i / min(k, R), where p*_i is the precision
                envelope max_{i <= j <= k} prec_j (k = gallery size for mAP@all; SAKE's definition)
      P@k     = relevant items in the top k / min(k, gallery size)
    Also returned: 'mAP@200_found', the variant that divides by the relevant items found in the top
    200 instead of min(k, R) and has no envelope (pytorch-metric-learning; reads much higher).

    Inputs may be torch tensors (any device) or NumPy arrays. Work is done in query blocks sized so the
    working memory stays under about `max_memory_mb`. Returns floats, or with per_query=True 1-D float64
    CPU tensors in query order (their means are the floats). Raises ValueError for a query whose class
    has no gallery item.
    """
    if device is None:
        device = query_vectors.device if isinstance(query_vectors, torch.Tensor) else 'cpu'
    queries, gallery = _as_tensor(query_vectors, device), _as_tensor(gallery_vectors, device)
    query_labels = _as_tensor(query_labels, device).long()
    gallery_labels = _as_tensor(gallery_labels, device).long()
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f'expected (queries, dim) and (gallery, dim) vectors, got {tuple(queries.shape)} '
                         f'and {tuple(gallery.shape)}')
    if len(query_labels) != len(queries) or len(gallery_labels) != len(gallery) or not len(queries) * len(gallery):
        raise ValueError('need at least one query and one gallery item, with one label per vector')
    dtype = torch.promote_types(queries.dtype, torch.float32)
    queries = torch.nn.functional.normalize(queries.to(dtype), dim=1)
    gallery = torch.nn.functional.normalize(gallery.to(dtype), dim=1)

    classes, gallery_counts = torch.unique(gallery_labels, return_counts=True)
    missing = torch.unique(query_labels[~torch.isin(query_labels, classes)])
    if len(missing):
        raise ValueError(f'query classes {missing.tolist()[:10]} have no item in the gallery: '
                         f'their AP is undefined (check that every val class has photos)')
    count_of = dict(zip(classes.tolist(), gallery_counts.tolist()))

    block = max(1, int(max_memory_mb * 2 ** 20 // (_BYTES_PER_PAIR * len(gallery))))
    results = {}
    for label in torch.unique(query_labels).tolist():
        members = (query_labels == label).nonzero()[:, 0]
        is_relevant = gallery_labels == label
        for start in range(0, len(members), block):
            rows = members[start:start + block]
            similarity = queries[rows] @ gallery.T
            block_metrics = _class_block_metrics(similarity, is_relevant, count_of[label], map_ks, p_ks)
            for name, values in block_metrics.items():
                results.setdefault(name, []).append((rows, values))

    per_query_values = {}
    for name, parts in results.items():
        values = torch.empty(len(queries), dtype=torch.float64, device=device)
        for rows, part in parts:
            values[rows] = part
        per_query_values[name] = values.cpu()
    main = [f'mAP@{k}' for k in map_ks] + ['mAP@all'] + [f'P@{k}' for k in p_ks]
    per_query_values['precise'] = torch.stack([per_query_values[n] for n in main]).mean(dim=0)
    if per_query:
        return per_query_values
    return {name: values.mean().item() for name, values in per_query_values.items()}


# ----------------------------------------------------------------------------------------------
# Reproducibility and safe file writing

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


_UMASK = os.umask(0)
os.umask(_UMASK)


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def save_together(writes):
    """Write files so that a failure (a full disk, say) leaves every one of them as it was.

    `writes` is a list of (path, write) with write(tmp_path) writing the file's content. Every file is
    first written in full to a temporary file beside it; only when all are written are they renamed
    onto their paths, in the given order (a rename needs no space).
    """
    staged = []
    try:
        for path, write in writes:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
        free = shutil.disk_usage(path.parent).free / 2 ** 20 if path.parent.exists() else 0
        reason = error.strerror if isinstance(error, OSError) and error.strerror else _first_line(error)
        raise UserError(f"could not write '{path}' ({reason}; {free:.0f} MB free there): the files being "
                        f"saved were left as they were") from error
    for tmp, path in staged:
        os.replace(tmp, path)


def atomic_write(path, write):
    """Call write(tmp_path), then rename onto `path`: a crash never leaves a half-written file."""
    save_together([(path, write)])


def save_torch(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def remove_stale_temporaries(path):
    """Temporary files that a killed process left beside `path` (call only while owning `path`)."""
    for tmp in Path(path).parent.glob(f'.{Path(path).name}.*.tmp'):
        tmp.unlink(missing_ok=True)


def check_writable_dir(path, option):
    """A folder that exists and is writable, or can be created: checked without creating anything."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} '{path}' is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} '{path}' cannot be created: '{existing}' is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {option} '{path}': '{existing}' is not writable (check its permissions)")


def _lock_holder_alive(holder):
    if holder.get('host') != socket.gethostname():
        return True  # another machine: no way to tell, so respect the lock
    try:
        os.kill(int(holder['pid']), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


def acquire_lock(path, what):
    """Own `what` through the lock file `path` while this process runs; returns the release function.

    A second process is refused with a message naming the first. A lock whose process no longer runs
    on this machine (killed, or the machine restarted) is taken over.
    """
    path = Path(path)
    record = json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                         'started': time.strftime('%Y-%m-%d %H:%M:%S')})
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_UMASK)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}  # empty or unreadable: its writer died before finishing it
            if holder and _lock_holder_alive(holder):
                raise UserError(f"{what} is being written by another process (pid {holder.get('pid')} on "
                                f"{holder.get('host')}, since {holder.get('started')}): wait for it, or use "
                                f"another --save_root; if that process is gone, delete '{path}'") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, 'w') as f:
            f.write(record)
        return lambda: path.unlink(missing_ok=True)
    raise UserError(f"could not take the lock '{path}' for {what}: another process keeps taking it")


# -2: the networks carry the original code's layer names and ACNet's extractor is the whole timm model;
# checkpoints and vectors carry the run's id and the data's fingerprint.
CHECKPOINT_FORMAT, VECTORS_FORMAT = 'zs-sbir-checkpoint-2', 'zs-sbir-vectors-2'
REQUIRED_KEYS = {CHECKPOINT_FORMAT: ('method', 'args', 'epoch', 'metrics', 'train_classes', 'model', 'vectors_file'),
                 VECTORS_FORMAT: ('method', 'data_name', 'data_root', 'classes', 'paths', 'labels', 'domains',
                                  'vectors', 'epoch', 'run_id')}
REQUIRED_ARGS = ('backbone_type', 'emb_dim', 'img_size', 'data_root', 'data_name')


def torch_file_problem(path, error):
    """Why torch.load(weights_only=True) refused a file, in words (never its advice to load it unsafely)."""
    size = Path(path).stat().st_size
    if size == 0:
        return 'the file is empty (0 bytes)'
    if str(path).endswith('.safetensors'):
        return f'it is not a valid safetensors file ({_first_line(error)})'
    with open(path, 'rb') as f:
        head = f.read(2)
    if head != b'PK' and head[:1] != b'\x80':
        return 'it is not a file written by torch.save'
    if 'weights_only' in str(error) or 'Unsupported global' in str(error):
        return 'it holds Python objects other than tensors and plain containers, which are never loaded here'
    return f'it is truncated or damaged ({_first_line(error)})'


def load_torch(path, expected_format, what):
    """Load a file this repo saved, with weights_only=True (a downloaded file cannot run code)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"'{path}' is a folder, not a {what}: name the file")
    if not path.is_file():
        raise UserError(f"{what} not found: '{path}'")
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        raise UserError(f"'{path}' cannot be read as a {what}: {torch_file_problem(path, error)}") from error
    found = obj.get('format') if isinstance(obj, dict) else None
    if isinstance(found, str) and found != expected_format and found.startswith(expected_format.rsplit('-', 1)[0]):
        raise UserError(f"'{path}' is a {what} of an earlier version of this repo (format {found!r}; this version "
                        f"reads {expected_format!r}, see README 'Checkpoint files'): train it again")
    if found != expected_format:
        raise UserError(f"'{path}' is not a {what} of this repo (format {found!r}, expected {expected_format!r})")
    missing = [key for key in REQUIRED_KEYS[expected_format] if key not in obj]
    if expected_format == CHECKPOINT_FORMAT and not missing:
        missing = [f'args.{key}' for key in REQUIRED_ARGS if not isinstance(obj['args'], dict) or key not in obj['args']]
    if missing:
        raise UserError(f"'{path}' is an incomplete {what}: it lacks {', '.join(missing)}")
    return obj


# How each --select_on rule picks the best epoch: the column it maximises.
SELECT_KEY = {'test': 'precise', 'heldout': 'heldout_precise'}


def read_results(path):
    """A results CSV of train.py as a pandas DataFrame, and the epoch row its selection rule picked;
    a UserError naming the file when it is not one (unreadable, empty, other columns)."""
    import pandas as pd
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise UserError(f"'{path}' is not a results CSV of train.py ({_first_line(error)})") from error
    select_on = frame['select_on'].iloc[-1] if 'select_on' in frame and len(frame) else 'test'
    needed = ['epoch', *METRIC_NAMES, SELECT_KEY.get(select_on, 'precise')]
    if frame.empty or select_on not in SELECT_KEY or any(c not in frame for c in needed):
        raise UserError(f"'{path}' is not a results CSV of train.py: it has no rows, or not the columns "
                        f"epoch, {', '.join(METRIC_NAMES)} and {SELECT_KEY.get(select_on, 'precise')}")
    # With --eval_queries the epochs were scored on a sample of the queries (eval_queries = its size) and
    # the selected epoch again on all of them, in a last row with eval_queries 'all': that row is reported.
    full = frame['eval_queries'].astype(str) == 'all' if 'eval_queries' in frame else pd.Series(True, frame.index)
    epochs = frame if full.all() else frame[~full]
    best = epochs.loc[epochs[SELECT_KEY[select_on]].idxmax()]
    final = frame[full & (frame['epoch'] == best['epoch'])] if not full.all() else epochs.loc[[best.name]]
    return epochs, (final.iloc[-1] if len(final) else best)


def csv_writer(rows):
    """write(path) for a list of dicts as CSV, columns in first-seen order (for atomic_write/save_together)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(path):
        with open(path, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return write


def load_checkpoint_vectors(data_base, checkpoint, vectors=None):
    """The val embeddings saved with a checkpoint (the _vectors.pth beside it, or `vectors`), refused
    when they belong to another run or another epoch."""
    if not (vectors or checkpoint['vectors_file']):
        raise UserError(f"'{data_base}' has no saved val embeddings (a converted release?): pass --vectors")
    path = Path(vectors) if vectors else Path(data_base).parent / checkpoint['vectors_file']
    record = load_torch(path, VECTORS_FORMAT, 'vectors file')
    if record['run_id'] != checkpoint.get('run_id'):
        raise UserError(f"'{path}' holds the embeddings of another run than '{data_base}': pass the "
                        f"_model.pth and _vectors.pth that train.py saved together")
    if record['epoch'] != checkpoint['epoch']:
        raise UserError(f"'{path}' holds the embeddings of epoch {record['epoch']}, but '{data_base}' is "
                        f"epoch {checkpoint['epoch']} of that run: pass its _model.pth (the best epoch), or --evaluate")
    return record, path


def write_csv(rows, path):
    """Write a list of dicts as CSV (columns in first-seen order), atomically."""
    atomic_write(path, csv_writer(rows))


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# Pictures and other outputs. What this repo writes is marked (a PNG text chunk, a file in a folder it
# made), so that a command replaces its own earlier output and nothing else.

OUTPUT_MARK, FOLDER_MARK = 'zs-sbir', '.written-by-zs-sbir'


def written_by_this_repo(path):
    """True for a PNG or a folder that a command of this repo wrote."""
    path = Path(path)
    if path.is_dir():
        return (path / FOLDER_MARK).is_file()
    try:
        with Image.open(path) as image:
            return image.info.get('Software') == OUTPUT_MARK
    except (OSError, ValueError):
        return False


def check_replaceable(path, hint='choose another --save_root'):
    """An output path that is free, or holds an earlier output of this repo; else a UserError."""
    path = Path(path)
    if path.exists() and not written_by_this_repo(path):
        kind = 'folder' if path.is_dir() else 'file'
        raise UserError(f"{kind} '{path}' exists and was not written by this repo: {hint} (nothing was written)")


def save_png(image, path):
    """Save a PIL image as a marked PNG, atomically."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text('Software', OUTPUT_MARK)
    atomic_write(path, lambda tmp: image.save(tmp, format='PNG', pnginfo=info))


def make_output_folder(folder):
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / FOLDER_MARK).touch()


def to_pil(image):
    """A (3, H, W) uint8 tensor as a PIL image (PIL images pass through)."""
    if isinstance(image, torch.Tensor):
        return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    return image


# The retrieval picture of test.py and search.py: tile size, gaps, caption height, frame width, frame colours
TILE, GAP, CAPTION, FRAME = 128, 6, 30, 4
COLOURS = {True: (40, 170, 60), False: (210, 40, 40), None: (150, 150, 150), 'query': (40, 90, 200)}


def fit_tile(image):
    return ImageOps.fit(to_pil(image).convert('RGB'), (TILE - 2 * FRAME, TILE - 2 * FRAME))


def draw_retrieval(query, extras, results):
    """One row: the query (blue frame), extra (name, picture)s (grey), then (image, caption, match) results,
    framed green for a match, red for a miss, grey when the query's class is unknown."""
    from PIL import ImageDraw
    tiles = [(query, 'query', 'query')] + [(img, name, None) for name, img in extras] + results
    canvas = Image.new('RGB', (GAP + len(tiles) * (TILE + GAP), 2 * GAP + TILE + CAPTION), 'white')
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption, match) in enumerate(tiles):
        x, y = GAP + i * (TILE + GAP), GAP
        draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], fill=COLOURS[match])
        canvas.paste(fit_tile(image), (x + FRAME, y + FRAME))
        draw.multiline_text((x, y + TILE + 2), caption, fill='black', spacing=2)
    return canvas


def heatmap(attention, base):
    """An attention map (h, w) laid over a picture, stretched to its own min-max range."""
    stretched = (attention - attention.min()) / (attention.max() - attention.min()).clamp_min(1e-6)
    grey = Image.fromarray((stretched * 255).byte().cpu().numpy()).resize(base.size, Image.BILINEAR)
    return Image.blend(base.convert('RGB'), ImageOps.colorize(grey, '#000060', '#ffe000'), 0.6)


# ----------------------------------------------------------------------------------------------
# Command lines: one line and exit code 2 for every problem a user can fix

class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (no usage block), exit code 2."""

    def error(self, message):
        print(f'error: {message} (see {self.prog} --help)', file=sys.stderr)
        sys.exit(2)


def one_line(error):
    """The message of a UserError; one raised in a DataLoader worker arrives wrapped in a traceback."""
    text = str(error).strip()
    if 'Original Traceback' in text:
        text = text.splitlines()[-1].split(': ', 1)[-1]
    return ' '.join(text.split('\n'))


def run_cli(command, args):
    """Run command(args): a UserError becomes one line on stderr and exit code 2, Ctrl-C exit code 130."""
    try:
        return command(args)
    except UserError as error:
        print(f'error: {one_line(error)}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('\ninterrupted', file=sys.stderr)
        sys.exit(130)


def query_files(names, suffixes=None):
    """Expand files and folders (recursively) into image files (.jpg/.jpeg/.png, or any of `suffixes`);
    a missing path, an empty name or a folder without images is a UserError."""
    wanted = (lambda p: p.suffix.lower() in suffixes) if suffixes else is_image_file
    files = []
    for name in names:
        path = Path(name)
        if not name:
            raise UserError('a query name must not be empty')
        if path.is_dir():
            found = sorted(p for p in path.rglob('*') if p.is_file() and wanted(p))
            if not found:
                raise UserError(f"query folder '{path}' holds no {'' if suffixes else '.jpg/.jpeg/.png '}image")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"query image not found: '{path}'")
    return files


def check_device(device):
    """A --device that torch can use here, or a UserError saying what this machine has."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise UserError(f"--device {device!r} is not a device name (use cpu, cuda or cuda:N)") from error
    if parsed.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UserError(f'--device {device}: no CUDA GPU is visible here; use --device cpu')
        if parsed.index is not None and parsed.index >= count:
            raise UserError(f'--device {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}')
    elif parsed.type != 'cpu':
        raise UserError(f'--device {device}: only cpu and cuda devices are supported')
    return parsed
