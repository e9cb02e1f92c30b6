"""Dataset folders and retrieval metrics: the two things every script shares.

Dataset layout (docs/data.md):  <data_root>/<data_name>/{train,val}/{sketch,photo}/<class>/<images>
Domain codes: photo = 0, sketch = 1. Labels: class index in sorted class-name order.
Metrics (docs/metrics.md): mAP@200, mAP@all, P@100, P@200 and `precise`, their mean, exactly, for every query.
"""
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from zs_sbir.cli import DataError
from zs_sbir.images import IMAGE_SUFFIXES, is_image_file, read_rgb
from zs_sbir.processes import map_in_processes

PHOTO, SKETCH = 0, 1
DOMAINS = {'photo': PHOTO, 'sketch': SKETCH}
# Both seeds drop the TU-Berlin test classes that have fewer photos than this; ClipPrompt (c86f1f5) keeps them all.
TUBERLIN_MIN_VAL_PHOTOS = 400
VAL_CLASSES = ('seeds', 'all')  # --val_classes: the seeds' TU-Berlin rule, or every val class


LAYOUT = 'expected <data_root>/<data_name>/{train,val}/{sketch,photo}/<class>/<images>'
# How each benchmark's folder is made from its download (docs/data.md); any other name: the generated dataset's
PREPARED_BY = {'sketchy': 'prepare.py sketchy --split 21|25 --sketch_dir ... --photo_dir ...',
               'tuberlin': 'prepare.py tuberlin --sketch_dir ... --photo_dir ...',
               'quickdraw': 'prepare.py quickdraw --sketch_dir ... --photo_dir ...'}


def layout_help(data_name=''):
    """What a dataset folder should hold, and the command that makes it."""
    for prefix, command in PREPARED_BY.items():
        if data_name.startswith(prefix):
            return f'{LAYOUT}; build it from its download with `python {command}` (docs/data.md)'
    return f'{LAYOUT}; `python prepare.py synthetic --data_root DIR` writes a small dataset of this shape'



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


def _require_dir(path, what, data_name=''):
    if path.exists() and not path.is_dir():
        raise DataError(f"{what} '{path}' is a file, not a folder ({layout_help(data_name)})")
    if not path.is_dir():
        raise DataError(f"{what} not found: '{path}' ({layout_help(data_name)})")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"{what} is not readable: '{path}' (check its permissions)")


def scan_split(data_root, data_name, split, min_photos=None, keep_broken_links=False, val_classes='seeds'):
    """Scan `<data_root>/<data_name>/<split>/{sketch,photo}/<class>/` into a Split.

    Classes with fewer than `min_photos` photos are left out on both sides (TU-Berlin val rule); by default that
    rule applies to the val split of datasets named tuberlin*, unless `val_classes` is 'all'. Raises DataError for a missing folder,
    a class on one side only, an empty class, a split with no images, and links to files that no longer
    exist (prepare.py links by default), unless `keep_broken_links` (they are then listed as images, which
    --skip_bad_images leaves out).
    """
    if min_photos is None:
        seeds_rule = data_name.startswith('tuberlin') and split == 'val' and val_classes == 'seeds'
        min_photos = TUBERLIN_MIN_VAL_PHOTOS if seeds_rule else 0
    _require_dir(Path(data_root), 'data root', data_name)
    root = Path(data_root) / data_name / split
    _require_dir(root, f'{split} folder of dataset {data_name!r}', data_name)
    for side in DOMAINS:
        _require_dir(root / side, f"'{side}' folder", data_name)
    sketch_classes, photo_classes = _list_class_folders(root / 'sketch'), _list_class_folders(root / 'photo')
    one_sided = sorted(set(sketch_classes) ^ set(photo_classes))
    if one_sided:
        where = ', '.join(f"'{c}' (only in {'sketch' if c in sketch_classes else 'photo'}/)"
                          for c in one_sided[:10])
        more = f' and {len(one_sided) - 10} more' if len(one_sided) > 10 else ''
        raise DataError(f'{root}: every class needs both a sketch/ and a photo/ folder; '
                        f'one side only: {where}{more}')
    if not sketch_classes:
        raise DataError(f'{root}: no class folders under sketch/ and photo/ ({layout_help(data_name)})')

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
        digest.update(f'{path}\t{label}\t{domain}\n'.encode(errors='surrogateescape'))  # any file name
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
        readable = list(map_in_processes(_is_readable, paths, workers, f"checking the images of '{split.root}'",
                                         chunksize=64))
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
# Retrieval metrics

METRIC_NAMES = ('mAP@200', 'mAP@all', 'P@100', 'P@200')
# Two conventions for the same names (docs/metrics.md): SAKE's, which ACNet and MSEdge report, and torchmetrics
# 1.0's, which the CLIP papers' code (ClipPrompt) reports. Results carry both: SAKE's under the plain names,
# torchmetrics' prefixed.
CONVENTIONS = ('sake', 'torchmetrics')


def metric_name(name, convention='sake'):
    """The key of metric `name` (or 'precise') in a convention: 'mAP@all', or 'torchmetrics_mAP@all'."""
    return name if convention == 'sake' else f'{convention}_{name}'


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
    out = {'mAP@all': _reverse_cummax(precision).mean(dim=1),
           'torchmetrics_mAP@all': precision.mean(dim=1)}  # no envelope
    for k in map_ks:
        in_top = ranks <= k
        envelope = _reverse_cummax(precision * in_top)  # envelope within the top k only
        out[f'mAP@{k}'] = (envelope * in_top).sum(dim=1) / min(k, num_relevant)
        # torchmetrics 1.0 (and pytorch-metric-learning's early AccuracyCalculator): no envelope, divided by the
        # relevant items *found* in the top k; 0 when none is
        out[f'torchmetrics_mAP@{k}'] = (precision * in_top).sum(dim=1) / in_top.sum(dim=1).clamp_min(1)
    for k in p_ks:
        hits = (ranks <= k).sum(dim=1).double()
        out[f'P@{k}'] = hits / min(k, gallery_size)
        out[f'torchmetrics_P@{k}'] = hits / k
    return out


def retrieval_metrics(query_vectors, query_labels, gallery_vectors, gallery_labels, *, device=None,
                      max_memory_mb=1024, per_query=False, map_ks=(200,), p_ks=(100, 200)):
    """Zero-shot SBIR metrics: mAP@200, mAP@all, P@100, P@200 and 'precise' (their mean), in both conventions.

    Similarity is cosine (vectors are L2-normalised here), computed in the vectors' precision (at
    least float32; pass float64 for rankings free of float32 rounding). For each query the gallery is
    ranked by descending similarity, ties broken by lower gallery index. With R relevant items and
    prec_i the precision at rank i:
      SAKE's (the plain names, as ACNet's and MSEdge's code):
        AP@k  = sum over relevant ranks i <= k of p*_i / min(k, R), where p*_i is the precision
                envelope max_{i <= j <= k} prec_j (k = gallery size for mAP@all)
        P@k   = relevant items in the top k / min(k, gallery size)
      torchmetrics 1.0's (the names prefixed torchmetrics_, as ClipPrompt's code):
        AP@k  = mean of prec_i over the relevant ranks i <= k (0 when none): no envelope, divided by the
                relevant items found in the top k (mAP@all: by R)
        P@k   = relevant items in the top k / k

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
    for convention in CONVENTIONS:
        per_query_values[metric_name('precise', convention)] = torch.stack(
            [per_query_values[metric_name(n, convention)] for n in main]).mean(dim=0)
    if per_query:
        return per_query_values
    return {name: values.mean().item() for name, values in per_query_values.items()}



# ----------------------------------------------------------------------------------------------
# Fine-grained ZS-SBIR (CLIP-AT, Sain et al. CVPR 2023; SpLIP, ECCV 2024): does a sketch find its own photo?

FINE_GRAINED_KS = (1, 5, 10)
FINE_GRAINED_NAMES = tuple(f'Acc@{k}' for k in FINE_GRAINED_KS)
PAIR_RULE = ("Sketchy's file-name rule: sketch <photo stem>-<n>.<ext> beside photo <photo stem>.<ext>, "
             'in the same class folder')


def instance_pairs(split):
    """For every item of the split, the index of the sketch's own photo under Sketchy's file-name rule
    (`n02121808_10-3.png` is a sketch of `n02121808_10.jpg` of the same class), else -1 (photos, unpaired
    sketches)."""
    photo_of = {}
    for i, (path, label, domain) in enumerate(zip(split.paths, split.labels, split.domains)):
        if domain == PHOTO:
            photo_of.setdefault((label, Path(path).stem), i)
    pairs = [-1] * len(split)
    for i, (path, label, domain) in enumerate(zip(split.paths, split.labels, split.domains)):
        stem, dash, number = Path(path).stem.rpartition('-')
        if domain == SKETCH and dash and number.isdigit():
            pairs[i] = photo_of.get((label, stem), -1)
    return pairs


def fine_grained_accuracy(query_vectors, query_labels, own_photos, gallery_vectors, gallery_labels, *,
                          ks=FINE_GRAINED_KS, per_query=False, max_memory_mb=1024):
    """Acc@k of fine-grained ZS-SBIR: the share of queries whose own photo (`own_photos[i]`, a gallery index)
    ranks within the top k of the gallery photos of the query's own class, each photo once. Cosine similarity;
    ties go to the lower gallery index, as in retrieval_metrics. Returns {'Acc@k': float}, or with per_query=True
    each query's rank of its own photo (1 = first) as a 1-D int64 CPU tensor."""
    device = query_vectors.device if isinstance(query_vectors, torch.Tensor) else 'cpu'
    queries, gallery = _as_tensor(query_vectors, device), _as_tensor(gallery_vectors, device)
    query_labels, gallery_labels = _as_tensor(query_labels, device).long(), _as_tensor(gallery_labels, device).long()
    own_photos = _as_tensor(own_photos, device).long()
    if not len(queries) or len(own_photos) != len(queries) or len(query_labels) != len(queries):
        raise ValueError('need at least one query, with one label and one own photo each')
    if (own_photos < 0).any() or (own_photos >= len(gallery)).any() or \
            (gallery_labels[own_photos.clamp(0, len(gallery) - 1)] != query_labels).any():
        raise ValueError("every query's own photo must be a gallery photo of the query's class")
    dtype = torch.promote_types(queries.dtype, torch.float32)
    queries = torch.nn.functional.normalize(queries.to(dtype), dim=1)
    gallery = torch.nn.functional.normalize(gallery.to(dtype), dim=1)
    index = torch.arange(len(gallery), device=device)
    # per (query, photo): the similarity and four boolean temporaries
    block = max(1, int(max_memory_mb * 2 ** 20 // ((queries.element_size() + 4) * len(gallery))))
    ranks = []
    for start in range(0, len(queries), block):
        rows = slice(start, start + block)
        similarity = queries[rows] @ gallery.T
        own = own_photos[rows, None]
        mine = similarity.gather(1, own)
        ahead = (similarity > mine) | ((similarity == mine) & (index < own))
        ranks.append((ahead & (gallery_labels == query_labels[rows, None])).sum(dim=1) + 1)
    ranks = torch.cat(ranks).cpu()
    if per_query:
        return ranks
    return {f'Acc@{k}': (ranks <= k).double().mean().item() for k in ks}


# How each --select_on rule picks the best epoch: the column it maximises.
