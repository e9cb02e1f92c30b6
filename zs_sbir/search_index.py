"""Photo indexes of search.py (docs/search.md): reading and writing an index folder, embedding photo folders into
it, and answering queries (Searcher).

An index folder holds meta.json (the format, the model's identity, the photos folder, the kind of index and the
names of its data files) and the data files it names: the embeddings (vectors-<id>.npy), the file of each row
(files-<id>.csv) and, for an approximate index, the FAISS index (index-<id>.faiss). A write puts new data files
beside the old ones and then replaces meta.json, so a reader sees the old index or the new one, never a mix,
and a crash loses nothing. Nothing else in the folder is ever touched.
"""
import csv
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from utils import SKETCH
from zs_sbir.checkpoint import model_identity
from zs_sbir.cli import UserError, first_line
from zs_sbir.images import FileImages, image_tensor, load_image, pillow_suffixes, to_rgb8, walk_image_files
from zs_sbir.retrieval import Gallery, embed, load_model
from zs_sbir.safe_files import atomic_write, save_together

# -2: data files named per write (listed in meta.json); -1 (fixed names) is still read
INDEX_FORMAT, READABLE_FORMATS = 'zs-sbir-index-2', ('zs-sbir-index-1', 'zs-sbir-index-2')
INDEX_KINDS = ('flat', 'ivf', 'hnsw')
LOCK, JOURNAL = '.search-index.lock', '.search-index.writing.json'  # ours, hidden; the journal names a write's files
DATA_FILE = re.compile(r'(vectors|files|index)-[0-9a-f]{12}\.(npy|csv|faiss)')  # what a write of this repo names
FORMAT_1_FILES = {'vectors': 'vectors.npy', 'table': 'files.csv', 'index': 'index.faiss'}
TABLE_COLUMNS = ['row', 'path', 'size', 'mtime_ns']


def embed_as(model, images, domain, device):
    """Embeddings (on the CPU) of uint8 images (B, 3, H, W), all taken as `domain`."""
    images = images.to(device)
    return embed(model, images, torch.full((len(images),), domain, device=device)).cpu()


# ----------------------------------------------------------------------------------------------- photos

def photo_files(root):
    """(every image file under `root` by Pillow's extensions, as sorted relative paths; [(path, why)] of what
    could not be looked into). Links to folders are followed; hidden files and folders are left out."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--photos folder not found: '{root}'")
    files, skipped = walk_image_files(root, pillow_suffixes())
    if not files:
        raise UserError(f"--photos folder '{root}' holds no image file" +
                        (f" that could be read ('{skipped[0][0]}' {skipped[0][1]})" if skipped else ''))
    return [str(p) for p in files], skipped


def file_key(root, path):
    """(path, size, modification time): what tells that a photo is the one embedded before."""
    info = os.stat(Path(root) / path)
    return path, info.st_size, info.st_mtime_ns


def photo_batches(files, root, size, interpolation, batch_size, workers, device):
    """(positions in `files`, uint8 images or None, positions that do not decode) per batch, in order."""
    loader = DataLoader(FileImages(root, files, size, interpolation, skip_bad=True), batch_size,
                        num_workers=workers, collate_fn=_collate, pin_memory=str(device).startswith('cuda'))
    start = 0
    for good, images, bad in loader:
        yield [start + i for i in good], images, [start + i for i in bad]
        start += len(good) + len(bad)


def _collate(items):
    good = [i for i, image in enumerate(items) if image is not None]
    images = torch.stack([items[i] for i in good]) if good else None
    return good, images, [i for i, image in enumerate(items) if image is None]


# ----------------------------------------------------------------------------------------------- the folder

def is_index(folder):
    return (Path(folder) / 'meta.json').is_file()


def _meta(folder):
    path = Path(folder) / 'meta.json'
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"index '{folder}': meta.json cannot be read ({first_line(error)}): build the index again "
                        f"with `search.py index --rebuild`") from error
    needed = {'format': str, 'model': dict, 'photos': str, 'kind': str, 'checkpoint': str}
    files = meta.get('files') if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or any(not isinstance(meta.get(key), kind) for key, kind in needed.items()) or \
            meta['kind'] not in INDEX_KINDS or not isinstance(meta['model'].get('emb_dim'), int) or \
            not isinstance(meta.get('photo_folders', []), list) or (files is not None and not _own_file_names(files)):
        raise UserError(f"index '{folder}': meta.json is not that of an index of search.py (its "
                        f"{', '.join(needed)} or files are missing or of another kind): build the index again with "
                        f"`search.py index --rebuild`")
    if meta['format'] not in READABLE_FORMATS:
        raise UserError(f"index '{folder}' is of format {meta['format']!r}, which this version does not read: "
                        f"build it again with `search.py index --rebuild`")
    return meta


def _own_file_names(files):
    """True for a meta.json's `files`: the names of data files this repo writes, in the index folder itself."""
    return isinstance(files, dict) and {'vectors', 'table'} <= set(files) <= {'vectors', 'table', 'index'} and \
        all(isinstance(name, str) and DATA_FILE.fullmatch(name) for name in files.values())


def photo_folders(meta):
    """The folders an index holds photos of: its photos folder, or for a merged index the shards' folders."""
    return [Path(folder) for folder in meta.get('photo_folders') or [meta['photos']]]


def data_files(meta):
    """{'vectors', 'table'[, 'index']: file name} of an index's meta."""
    return meta.get('files') or dict(FORMAT_1_FILES)


def read_index(folder):
    """An index folder's metadata, file table and embeddings; a UserError naming the folder when it is not one
    of this repo's, or is damaged."""
    folder = Path(folder)
    if not is_index(folder):
        raise UserError(f"'{folder}' is not an index of search.py (no meta.json): build it with `search.py index`")
    for attempt in range(2):  # a write may replace the files between reading meta.json and them: read again
        meta = _meta(folder)
        names = data_files(meta)
        try:
            with open(folder / names['table'], newline='', encoding='utf-8', errors='surrogateescape') as f:
                table = list(csv.DictReader(f))
            vectors = np.load(folder / names['vectors'])
            break
        except FileNotFoundError as error:
            if attempt:
                raise UserError(f"index '{folder}' is incomplete ({error.filename} is missing): run "
                                f"`search.py index` on it again") from error
        except (OSError, ValueError, UnicodeDecodeError) as error:
            raise UserError(f"index '{folder}' is damaged ({first_line(error)}): run `search.py index --rebuild` "
                            f"on it") from error
    if vectors.ndim != 2 or len(table) != len(vectors) or vectors.dtype != np.float32 or \
            vectors.shape[1] != meta['model']['emb_dim'] or any(set(TABLE_COLUMNS) - set(row) for row in table[:1]):
        raise UserError(f"index '{folder}' is damaged ({names['vectors']} and {names['table']} do not match): run "
                        f"`search.py index --rebuild` on it")
    return meta, table, vectors


def write_index(folder, meta, table, vectors, index=None):
    """Write an index into `folder` (the caller holds its lock): its data files under new names, then meta.json
    naming them, then the data files of the index it replaces are deleted. Only files this repo wrote are ever
    deleted: those the old meta.json names, and those a killed write listed in its journal."""
    import faiss
    folder = Path(folder)
    finish_killed_write(folder)
    old = owned_data_files(folder)
    stamp = uuid.uuid4().hex[:12]
    names = {'vectors': f'vectors-{stamp}.npy', 'table': f'files-{stamp}.csv'}
    writes = [(folder / names['vectors'], lambda tmp: _save_npy(tmp, vectors)),
              (folder / names['table'], lambda tmp: _write_table(tmp, table))]
    if index is not None:
        names['index'] = f'index-{stamp}.faiss'
        writes.append((folder / names['index'], lambda tmp: faiss.write_index(index, tmp)))
    atomic_write(folder / JOURNAL, lambda tmp: Path(tmp).write_text(json.dumps(sorted(names.values()))))
    save_together(writes)
    try:
        atomic_write(folder / 'meta.json', lambda tmp: Path(tmp).write_text(json.dumps({**meta, 'files': names},
                                                                                      indent=1)))
    except UserError:
        finish_killed_write(folder)
        raise
    for name in set(old) - set(names.values()):
        (folder / name).unlink(missing_ok=True)
    (folder / JOURNAL).unlink(missing_ok=True)


def owned_data_files(folder):
    """The data files the index in `folder` names (none when its meta.json is damaged: nothing is deleted)."""
    try:
        return list(data_files(_meta(folder)).values()) if is_index(folder) else []
    except UserError:
        return []


def finish_killed_write(folder):
    """Delete the data files a killed write listed in its journal that no meta.json names, then the journal."""
    journal = Path(folder) / JOURNAL
    if not journal.is_file():
        return
    try:
        written = json.loads(journal.read_text())
    except (OSError, ValueError):
        written = []
    kept = set(owned_data_files(folder))
    for name in written if isinstance(written, list) else []:
        if isinstance(name, str) and DATA_FILE.fullmatch(name) and name not in kept:
            (Path(folder) / name).unlink(missing_ok=True)
    journal.unlink(missing_ok=True)


def _save_npy(path, array):
    with open(path, 'wb') as f:  # a file object: np.save would add .npy to a name
        np.save(f, array)


def _write_table(path, table):
    with open(path, 'w', newline='', encoding='utf-8', errors='surrogateescape') as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows({'row': i, **row} for i, row in enumerate(table))


def build_faiss(vectors, kind):
    """A FAISS inner-product index over unit vectors for an approximate kind (IVF or HNSW); None for the exact
    kind, and for fewer than 1000 vectors (too few to train one), which are searched exactly."""
    import faiss
    dim = vectors.shape[1]
    if kind == 'flat' or len(vectors) < 1000:
        return None
    if kind == 'ivf':
        # sqrt(N) lists, trained on 64 vectors a list: minutes, not hours, at 1M on a laptop
        lists = int(min(np.sqrt(len(vectors)), len(vectors) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(0).choice(len(vectors), min(len(vectors), 64 * lists), replace=False)]
        index.train(sample)
    else:
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
    index.add(vectors)
    return index


# ----------------------------------------------------------------------------------------------- query

def tune(index, nprobe=32, ef_search=128):
    """The search-time settings of an approximate index (more: slower, higher recall)."""
    if hasattr(index, 'nprobe'):
        index.nprobe = nprobe
    elif hasattr(index, 'hnsw'):
        index.hnsw.efSearch = ef_search
    return index


class Searcher:
    """An index with the model it was built with: the top photos for a sketch image (its `gallery`)."""

    def __init__(self, index, data_base=None, device='cpu', nprobe=32, ef_search=128, runtime='torch', precision='fp32'):
        import faiss
        self.folder = Path(index)
        self.meta, self.table, self.vectors = read_index(self.folder)
        data_base = data_base or self.meta['checkpoint']
        self.model, checkpoint = load_model(data_base, device, runtime, precision=precision)
        if model_identity(checkpoint) != self.meta['model']:
            raise UserError(f"'{data_base}' is not the model index '{self.folder}' was built with "
                            f"({self.meta['checkpoint']}): query it with that model, or build the index again")
        self.device, self.photos, self.photo_folders = device, Path(self.meta['photos']), photo_folders(self.meta)
        self.classes = {Path(row['path']).parent.name for row in self.table}
        self.embed_sketch(Image.new('RGB', (8, 8), 'white'))  # warm up, so that timings are of steady state
        index = None
        if self.meta['kind'] != 'flat':
            path = self.folder / data_files(self.meta)['index']
            try:
                index = tune(faiss.read_index(str(path)), nprobe, ef_search)
            except RuntimeError as error:
                raise UserError(f"index '{self.folder}': '{path.name}' is missing or not a FAISS index: run "
                                f"`search.py index` on it again (it reuses the embeddings)") from error
            if index.ntotal != len(self.table):
                raise UserError(f"index '{self.folder}': '{path.name}' holds {index.ntotal} rows, not "
                                f"{len(self.table)}: run `search.py index` on it again (it reuses the embeddings)")
        # a photo's class is its folder's name
        self.gallery = Gallery(torch.from_numpy(self.vectors), [self.photos / row['path'] for row in self.table],
                               [Path(row['path']).parent.name for row in self.table], index)

    def embed_sketch(self, image):
        """A query's embedding from a PIL image or an image file."""
        size, interpolation = self.meta['model']['img_size'], self.model.interpolation
        tensor = (load_image(image, size, interpolation) if isinstance(image, (str, Path))
                  else image_tensor(to_rgb8(image), size, interpolation))
        return embed_as(self.model, tensor[None], SKETCH, self.device)[0]
