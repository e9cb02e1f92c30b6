"""Safe file writing shared by every command: whole files or nothing (staged writes renamed into place),
one writer at a time (lock files), and outputs marked so that a command replaces only what this repo wrote."""
import csv
import glob
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from zs_sbir.cli import UserError, first_line

UMASK = os.umask(0)
os.umask(UMASK)


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
            os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; give the file normal permissions
    except BaseException as error:  # Ctrl-C too: no temporary file is left behind
        _remove(staged)
        if not isinstance(error, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
            raise
        free = shutil.disk_usage(path.parent).free / 2 ** 20 if path.parent.exists() else 0
        reason = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
        raise UserError(f"could not write '{path}' ({reason}; {free:.0f} MB free there): the files being "
                        f"saved were left as they were") from error
    for i, (tmp, path) in enumerate(staged):
        try:
            os.replace(tmp, path)
        except OSError as error:  # e.g. a folder of that name: the files not yet renamed stay as they were
            _remove(staged[i:])
            raise UserError(f"could not write '{path}' ({error.strerror}): move what is there away") from error


def _remove(staged):
    for tmp, _ in staged:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def acquire_lock(path, what, wait=0, hint='wait for it, or choose another output'):
    """Own `what` through the lock file `path` while this process runs; returns the release function.

    The lock is the kernel's (flock), so it ends with its process however that ends (killed, crashed): a
    stale lock file never blocks anyone. A second process is refused with a message naming the first,
    or with `wait` (seconds) waits that long for it.
    """
    import fcntl
    path = Path(path)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            raise UserError(f"{what} is being written by another process ({holder}): {hint}") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked while this process waited for it
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                             'started': time.strftime('%Y-%m-%d %H:%M:%S')}).encode())

    def release():
        path.unlink(missing_ok=True)  # while still locked: a waiting process then finds a new file
        os.close(fd)
    return release


@contextmanager
def writing_into(folder, what='--save_root', lock='.zs-sbir-writing.lock'):
    """Hold `folder` (created if need be) while this process writes into it: a second writer is refused. A
    folder this call created is removed again if nothing was written into it."""
    folder = Path(folder)
    check_writable_dir(folder, what)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    release = acquire_lock(folder / lock, f"{what} '{folder}'", hint=f'wait for it, or choose another {what}')
    try:
        yield folder
    finally:
        release()
        if created and not any(folder.iterdir()):
            folder.rmdir()


def _lock_holder(fd):
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {holder['pid']} on {holder['host']}, since {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return 'it is starting'


# ----------------------------------------------------------------------------------------------
# Folders a command builds (a dataset, an index) are made beside their place and swapped in whole

def remove_stale_staging(out):
    """Folders that a killed build of `out` left beside it (marked ones only; call while holding its lock)."""
    out = Path(out)
    for path in out.parent.glob(f'.{glob.escape(out.name)}.*'):
        if path.suffix in ('.partial', '.old') and path.is_dir() and not path.is_symlink() and \
                (path / FOLDER_MARK).is_file():
            shutil.rmtree(path)


def staging_folder(out):
    """A new, empty, marked folder beside `out` to build its replacement in (a name of its own: nothing of
    the user's is ever in the way)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.', suffix='.partial'))
    os.chmod(path, 0o777 & ~UMASK)  # mkdtemp makes 0700; the dataset gets normal permissions
    (path / FOLDER_MARK).touch()
    return path


def swap_in(built, out):
    """Put the complete folder `built` at `out`, replacing the folder there (which the caller checked is this
    repo's): at every moment `out` is the old folder or the new one, never a mix."""
    out = Path(out)
    if out.exists():
        aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.', suffix='.old'))
        os.rename(out, aside)  # onto the empty folder mkdtemp made
        os.rename(built, out)
        shutil.rmtree(aside)
    else:
        os.rename(built, out)


def check_folder_replaceable(out, overwrite, sources=()):
    """An output folder that is free, or (with `overwrite`) one this repo made with no source inside it;
    a UserError saying why otherwise. Checked before any work starts."""
    out = Path(out)
    for source in sources:
        if Path(source).resolve().is_relative_to(out.resolve()) and out.exists():
            raise UserError(f"'{source}' lies inside the output folder '{out}', which would be replaced: move it out, "
                            f"or choose another output (nothing was written)")
    if out.is_symlink():
        raise UserError(f"the output folder '{out}' is a symbolic link: remove the link, or choose another output "
                        f"(nothing was written)")
    if out.exists() and not overwrite:
        raise UserError(f"'{out}' already exists: remove it, pass --overwrite, or choose another output")
    if out.exists() and not (out.is_dir() and (out / FOLDER_MARK).is_file()):
        raise UserError(f"'{out}' was not made by this repo (it has no {FOLDER_MARK} file), so --overwrite does not "
                        f"replace it: delete it yourself, or choose another output (nothing was written)")


# ----------------------------------------------------------------------------------------------
# Outputs are marked (a PNG text chunk, a file in a folder this repo made), so that a command replaces its
# own earlier output and nothing else.

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
    if path.is_symlink() and not path.exists():
        raise UserError(f"'{path}' is a link to nothing, which this repo does not replace: {hint} (nothing was "
                        f"written)")
    if path.exists() and not written_by_this_repo(path):
        kind = 'folder' if path.is_dir() else 'file'
        raise UserError(f"{kind} '{path}' exists and was not written by this repo: {hint} (nothing was written)")


def make_output_folder(folder):
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / FOLDER_MARK).touch()


def csv_writer(rows):
    """write(path) for a list of dicts as CSV, columns in first-seen order (for atomic_write/save_together)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(path):
        with open(path, 'w', newline='', encoding='utf-8', errors='surrogateescape') as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return write


def write_csv(rows, path):
    """Write a list of dicts as CSV (columns in first-seen order), atomically."""
    atomic_write(path, csv_writer(rows))


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))

def unique_stems(files):
    used, stems = set(), []
    for path in files:
        stem = path.stem
        while stem in used:
            stem += '_'
        used.add(stem)
        stems.append(stem)
    return stems



def check_outside(save_root, protected):
    """--save_root may not lie inside a `protected` folder ([(description, folder)]): what is written there would
    become one of its images."""
    for what, folder in protected:
        if folder is not None and Path(save_root).resolve().is_relative_to(Path(folder).resolve()):
            raise UserError(f"--save_root '{save_root}' is inside {what} '{folder}': pictures written there would "
                            f"become its images; choose another --save_root")


def plan_outputs(files, save_root, protected, outputs):
    """[(input file, its output paths)], each named by outputs(save_root, stem) with the file's stem made
    unique (two cat.png from two folders: cat, cat_), every output checked before anything is written:
    --save_root may not lie inside a `protected` folder ([(description, folder)]: what is written there would
    become one of its images), no output may be or hold an input, and an existing output must be this repo's."""
    save_root = Path(save_root)
    check_writable_dir(save_root, '--save_root')
    check_outside(save_root, protected)
    inputs, plan = [Path(p).resolve() for p in files], []
    for path, stem in zip(files, unique_stems(files)):
        targets = outputs(save_root, stem)
        for target in targets:
            if any(q == target.resolve() or q.is_relative_to(target.resolve()) for q in inputs):
                raise UserError(f"'{target}' is (or holds) a query image, which would be overwritten: choose another "
                                f"--save_root")
            check_replaceable(target)
        plan.append((path, targets))
    return plan
