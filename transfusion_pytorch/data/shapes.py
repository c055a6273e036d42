"""The walk-through set: coloured shapes on a white square, captioned "a red circle at the top
left", drawn on demand (nothing downloaded), and a deterministic checker that reads shape,
colour and position back from a picture.

- 3 shapes (circle, square, triangle) x 4 colours x 4 positions (the quadrants) = 48 captions.
  Each drawing has its own size, offset within its quadrant and a slight shift of colour, from
  a seed per picture, so no two are alike.
- `write_set` writes it in each input format that `prepare` reads: a Hugging Face
  `imagefolder` (PNG files + metadata.jsonl), a `datasets` `save_to_disk` folder, parquet
  files, or webdataset tars.
- `read_drawing` is the checker: the pixels far from white are the drawing; its colour is
  the nearest of the four (by the median colour); the largest connected blob of that colour
  is the shape, whose position is the quadrant of its centre and whose kind follows from how
  much of its bounding box it fills (square 1, circle pi / 4, triangle 1 / 2).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..extras import require

SHAPES = ('circle', 'square', 'triangle')
COLOURS = {'red': (220, 40, 40), 'green': (40, 170, 60), 'blue': (40, 80, 220), 'yellow': (235, 200, 30)}
POSITIONS = ('top left', 'top right', 'bottom left', 'bottom right')
BACKGROUND = (255, 255, 255)


@dataclass(frozen = True)
class Drawing:
    shape: str
    colour: str
    position: str

    @property
    def caption(self) -> str:
        return f'a {self.colour} {self.shape} at the {self.position}'


def all_drawings() -> list[Drawing]:
    return [Drawing(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]


def parse_caption(text: str) -> Drawing | None:
    """The drawing a caption asks for, or None if it is not one of the 48 captions."""
    for drawing in all_drawings():
        if text.strip() == drawing.caption:
            return drawing
    return None


def draw(drawing: Drawing, size: int = 32, seed: int = 0):
    """One picture (a PIL RGB image) of `drawing`, varied by `seed`."""
    require('PIL', 'shapes: drawing pictures')
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    image = Image.new('RGB', (size, size), BACKGROUND)
    radius = size * rng.uniform(0.16, 0.22)
    row, col = POSITIONS.index(drawing.position) // 2, POSITIONS.index(drawing.position) % 2
    jitter = size / 4 - radius                      # the shape stays inside its quadrant
    cx = size * (0.25 + 0.5 * col) + rng.uniform(-jitter, jitter) * 0.8
    cy = size * (0.25 + 0.5 * row) + rng.uniform(-jitter, jitter) * 0.8
    colour = tuple(min(255, max(0, v + rng.randint(-25, 25))) for v in COLOURS[drawing.colour])
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    pen = ImageDraw.Draw(image)
    if drawing.shape == 'circle':
        pen.ellipse(box, fill = colour)
    elif drawing.shape == 'square':
        pen.rectangle(box, fill = colour)
    else:
        pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill = colour)
    return image


def pictures(num: int, size: int = 32, seed: int = 0):
    """(key, PIL image, caption) for `num` drawings, the captions cycling through a seeded shuffle of all 48."""
    kinds = all_drawings()
    order = list(range(len(kinds)))
    for start in range(0, num, len(kinds)):
        random.Random(seed * 7919 + start).shuffle(order)
        for offset, kind in enumerate(order[:min(len(kinds), num - start)]):
            index = start + offset
            yield f'{index:06d}', draw(kinds[kind], size, seed = seed * 1_000_003 + index), kinds[kind].caption


# the checker

@dataclass(frozen = True)
class Reading:
    shape: str | None           # None: nothing drawn, or no shape made out
    colour: str | None
    position: str | None

    def matches(self, drawing: Drawing) -> bool:
        return (self.shape, self.colour, self.position) == (drawing.shape, drawing.colour, drawing.position)


def largest_blob(mask: list[list[bool]]) -> list[tuple[int, int]]:
    """The largest 4-connected set of True cells, as (row, col) pairs (a flood fill)."""
    rows, cols = len(mask), len(mask[0])
    seen, best = [[False] * cols for _ in range(rows)], []
    for r0 in range(rows):
        for c0 in range(cols):
            if not mask[r0][c0] or seen[r0][c0]:
                continue
            blob, stack = [], [(r0, c0)]
            seen[r0][c0] = True
            while stack:
                r, c = stack.pop()
                blob.append((r, c))
                for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if 0 <= rr < rows and 0 <= cc < cols and mask[rr][cc] and not seen[rr][cc]:
                        seen[rr][cc] = True
                        stack.append((rr, cc))
            if len(blob) > len(best):
                best = blob
    return best


def read_drawing(pixels: Tensor, min_pixels: int | None = None) -> Reading:
    """Reads an (h, w, 3) uint8 picture. Deterministic; no learned parts."""
    pixels = pixels.to(torch.int32)
    height, width, _ = pixels.shape
    min_pixels = min_pixels if min_pixels is not None else max(4, height * width // 100)
    ink = (torch.tensor(BACKGROUND) - pixels).abs().sum(-1) > 120
    if int(ink.sum()) < min_pixels:
        return Reading(None, None, None)
    median = pixels[ink].median(0).values.float()
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names], dtype = torch.float32)
    colour = names[int((palette - median).norm(dim = -1).argmin())]
    # cells of that colour: nearer to it than to any other colour and to white
    distances = (torch.cat([palette, torch.tensor([BACKGROUND], dtype = torch.float32)])[:, None, None] - pixels.float()).norm(dim = -1)
    mine = (distances.argmin(0) == names.index(colour)).tolist()
    blob = largest_blob(mine)
    if len(blob) < min_pixels:
        return Reading(None, colour, None)
    rows, cols = [r for r, _ in blob], [c for _, c in blob]
    fill = len(blob) / ((max(rows) - min(rows) + 1) * (max(cols) - min(cols) + 1))
    shape = 'square' if fill > 0.89 else 'circle' if fill > 0.64 else 'triangle'
    cy, cx = (sum(rows) / len(rows) + 0.5) / height, (sum(cols) / len(cols) + 0.5) / width
    position = POSITIONS[2 * (cy >= 0.5) + (cx >= 0.5)]
    return Reading(shape, colour, position)


def match_rate(images: Tensor, captions: list[str]) -> float:
    """The share of (n, h, w, 3) uint8 pictures whose reading matches their caption."""
    hits = [read_drawing(image).matches(parse_caption(caption)) for image, caption in zip(images, captions)]
    return sum(hits) / max(1, len(hits))


# writing the set in each input format

FORMATS = ('imagefolder', 'datasets', 'parquet', 'webdataset')
MIN_SIZE = 8        # the smallest side whose drawings the checker reads (98% at 8 pixels, 33% at 4)


def png_bytes(image) -> bytes:
    import io
    buffer = io.BytesIO()
    image.save(buffer, format = 'PNG', optimize = False)
    return buffer.getvalue()


def write_set(out: str | Path, num: int = 2000, size: int = 32, seed: int = 0, format: str = 'imagefolder', per_tar: int = 500) -> Path:
    """Writes `num` captioned drawings to `out` in `format` (one of FORMATS); returns `out`."""
    if format not in FORMATS:
        raise ValueError(f'format must be one of {FORMATS}, got {format!r}')
    out = Path(out)
    out.mkdir(parents = True, exist_ok = True)
    items = list(pictures(num, size, seed))
    if format == 'imagefolder':
        (out / 'images').mkdir(exist_ok = True)
        with open(out / 'metadata.jsonl', 'w') as file:
            for key, image, caption in items:
                (out / 'images' / f'{key}.png').write_bytes(png_bytes(image))
                file.write(json.dumps(dict(file_name = f'images/{key}.png', text = caption)) + '\n')
    elif format in ('datasets', 'parquet'):
        datasets = require('datasets', f'shapes: writing the {format} format')
        features = datasets.Features(image = datasets.Image(), text = datasets.Value('string'))
        table = datasets.Dataset.from_dict(
            dict(image = [dict(bytes = png_bytes(image), path = f'{key}.png') for key, image, _ in items],
                 text = [caption for _, _, caption in items]), features = features)
        if format == 'datasets':
            table.save_to_disk(str(out))
        else:
            table.to_parquet(str(out / 'train-00000.parquet'))
    else:
        webdataset = require('webdataset', 'shapes: writing the webdataset format')
        for start in range(0, len(items), per_tar):
            with webdataset.TarWriter(str(out / f'shapes-{start // per_tar:05d}.tar')) as sink:
                for key, image, caption in items[start:start + per_tar]:
                    sink.write({'__key__': key, 'png': png_bytes(image), 'txt': caption})
    return out
