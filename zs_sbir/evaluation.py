"""Embedding a split and scoring it: the data loaders that feed a model its images, the embedding loop over a split
(train.py each epoch, test.py --evaluate, speed.py), and the unseen-class and generalized metrics."""
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import (FINE_GRAINED_NAMES, METRIC_NAMES, PAIR_RULE, PHOTO, SKETCH, fine_grained_accuracy, instance_pairs,
                   metric_name, retrieval_metrics)
from zs_sbir.cli import DataError
from zs_sbir.datasets import EpochSampler, SplitDataset
from zs_sbir.image_cache import CachedImages
from zs_sbir.images import FileImages
from zs_sbir.retrieval import embed


def loader_options(workers, device):
    return dict(num_workers=workers, pin_memory=str(device).startswith('cuda'), persistent_workers=workers > 0)


def split_images(split, method, img_size, cache=None):
    """Where a split's uint8 images come from, resized with the method's filter: decoded files, or with `cache` =
    (data_root, data_name, split name, the --method that names its filter) the arrays of `prepare.py cache`."""
    if cache:
        return CachedImages(*cache[:3], split, img_size, cache[3], method.interpolation)
    return FileImages(split.root, split.paths, img_size, method.interpolation)


def make_eval_loader(split, images, batch_size, workers=0, device='cpu', rank=0, world=1):
    """Every image of the split (this process's share, in split order), as the method's evaluation sees it."""
    dataset = SplitDataset(split, images)
    sampler = EpochSampler(len(dataset), 0, shuffle=False, rank=rank, num_replicas=world)
    return DataLoader(dataset, batch_size, sampler=sampler, **loader_options(workers, device))


def to_device(batch, device, channels_last=False):
    """Non-blocking copies; image batches (4-d) optionally in channels_last."""
    layout = torch.channels_last if channels_last else torch.preserve_format
    return [b.to(device, non_blocking=True, memory_format=layout) if b.ndim == 4 else b.to(device, non_blocking=True)
            for b in batch]


def gather_rows(rows, index, total, world):
    """Rows computed on every process's share of a split, assembled in split order on every process."""
    if world > 1:
        size = torch.tensor([len(rows)], device=rows.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        longest = int(max(sizes).item())
        padded_rows = torch.zeros(longest, rows.shape[1], device=rows.device, dtype=rows.dtype)
        padded_index = torch.full((longest,), -1, device=rows.device, dtype=index.dtype)
        padded_rows[:len(rows)], padded_index[:len(index)] = rows, index
        all_rows, all_index = [torch.zeros_like(padded_rows) for _ in range(world)], \
            [torch.zeros_like(padded_index) for _ in range(world)]
        dist.all_gather(all_rows, padded_rows)
        dist.all_gather(all_index, padded_index)
        rows, index = torch.cat(all_rows), torch.cat(all_index)
        rows, index = rows[index >= 0], index[index >= 0]
    return torch.zeros(total, rows.shape[1], device=rows.device, dtype=rows.dtype).index_copy_(0, index, rows)



@torch.inference_mode()
def embed_split(model, loader, device, desc='embed val', amp=False, channels_last=False, world=1, show=True):
    """Embeddings of every item of the loader's split, in split order (row i = split item i)."""
    model.eval()
    chunks, order = [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if show else True):
        images, _, domains, index = to_device(batch, device, channels_last)
        chunks.append(embed(model, images, domains, amp))
        order.append(index)
    return gather_rows(torch.cat(chunks), torch.cat(order), len(loader.dataset), world)


def collapsed(vectors, tolerance=1e-6):
    """True when every embedding is the same vector (all zero, say): a network that no longer tells images apart."""
    return len(vectors) > 1 and bool((vectors - vectors[:1]).abs().max() <= tolerance)


def split_metrics(vectors, split):
    """Unseen-class metrics: every sketch of the split queries all its photos."""
    labels = torch.tensor(split.labels, device=vectors.device)
    domains = torch.tensor(split.domains, device=vectors.device)
    sketch, photo = domains == SKETCH, domains == PHOTO
    return retrieval_metrics(vectors[sketch], labels[sketch], vectors[photo], labels[photo])


def sample_queries(split, count, seed):
    """The split with every photo and a fixed, seeded sample of `count` of its sketches."""
    sketches = split.indices(SKETCH)
    chosen = set(np.random.default_rng(seed).choice(sketches, size=count, replace=False).tolist())
    return split.subset([i for i in range(len(split)) if split.domains[i] == PHOTO or i in chosen])


# Generalized ZS-SBIR (SEM-PCYC, Dutta & Akata, CVPR 2019, src/test.py with --gzs-sbir): the seen-class items
# added to the unseen test set number 20% of its sketches and of its photos.
GZS_SHARE = 0.2


def gzs_seen_items(heldout, val, seed):
    """The seen-class items generalized ZS-SBIR adds to the unseen test set (docs/metrics.md): int(0.2 x its
    photos) photos drawn uniformly, without replacement, from the held-out seen-class photos (pooled over
    classes), then int(0.2 x its sketches) sketches drawn likewise from the held-out sketches of the classes
    those photos show (a query needs a relevant photo for its AP to be defined). Fewer when fewer are held out."""
    rng = np.random.default_rng(seed)
    photos = heldout.indices(PHOTO)
    photos = rng.choice(photos, min(len(photos), int(GZS_SHARE * val.count(PHOTO))), replace=False).tolist()
    shown = {heldout.labels[i] for i in photos}
    sketches = [i for i in heldout.indices(SKETCH) if heldout.labels[i] in shown]
    sketches = rng.choice(sketches, min(len(sketches), int(GZS_SHARE * val.count(SKETCH))), replace=False).tolist()
    return heldout.subset(sorted(photos + sketches))


def gzs_pool(seen, val):
    """How many seen sketches and photos GZS adds, and how many its protocol asks for (20 % of the unseen test
    set's): the results CSV's gzs_seen_* and gzs_protocol_* columns."""
    return {'gzs_seen_sketches': seen.count(SKETCH), 'gzs_seen_photos': seen.count(PHOTO),
            'gzs_protocol_sketches': int(GZS_SHARE * val.count(SKETCH)),
            'gzs_protocol_photos': int(GZS_SHARE * val.count(PHOTO))}


def gzs_shortfall(seen, val):
    """'' when the seen items are the protocol's 20 % of the unseen test set, else what they fall short of, in
    words (fewer images were held out of training than the protocol draws)."""
    pool = gzs_pool(seen, val)
    if all(pool[f'gzs_seen_{d}'] >= pool[f'gzs_protocol_{d}'] for d in ('sketches', 'photos')):
        return ''
    return (f" (fewer than the protocol's 20 %, {pool['gzs_protocol_sketches']} sketches and "
            f"{pool['gzs_protocol_photos']} photos: fewer were held out of training; train with a larger "
            f'--heldout_fraction to hold out more)')


def gzs_metrics(val_vectors, val, seen_vectors, seen):
    """The four metrics over the generalized test set: every sketch (unseen and seen) queries every photo
    (unseen and seen); relevant means the same class. Seen labels follow the unseen ones."""
    device = val_vectors.device
    labels = torch.tensor(val.labels + [len(val.classes) + label for label in seen.labels], device=device)
    domains = torch.tensor(val.domains + seen.domains, device=device)
    vectors = torch.cat([val_vectors, seen_vectors.to(device)])
    sketch, photo = domains == SKETCH, domains == PHOTO
    return retrieval_metrics(vectors[sketch], labels[sketch], vectors[photo], labels[photo])


def paired_sketches(split, option='--fine_grained'):
    """The split's instance pairs (utils.instance_pairs) and how many sketches have one; a DataError naming the
    folder when none has."""
    pairs = instance_pairs(split)
    count = sum(pair >= 0 for pair in pairs)
    if not count:
        raise DataError(f"{option}: no sketch in '{split.root}' has its own photo by {PAIR_RULE} (the generated "
                        f'dataset has pairs with prepare.py synthetic --pairs)')
    return pairs, count


def describe_pairs(split):
    """One line: how many sketches fine-grained ZS-SBIR scores, against how many photos."""
    pairs, count = paired_sketches(split)
    photos = len({pair for pair in pairs if pair >= 0})
    return (f'fine-grained: {count} of the {split.count(SKETCH)} sketches look for their own photo among the '
            f'{photos} photos of their classes that have sketches')


def fine_grained_metrics(vectors, split):
    """fg_Acc@1/5/10: every sketch that has its own photo (Sketchy's file-name rule) looks for it among the photos
    of its class that have sketches, each once (the de-duplicated photos of the class's pairs, as CLIP-AT's
    gallery: Sketchy's extended photos, which no sketch shows, stay out)."""
    pairs, _ = paired_sketches(split)
    sketches = [i for i, pair in enumerate(pairs) if pair >= 0]
    photos = sorted({pairs[i] for i in sketches})
    column = {item: j for j, item in enumerate(photos)}
    labels = torch.tensor(split.labels, device=vectors.device)
    accuracy = fine_grained_accuracy(vectors[sketches], labels[sketches], [column[pairs[i]] for i in sketches],
                                     vectors[photos], labels[photos])
    return {f'fg_{name}': value for name, value in accuracy.items()}


def format_fine_grained(metrics):
    return ' '.join(f'{name} {metrics["fg_" + name]:.4f}' for name in FINE_GRAINED_NAMES)


def format_metrics(metrics, convention='sake', prefix=''):
    """The four metrics and precise of one convention (of `prefix`'s, e.g. 'gzs_'), as a line of text."""
    values = ' '.join(f'{name} {metrics[prefix + metric_name(name, convention)]:.4f}'
                      for name in (*METRIC_NAMES, 'precise'))
    return values if convention == 'sake' else f'({convention}) {values}'

