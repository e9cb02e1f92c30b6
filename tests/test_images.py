"""Reading images: every mode Pillow opens becomes the right 8-bit RGB (16-bit and float scaled from their
range), damaged files of every format are refused by name, and folders are walked through links."""
import io
import os

import numpy as np
import pytest
from PIL import BlpImagePlugin, Image

from zs_sbir.cli import DataError, UserError
from zs_sbir.images import load_image, query_files, read_rgb, to_rgb8, walk_image_files

RED = (200, 30, 40)


@pytest.mark.parametrize('mode', ['RGB', 'RGBA', 'RGBX', 'RGBa', 'CMYK', 'YCbCr', 'LAB', 'HSV', 'P'])
def test_colour_modes_give_the_colour(mode):
    rgb = Image.new('RGB', (6, 5), RED)
    image = rgb.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == 'P' else rgb.convert(mode)
    assert np.abs(np.asarray(to_rgb8(image), dtype=int) - RED).max() <= 3, mode


@pytest.mark.parametrize('mode', ['1', 'L', 'LA', 'La', 'PA', 'I', 'F', 'I;16', 'I;16B', 'I;16L'])
def test_grey_modes_give_the_grey(mode):
    grey = 255 if mode == '1' else 90
    if mode.startswith('I;16'):  # 16 bits a pixel, in either byte order
        pixels = np.full((5, 6), grey * 257, '>u2' if mode.endswith('B') else '<u2')
        image = Image.frombytes(mode, (6, 5), pixels.tobytes())
    elif mode == 'La':  # Pillow converts to premultiplied alpha only from LA
        image = Image.new('LA', (6, 5), (grey, 255)).convert(mode)
    else:
        image = Image.new('L', (6, 5), grey).convert(mode)
    assert np.array_equal(np.asarray(to_rgb8(image)), np.full((5, 6, 3), grey, np.uint8)), mode


def test_sixteen_bit_and_float_images_are_scaled_from_their_range(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / 'g16.png')
    assert Image.open(tmp_path / 'g16.png').mode == 'I;16'
    expected = np.rint(ramp / 65535 * 255).astype(np.uint8)  # not all white, as a plain convert gives
    assert np.array_equal(np.asarray(read_rgb(tmp_path / 'g16.png'))[..., 0], expected)
    floats = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(floats, 'F').save(tmp_path / 'f.tif')
    assert np.array_equal(np.asarray(read_rgb(tmp_path / 'f.tif'))[..., 1], np.rint(floats * 255).astype(np.uint8))
    Image.fromarray(floats * 255, 'F').save(tmp_path / 'f255.tif')  # floats already on the 8-bit scale
    assert np.array_equal(np.asarray(read_rgb(tmp_path / 'f255.tif'))[..., 2], np.rint(floats * 255).astype(np.uint8))
    wide = ramp.astype(np.int32) * 4  # beyond 16 bits: no range to take it from
    Image.fromarray(wide).save(tmp_path / 'i32.tif')
    with pytest.raises(DataError, match=r"cannot read image '.*i32.tif': I image with values up to 262080"):
        read_rgb(tmp_path / 'i32.tif')
    Image.fromarray(floats - 0.5, 'F').save(tmp_path / 'negative.tif')
    with pytest.raises(DataError, match=r"negative.tif': F image with values from -0.5"):
        load_image(tmp_path / 'negative.tif', 8)


def test_transparency_becomes_white():
    sketch = Image.new('RGBA', (4, 4), (0, 0, 0, 0))
    sketch.putpixel((1, 1), (10, 10, 10, 255))
    pixels = np.asarray(to_rgb8(sketch))
    assert pixels[1, 1].tolist() == [10, 10, 10] and pixels[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG', 'GIF', 'BMP', 'TIFF', 'WEBP', 'PPM', 'AVIF', 'QOI'])
def test_every_format_reads_and_its_damaged_file_is_refused_by_name(tmp_path, fmt):
    path = tmp_path / f'image.{fmt.lower()}'
    buffer = io.BytesIO()
    Image.new('RGB', (32, 32), RED).save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    assert np.abs(np.asarray(read_rgb(path), dtype=int) - RED).max() <= 12
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])  # truncated
    with pytest.raises(DataError, match=f"cannot read image '.*image.{fmt.lower()}'"):
        read_rgb(path)
    path.write_bytes(b'\x00' * 64)
    with pytest.raises(DataError, match='cannot read image'):
        read_rgb(path)


def test_walking_follows_links_once_and_reports_what_it_cannot_enter(tmp_path):
    Image.new('RGB', (4, 4)).save(tmp_path / 'elsewhere.png')
    root = tmp_path / 'root'
    (root / 'a').mkdir(parents=True)
    Image.new('RGB', (4, 4)).save(root / 'a' / 'x.png')
    (root / 'b').symlink_to(root / 'a')  # the same folder again
    (root / 'a' / 'up').symlink_to(root)  # a loop
    (root / 'link.png').symlink_to(tmp_path / 'elsewhere.png')
    (root / 'gone.png').symlink_to(tmp_path / 'nothing.png')
    (root / '.git').mkdir()
    Image.new('RGB', (4, 4)).save(root / '.git' / 'hidden.png')
    files, skipped = walk_image_files(root)
    assert [str(p) for p in files] == ['a/x.png', 'link.png']
    assert skipped == [(root / 'gone.png', 'is a link to nothing')]
    with pytest.raises(UserError, match=r"query folder '.*root': '.*gone.png' is a link to nothing"):
        query_files([str(root)])
    (root / 'gone.png').unlink()
    assert query_files([str(root)]) == [root / 'a' / 'x.png', root / 'link.png']
    with pytest.raises(UserError, match="query folder '.*empty' holds no image"):
        os.mkdir(tmp_path / 'empty')
        query_files([str(tmp_path / 'empty')])


@pytest.mark.parametrize('error', [RuntimeError('AVIF decode failed'), IndexError('QOI index out of range'),
                                   BlpImagePlugin.BLPFormatError('Unsupported BLP compression'), MemoryError()])
def test_whatever_a_decoder_raises_is_an_unreadable_file(tmp_path, monkeypatch, error):
    """Pillow's plugins raise more than OSError: RuntimeError (AVIF), BLPFormatError, IndexError (QOI) for damaged
    files. Every one means the file, named, is unreadable; never a traceback."""
    path = tmp_path / 'damaged.png'
    Image.new('RGB', (8, 8), RED).save(path)

    def broken(*args, **kwargs):
        raise error
    monkeypatch.setattr(Image.Image, 'load', broken)
    with pytest.raises(DataError, match="cannot read image '.*damaged.png'"):
        read_rgb(path)
