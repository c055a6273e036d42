"""Helpers of the data tests: a tiny random diffusers AutoencoderKL and tiny tokenizers saved
to a folder (nothing downloaded), and the walk-through set written and prepared. Each skips
the test calling it when the optional library it needs (the `data` extra) is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transfusion_pytorch.data import shapes
from transfusion_pytorch.data.prepare import PrepareConfig, prepare


def make_vae(path: Path, seed: int = 0, scaling_factor: float = 0.5, shift_factor: float = 0.1) -> Path:
    """A 2-block AutoencoderKL (downsampling 2, 4 latent channels), random weights."""
    AutoencoderKL = pytest.importorskip('diffusers').AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels = 3, out_channels = 3, latent_channels = 4, layers_per_block = 1, norm_num_groups = 4, sample_size = 16,
        down_block_types = ('DownEncoderBlock2D',) * 2, up_block_types = ('UpDecoderBlock2D',) * 2, block_out_channels = (8, 16),
        scaling_factor = scaling_factor, shift_factor = shift_factor,
    )
    vae.save_pretrained(path)
    return path


def make_tokenizer(path: Path, extra_words: tuple[str, ...] = ()) -> Path:
    """A word-level tokenizer over the walk-through captions' words (plus `extra_words`),
    wrapped as a transformers PreTrainedTokenizerFast."""
    pytest.importorskip('transformers')
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for d in shapes.all_drawings() for w in d.caption.split()} | set(extra_words))
    vocab = {'[UNK]': 0, **{w: i + 1 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token = '[UNK]'))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object = tokenizer, unk_token = '[UNK]').save_pretrained(path)
    return path


def prepared_set(root: Path, format: str = 'imagefolder', num: int = 48, size: int = 16, seed: int = 0, **options):
    """The walk-through set written in `format` under root/set, prepared into root/prepared."""
    pytest.importorskip({'datasets': 'datasets', 'parquet': 'datasets', 'webdataset': 'webdataset'}.get(format, 'PIL'))
    source = shapes.write_set(root / 'set', num, size, seed, format, per_tar = 20)
    config = dict(source = str(source), out = str(root / 'prepared'), image_size = size, shard_size = 16, progress = False)
    config.update(options)
    return prepare(PrepareConfig(**config))
