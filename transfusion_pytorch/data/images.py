"""Images in: decoding, resizing and centre-cropping, aspect-ratio buckets.

- Decoding with Pillow, turned upright by its EXIF orientation (`ImageOps.exif_transpose`, as
  `datasets`' `Image` feature does) and converted to RGB (as the diffusers training scripts
  do); 16-bit and float greys are scaled to 8 bits, not clipped at 255. A file Pillow cannot read raises `UnreadableImage`, which `prepare`
  counts and reports instead of stopping.
- Square images: the shorter side is resized to the target size (bicubic, antialiased) and
  the centre cropped, the `Resize` + `CenterCrop` of diffusers' `train_text_to_image.py`.
- Buckets (`--buckets`): a set of sizes of about the same area, one per aspect ratio, each side
  a multiple of the codec's stride; an image goes to the bucket nearest its aspect ratio (in
  log ratio) and is resized to cover it and centre-cropped, which cuts off little. This is
  the aspect-ratio bucketing of NovelAI (2022) and SDXL (Podell et al., 2023,
  https://arxiv.org/abs/2307.01952, section 2.3).
- Pixels go to the model's side as `(3, h, w)` floats in [-1, 1] (`Normalize([0.5], [0.5])`).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..extras import require


class UnreadableImage(Exception):
    """An image file that cannot be decoded; the message says why."""


def decode(load: Callable[[], bytes | str | Path]) -> 'PIL.Image.Image':
    """The upright RGB image behind `load()` (bytes or a path). Any failure becomes `UnreadableImage`,
    whose message is the same from run to run (an image given as bytes is named by its size,
    not by the repr of a buffer, which holds a memory address)."""
    Image = require('PIL.Image', 'reading images')
    from PIL import ImageOps
    file = None
    try:
        source = load()
        file = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(file) as image:
            image.load()                # decode now, so that a truncated file fails here
            # the EXIF orientation of phone photos, applied as `datasets`' Image feature does
            return to_rgb(ImageOps.exif_transpose(image))
    except UnreadableImage:
        raise
    except Exception as error:         # Pillow raises many kinds (OSError, SyntaxError, DecompressionBombError, ...)
        message = str(error)
        if isinstance(file, io.BytesIO):
            message = message.replace(repr(file), f'of {len(file.getbuffer()):,} bytes')
        raise UnreadableImage(f'{type(error).__name__}: {message}') from None


# full scale of the modes Pillow's convert('RGB') would clip at 255 instead of scaling: 16-bit
# greys (PNG, TIFF; Pillow opens a 16-bit PNG as I;16 or, in older versions, I) and float greys,
# taken to lie in [0, 1] as in TIFF and in torchvision's float images
FULL_SCALE = {'I;16': 65535, 'I;16L': 65535, 'I;16B': 65535, 'I;16N': 65535, 'I': 65535, 'F': 1.}


def to_rgb(image) -> 'PIL.Image.Image':
    """`image` as 8-bit RGB; greys of more than 8 bits scaled to 8 bits, not clipped."""
    if image.mode in FULL_SCALE:
        scale = 255. / FULL_SCALE[image.mode]
        # through 32-bit floats; the conversion to L clips to [0, 255] and truncates, so + 0.5 rounds
        image = image.convert('F').point(lambda value: value * scale + 0.5).convert('L')
    return image.convert('RGB')


def cover_and_crop(image, height: int, width: int):
    """Resizes `image` so that it covers height x width, keeping its aspect ratio, then cuts the centre."""
    from PIL import Image
    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def to_tensor(image) -> Tensor:
    """PIL RGB image -> (3, h, w) float32 in [-1, 1]."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype = torch.uint8).reshape(image.height, image.width, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.


def to_uint8(pixels: Tensor) -> Tensor:
    """(..., 3, h, w) floats in [-1, 1] -> (..., h, w, 3) uint8, clipped."""
    return ((pixels.float().clamp(-1., 1.) + 1.) * 127.5).round().to(torch.uint8).movedim(-3, -1)


def make_buckets(image_size: int, stride: int, max_ratio: float = 2.) -> list[tuple[int, int]]:
    """(height, width) sizes of about image_size^2 pixels, sides multiples of `stride`, aspect
    ratios from 1 / max_ratio to max_ratio; the square one always among them."""
    if image_size % stride != 0:
        raise ValueError(f'image_size must be a multiple of the codec stride {stride}, got {image_size}')
    area, buckets = image_size * image_size, {(image_size, image_size)}
    for height in range(stride, int(image_size * math.sqrt(max_ratio)) + stride, stride):
        width = max(stride, round(area / height / stride) * stride)
        if 1 / max_ratio <= width / height <= max_ratio:
            buckets.update({(height, width), (width, height)})      # both orientations, so wide and tall fare alike
    return sorted(buckets, key = lambda hw: hw[1] / hw[0])


def nearest_bucket(buckets: list[tuple[int, int]], height: int, width: int) -> tuple[int, int]:
    ratio = math.log(width / height)
    return min(buckets, key = lambda hw: (abs(math.log(hw[1] / hw[0]) - ratio), hw))


def resize_for(image, image_size: int, buckets: list[tuple[int, int]] | None):
    """The image at its target size: the nearest bucket, or image_size x image_size."""
    height, width = nearest_bucket(buckets, image.height, image.width) if buckets else (image_size, image_size)
    return cover_and_crop(image, height, width)
