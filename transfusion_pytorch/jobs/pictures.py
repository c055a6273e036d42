"""Sample grids as PNG files, with Pillow only: pictures tiled in rows, a label left of each row."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..data.images import to_uint8
from ..extras import require


def save_image_grid(pixels: Tensor, path: str | Path, row_labels: list[str] | None = None, title: str | None = None,
                    min_side: int = 64) -> Path:
    """(rows, cols, 3, h, w) pixels in [-1, 1] -> one PNG, each picture enlarged (nearest
    neighbour) to at least `min_side` pixels, a 2-pixel white gap between pictures."""
    require('PIL', 'writing a grid of pictures')
    from PIL import Image, ImageDraw, ImageFont
    rows, cols, _, height, width = pixels.shape
    scale = max(1, -(-min_side // min(height, width)))
    cell_h, cell_w, gap = height * scale, width * scale, 2
    font = ImageFont.load_default()
    pen = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    label_w = max((pen.textlength(label, font = font) for label in row_labels), default = 0) + 8 if row_labels else 0
    title_h = 16 if title else 0
    canvas = Image.new('RGB', (int(label_w) + cols * (cell_w + gap), title_h + rows * (cell_h + gap)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 2), title, fill = (0, 0, 0), font = font)
    images = to_uint8(pixels)                       # (rows, cols, h, w, 3)
    for r in range(rows):
        top = title_h + r * (cell_h + gap)
        if row_labels:
            draw.text((2, top + cell_h // 2 - 6), row_labels[r], fill = (0, 0, 0), font = font)
        for c in range(cols):
            tile = Image.frombytes('RGB', (width, height), bytes(images[r, c].flatten().tolist())).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (int(label_w) + c * (cell_w + gap), top))
    path = Path(path)
    path.parent.mkdir(parents = True, exist_ok = True)
    tmp = path.with_name(f'.{path.name}.tmp')
    canvas.save(tmp, format = 'PNG')
    tmp.replace(path)
    return path

