"""The digits demo's data: scikit-learn's 8 x 8 handwritten digits (1,797 images shipped with
the package, no download) as Transfusion samples.

- Latents: an image's pixels (0..16) are scaled to [-1, 1] and cut into `patch` x `patch`
  patches, each flattened to one latent token: with the demo's `patch = 4` an image is a
  2 x 2 grid of 16-dim latents, with `patch = 2` a 4 x 4 grid of 4-dim latents (the patchify
  of ViT / DiT, here without a learned projection: the model's linear layer in projects each
  patch). `codecs.py` has this and the other ways to make latents.
- Text: a twelve-word vocabulary, the digit words 0..9 and two prompt words.
- Samples: "draw <label>" then the image (text to image), or the image then "is <label>"
  (captioning), the latter for a fraction `caption_fraction` of the samples.

The train / held-out split is fixed (stratified, seeded), so the classifier used in evaluation
and the held-out losses never see the images the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from einops import rearrange
from torch import Tensor

WORDS = [str(d) for d in range(10)] + ['draw', 'is']
DRAW, IS = WORDS.index('draw'), WORDS.index('is')
NUM_TEXT_TOKENS = len(WORDS)
IMAGE_SIZE, MAX_PIXEL = 8, 16.


def tokenize(text: str) -> Tensor:
    """'draw 3' -> tensor([10, 3]); an unknown word is an error listing the vocabulary."""
    ids = []
    for word in text.split():
        if word not in WORDS:
            raise ValueError(f'unknown word {word!r}: the digits vocabulary is {" ".join(WORDS)}')
        ids.append(WORDS.index(word))
    return torch.tensor(ids, dtype = torch.long)


def detokenize(ids) -> str:
    return ' '.join(WORDS[i] if 0 <= i < len(WORDS) else f'<{i}>' for i in torch.as_tensor(ids).tolist())


# images <-> latents

def normalize(pixels: Tensor) -> Tensor:
    """pixels in [0, 16] -> [-1, 1]"""
    return pixels / (MAX_PIXEL / 2) - 1.


def denormalize(values: Tensor) -> Tensor:
    """[-1, 1] -> pixels in [0, 16], clipped"""
    return ((values + 1.) * (MAX_PIXEL / 2)).clamp(0., MAX_PIXEL)


def patchify(images: Tensor, patch: int = 2) -> Tensor:
    """(..., 8, 8) images -> (..., 8 / patch, 8 / patch, patch * patch) latents, row-major within a patch."""
    return rearrange(images, '... (h p1) (w p2) -> ... h w (p1 p2)', p1 = patch, p2 = patch)


def unpatchify(latents: Tensor, patch: int = 2) -> Tensor:
    """The inverse of `patchify`."""
    return rearrange(latents, '... h w (p1 p2) -> ... (h p1) (w p2)', p1 = patch, p2 = patch)


def grid_shape(patch: int) -> tuple[int, int]:
    if IMAGE_SIZE % patch != 0:
        raise ValueError(f'patch must divide the image size {IMAGE_SIZE}, got {patch}')
    return (IMAGE_SIZE // patch,) * 2


# the data set

@dataclass
class Split:
    images: Tensor          # (n, 8, 8) pixels in [0, 16]
    labels: Tensor          # (n,)


@lru_cache(maxsize = 4)
def load_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """(train, held out): the 1,797 digits, split stratified by label with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype = torch.float32)
    labels = torch.tensor(digits.target, dtype = torch.long)
    train_index, test_index = train_test_split(
        torch.arange(len(labels)).numpy(), test_size = test_fraction, random_state = seed, stratify = labels.numpy())
    train_index, test_index = torch.as_tensor(train_index), torch.as_tensor(test_index)
    return Split(images[train_index], labels[train_index]), Split(images[test_index], labels[test_index])


def text_to_image_sample(latent: Tensor, label: int) -> list:
    return [torch.tensor([DRAW, label]), latent]


def caption_sample(latent: Tensor, label: int) -> list:
    return [latent, torch.tensor([IS, label])]


class DigitsDataset:
    """Every image once as "draw <label>, image", and a seeded subset of them again as
    "image, is <label>", so that `caption_fraction` of the samples are captioning."""

    def __init__(self, latents: Tensor, labels: Tensor, caption_fraction: float = 0.3, seed: int = 0, num_tokens_fn = None):
        if not 0. <= caption_fraction < 1.:
            raise ValueError(f'caption_fraction must be in [0, 1), got {caption_fraction}')
        self.latents = latents          # (n, *latent), as a codec (codecs.py) makes them
        self.labels = labels.tolist()
        n = len(self.labels)
        num_captions = round(n * caption_fraction / (1. - caption_fraction))
        order = torch.randperm(n, generator = torch.Generator().manual_seed(seed)).tolist()
        extra = [order[i % n] for i in range(num_captions)]
        self.items = [(i, False) for i in range(n)] + [(i, True) for i in extra]
        self.num_tokens_fn = num_tokens_fn
        self._lengths = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> list:
        i, is_caption = self.items[index]
        make = caption_sample if is_caption else text_to_image_sample
        return make(self.latents[i], self.labels[i])

    def num_tokens(self, index: int) -> int:
        """Every sample of a kind has the same length: packed once per kind."""
        if self.num_tokens_fn is None:
            raise AttributeError('num_tokens needs num_tokens_fn')
        kind = self.items[index][1]
        if kind not in self._lengths:
            self._lengths[kind] = self.num_tokens_fn(self[index])
        return self._lengths[kind]
