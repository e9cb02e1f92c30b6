"""Reading image files: any file Pillow opens (any mode, 8/16-bit or float) as 8-bit RGB, resized to the model's
input, and finding the image files under folders given on a command line."""
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zs_sbir.cli import DataError, UserError, first_line

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


INTERPOLATION = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC}


def is_image_file(path):
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_rgb(path):
    """Any image file Pillow opens, in any mode, as an 8-bit RGB PIL image (to_rgb8). A file that does not
    decode, or whose values cannot be brought to 8 bits, is a DataError naming it: whatever its decoder raises
    (Pillow's plugins raise OSError, ValueError, SyntaxError, and also RuntimeError for AVIF, BLPFormatError, or an
    IndexError for a cut-off QOI file)."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb8(img)
    except Exception as error:  # noqa: BLE001 (any decoder's failure is the file's)
        raise DataError(f"cannot read image '{path}': {first_line(error)}") from error


def to_rgb8(img):
    """A PIL image of any mode as 8-bit RGB: 16-bit and 32-bit integer images are scaled from their range
    (0-65535; a 32-bit image whose values fit 0-255 is taken as 8-bit), float images from [0, 1] (or kept
    when they lie in [0, 255]), and transparent pixels become white, so an RGBA sketch stays dark strokes on
    white. A ValueError when the values fit no such range (negative, NaN, or beyond 65535)."""
    if img.mode.startswith('I') or img.mode == 'F':
        values = np.asarray(img, dtype=np.float64)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if not np.isfinite(values).all() or low < 0:
            raise ValueError(f'{img.mode} image with values from {low:g} to {high:g}: not a range of pixel values')
        if img.mode == 'F':
            scale = 255 if high <= 1 else 1 if high <= 255 else None
        else:
            scale = 255 / 65535 if img.mode.startswith('I;16') or high > 255 else 1
            scale = None if high > 65535 else scale
        if scale is None:
            raise ValueError(f'{img.mode} image with values up to {high:g}: save it with 8 or 16 bits per channel')
        img = Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), 'L')
    return on_white(img)


def on_white(img):
    """A PIL image of any 8-bit mode as RGB, its transparent pixels white."""
    if img.mode in ('La', 'RGBa'):  # premultiplied alpha: undo it first
        img = img.convert('LA' if img.mode == 'La' else 'RGBA')
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        rgba = img.convert('RGBA')
        img = Image.new('RGB', rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel('A'))
    return img.convert('RGB')


def image_tensor(img, size, interpolation='bilinear'):
    """An RGB PIL image resized to a uint8 tensor of shape (3, size, size)."""
    img = img.resize((size, size), INTERPOLATION[interpolation])
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def load_image(path, size, interpolation='bilinear'):
    """Read any image file (any mode, see to_rgb8) as a uint8 RGB tensor of shape (3, size, size)."""
    return image_tensor(read_rgb(path), size, interpolation)


class FileImages:
    """Decodes and resizes image files on every access; with `skip_bad`, a file that does not decode is None
    (for the caller to list) instead of a DataError."""

    def __init__(self, root, paths, size, interpolation, skip_bad=False):
        self.root, self.paths, self.size, self.interpolation = Path(root), paths, size, interpolation
        self.skip_bad = skip_bad

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return load_image(self.root / self.paths[index], self.size, self.interpolation)
        except DataError:
            if not self.skip_bad:
                raise
            return None


def pillow_suffixes():
    """The file name suffixes of every format Pillow reads (.jpg, .png, .tif, .webp, .bmp, ...)."""
    return {suffix.lower() for suffix in Image.registered_extensions()}


def walk_image_files(root, suffixes=IMAGE_SUFFIXES):
    """(image files under `root` as sorted paths relative to it, [(path, why)] of what could not be looked into).

    Symbolic links to folders are followed, each real folder once (a link back to a parent is no loop);
    hidden files and folders (.name) are left out; a folder that cannot be listed and a link to nothing
    are reported, never skipped in silence.
    """
    root = Path(root)
    found, skipped, seen, stack = [], [], set(), [Path()]
    while stack:
        relative = stack.pop()
        folder = root / relative
        try:
            info = folder.stat()
            if (info.st_dev, info.st_ino) in seen:
                continue  # reached again through a link: its files are listed once
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            skipped.append((folder, f'cannot be read ({error.strerror or error})'))
            continue
        folders = []
        for entry in entries:
            if entry.name.startswith('.'):
                continue
            try:
                if entry.is_dir():
                    folders.append(relative / entry.name)
                elif entry.is_file():
                    if os.path.splitext(entry.name)[1].lower() in suffixes:
                        found.append(relative / entry.name)
                elif entry.is_symlink():
                    skipped.append((folder / entry.name, 'is a link to nothing'))
            except OSError as error:
                skipped.append((folder / entry.name, f'cannot be read ({error.strerror or error})'))
        stack += reversed(folders)
    return sorted(found, key=str), skipped


def query_files(names, suffixes=IMAGE_SUFFIXES):
    """Expand files and folders (recursively, see walk_image_files) into image files with one of `suffixes`;
    a missing path, an empty name or a folder without images is a UserError."""
    files = []
    for name in names:
        path = Path(name)
        if not name:
            raise UserError('a query name must not be empty')
        if path.is_dir():
            found, skipped = walk_image_files(path, suffixes)
            if skipped:
                raise UserError(f"query folder '{path}': '{skipped[0][0]}' {skipped[0][1]}")
            if not found:
                raise UserError(f"query folder '{path}' holds no image ({', '.join(sorted(suffixes)[:6])}"
                                f"{', ...' if len(suffixes) > 6 else ''})")
            files += [path / p for p in found]
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"query image not found: '{path}'")
    return files
