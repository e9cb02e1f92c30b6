"""Dataset folders and retrieval metrics, shared by every script.

Dataset layout (docs/data.md):  <data_root>/<data_name>/{train,val}/{sketch,photo}/<class>/<images>
Domain codes: photo = 0, sketch = 1. Labels: class index in sorted class-name order.
"""
import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from cli import DataError, UserError, check_workers, first_line
from images import IMAGE_SUFFIXES, RESIZE, is_image_file, load_image, read_rgb
from safe_files import UMASK, acquire_lock, atomic_write, check_writable_dir, remove_stale_temporaries

PHOTO, SKETCH = 0, 1
DOMAINS = {'photo': PHOTO, 'sketch': SKETCH}
# Both seeds drop the TU-Berlin test classes that have fewer photos than this.
TUBERLIN_MIN_VAL_PHOTOS = 400


LAYOUT_HELP = ('expected <data_root>/<data_name>/{train,val}/{sketch,photo}/<class>/<images>; '
               '`python prepare.py synthetic --data_root DIR` writes a small dataset of this shape')



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
        read_rgb(path)  # a full decode: catches truncated files too
        return True
    except DataError:
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
# Image datasets: decoded files, or the pre-resized cache of prepare.py cache

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
    if not 32 <= size <= 2048 or size % 4:
        raise UserError(f'--img_size must be a multiple of 4 from 32 to 2048 (as train.py takes), got {size}')
    check_workers(workers, minimum=1)
    interpolation, written = RESIZE[method], []
    folder = cache_path(data_root, data_name, 'train', size, interpolation).parent
    splits = {name: scan_split(data_root, data_name, name) for name in ('train', 'val')}
    check_writable_dir(folder, 'cache folder')
    folder.mkdir(exist_ok=True)
    release = acquire_lock(folder / f'.{size}_{interpolation}.lock', f"the {size}-px {interpolation} cache of "
                           f"'{folder.parent}'", hint='wait for it to finish')
    try:
        for split_name, split in splits.items():
            path = cache_path(data_root, data_name, split_name, size, interpolation)
            written.append(_write_cache(split, split_name, path, size, interpolation, workers))
    finally:
        release()
    return written


def _write_cache(split, split_name, path, size, interpolation, workers):
    stats = file_stats(split.root, split.paths)  # before decoding: a change during the build is noticed too
    print(describe_split(split, split_name))
    path.with_suffix('.json').unlink(missing_ok=True)  # no index: an old cache is never half-valid
    remove_stale_temporaries(path)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        np.lib.format.open_memmap(partial, mode='w+', dtype=np.uint8, shape=(len(split), 3, size, size)).flush()
        chunk = 256
        tasks = [(partial, split.root, split.paths[i:i + chunk], i, size, interpolation)
                 for i in range(0, len(split), chunk)]
        with Pool(max(1, workers)) as pool, tqdm(total=len(split), desc=f'cache {split_name}', disable=None) as bar:
            for done in pool.imap_unordered(_fill, tasks):
                bar.update(done)
    except BaseException as error:
        os.remove(partial)
        if isinstance(error, (OSError, ValueError, MemoryError)):
            raise UserError(f"could not write the image cache '{path}' ({first_line(error)}): nothing was kept") \
                from error
        raise
    os.chmod(partial, 0o666 & ~UMASK)
    os.replace(partial, path)
    index = {'format': CACHE_FORMAT, 'size': size, 'interpolation': interpolation, 'paths': list(split.paths),
             'stats': stats}
    atomic_write(path.with_suffix('.json'), lambda tmp: Path(tmp).write_text(json.dumps(index)))
    print(f'wrote {path} ({path.stat().st_size / 2 ** 30:.2f} GiB)')
    return path



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


def top_k(query, gallery, k):
    """(gallery rows, similarities) of the k rows most similar to one query vector, best first: the float32
    products of unit vectors that the metrics rank by, ties to the lower row."""
    similarity = gallery @ query
    order = rank_gallery(similarity.unsqueeze(0))[0, :k]
    return order.tolist(), similarity[order].tolist()


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



# How each --select_on rule picks the best epoch: the column it maximises.
SELECT_KEY = {'test': 'precise', 'heldout': 'heldout_precise'}


def read_results(path):
    """A results CSV of train.py as a pandas DataFrame, and the epoch row its selection rule picked;
    a UserError naming the file when it is not one (unreadable, empty, other columns)."""
    import pandas as pd
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise UserError(f"'{path}' is not a results CSV of train.py ({first_line(error)})") from error
    select_on = frame['select_on'].iloc[-1] if 'select_on' in frame and len(frame) else 'test'
    needed = ['epoch', *METRIC_NAMES, SELECT_KEY.get(select_on, 'precise')]
    if frame.empty or select_on not in SELECT_KEY or any(c not in frame for c in needed):
        raise UserError(f"'{path}' is not a results CSV of train.py: it has no rows, or not the columns "
                        f"epoch, {', '.join(METRIC_NAMES)} and {SELECT_KEY.get(select_on, 'precise')}")
    for column in frame:
        if column in needed or column in METRIC_NAMES or column == 'precise' or column.startswith('heldout_') or \
                column.endswith('_loss'):
            values = pd.to_numeric(frame[column], errors='coerce')
            # losses are empty in the row of a full evaluation (--eval_queries); nothing else may be
            wrong = (values.isna() & frame[column].notna()) | (values.isna() & (column in needed)) | \
                ~np.isfinite(values.fillna(0))
            if wrong.any():
                row = int(wrong.to_numpy().nonzero()[0][0])
                raise UserError(f"'{path}' is not a results CSV of train.py: row {row + 2}, column {column} holds "
                                f"{str(frame[column].iloc[row])!r}, not a number")
            frame[column] = values
    if (frame['epoch'] % 1 != 0).any() or (frame['epoch'] < 0).any():
        raise UserError(f"'{path}' is not a results CSV of train.py: its epochs are not whole numbers")
    frame['epoch'] = frame['epoch'].astype(int)
    # With --eval_queries the epochs were scored on a sample of the queries (eval_queries = its size) and
    # the selected epoch again on all of them, in a last row with eval_queries 'all': that row is reported.
    full = frame['eval_queries'].astype(str) == 'all' if 'eval_queries' in frame else pd.Series(True, frame.index)
    epochs = frame if full.all() else frame[~full]
    best = epochs.loc[epochs[SELECT_KEY[select_on]].idxmax()]
    final = frame[full & (frame['epoch'] == best['epoch'])] if not full.all() else epochs.loc[[best.name]]
    return epochs, (final.iloc[-1] if len(final) else best)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)

