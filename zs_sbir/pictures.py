"""Pictures the commands write: test.py's and search.py's retrieval rows, plot.py's sheets, attention heatmaps.
Every PNG is saved marked as this repo's (safe_files.written_by_this_repo), atomically."""
import torch
from PIL import Image, ImageDraw, ImageOps

from zs_sbir.safe_files import OUTPUT_MARK, atomic_write

def save_png(image, path):
    """Save a PIL image as a marked PNG, atomically."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text('Software', OUTPUT_MARK)
    atomic_write(path, lambda tmp: image.save(tmp, format='PNG', pnginfo=info))


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



SHEET_TILE = 96


def sheet(rows, header):
    """A grid of equal tiles: rows of PIL images under a line of column titles."""
    canvas = Image.new('RGB', (len(header) * (SHEET_TILE + 4) + 4, 18 + len(rows) * (SHEET_TILE + 4) + 4), 'white')
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(header):
        draw.text((4 + j * (SHEET_TILE + 4), 3), title, fill='black')
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            canvas.paste(ImageOps.fit(image.convert('RGB'), (SHEET_TILE, SHEET_TILE)), (4 + j * (SHEET_TILE + 4), 18 + i * (SHEET_TILE + 4)))
    return canvas

