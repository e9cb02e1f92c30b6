"""The image cache of `prepare.py cache` (docs/speed.md): every image of a split decoded and resized once into
one memory-mapped .npy file, read by train.py --cache instead of the image files. One cache per split, size and
resize filter; its index records each image's path, size and modification time, so a changed image is noticed.
"""
import errno
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from utils import describe_split, scan_split
from zs_sbir.cli import DataError, UserError, check_workers, first_line
from zs_sbir.images import load_image
from zs_sbir.processes import map_in_processes
from zs_sbir.safe_files import UMASK, acquire_lock, atomic_write, check_writable_dir, remove_stale_temporaries

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

    def __init__(self, data_root, data_name, split_name, split, size, method, interpolation):
        self.path = cache_path(data_root, data_name, split_name, size, interpolation)
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



def reserve_blocks(path):
    """Allocate the whole file on disk now: a memory map written into a sparse file on a full disk gets SIGBUS
    (the process dies), where this raises OSError (no space left) before any image is decoded."""
    if not hasattr(os, 'posix_fallocate'):  # macOS, Windows: the map is written as before
        return
    with open(path, 'r+b') as file:
        try:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # no fallocate there: as before
                raise


def _fill(task):
    array_path, root, paths, start, size, interpolation = task
    array = np.load(array_path, mmap_mode='r+')
    for offset, path in enumerate(paths):
        array[start + offset] = load_image(Path(root) / path, size, interpolation).numpy()
    array.flush()
    return len(paths)


def build_cache(data_root, data_name, size, interpolation, workers=os.cpu_count()):
    """Write cache/<split>_<size>_<interpolation>.npy and .json for train and val; returns their paths.

    The index records every image's path, size and modification time, so a changed image is noticed.
    """
    if not 32 <= size <= 2048 or size % 4:
        raise UserError(f'--img_size must be a multiple of 4 from 32 to 2048 (as train.py takes), got {size}')
    check_workers(workers, minimum=1)
    written = []
    folder = cache_path(data_root, data_name, 'train', size, interpolation).parent
    splits = {name: scan_split(data_root, data_name, name, min_photos=0) for name in ('train', 'val')}  # every class
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
        reserve_blocks(partial)
        chunk = 256
        tasks = [(partial, split.root, split.paths[i:i + chunk], i, size, interpolation)
                 for i in range(0, len(split), chunk)]
        with tqdm(total=len(split), desc=f'cache {split_name}', disable=None) as bar:
            for done in map_in_processes(_fill, tasks, workers, f"writing the image cache '{path}'"):
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
