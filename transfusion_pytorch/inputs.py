"""Checking and normalising what a user passes to `Transfusion.forward`.

The contract accepts three forms:

- a list of samples, each a list of 1-d integer tensors (text) and float tensors (a modality
  of type 0) or `(modality_type, float_tensor)` tuples;
- `Int['b n']`: text alone, for language pretraining;
- `Float['b ...']`: one modality alone, with `modality_type=`.

Everything here turns them into `Sample`s (lists of `Text` and `Modality` segments with
channel-last latents) or raises an error that names the argument, the sample and element
index, what was expected and what was given. Nothing the caller passed is modified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen = True)
class Text:
    ids: Tensor             # (n,) long


@dataclass(frozen = True)
class Modality:
    modality_type: int
    latent: Tensor                              # (*shape, dim_latent), channel last, already encoded
    token_shape: tuple[int, ...] | None = None  # grid of its tokens in the sequence, when a learned
                                                # down-sampler sits before the transformer; else `shape`
    raw: Tensor | None = None                   # the modality as the user gave it, before any encoder

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latent.shape[:-1])

    @property
    def tokens_shape(self) -> tuple[int, ...]:
        return self.shape if self.token_shape is None else self.token_shape


Segment = Text | Modality
Sample = list[Segment]


@dataclass(frozen = True)
class ModalitySpec:
    """What the model knows of one modality type, as far as checking inputs goes."""
    dim_latent: int
    channel_first: bool = False
    num_dim: int | None = None          # number of axes besides the latent dim; None = any


def describe(value) -> str:
    if torch.is_tensor(value):
        return f'a {value.dtype} tensor of shape {tuple(value.shape)}'
    return f'{type(value).__name__} {value!r}'[:120]


def is_text_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_text(ids: Tensor, num_text_tokens: int, where: str, vocab_size: int | None = None) -> Tensor:
    """Integer ids in [0, num_text_tokens), or in [0, vocab_size) where structural ids are
    allowed too (prompts of `sample`)."""
    if not is_text_dtype(ids.dtype):
        raise TypeError(f'{where}: text must be an integer tensor (torch.long), got {describe(ids)}')

    ids = ids.long()

    if ids.numel() > 0:
        bound = num_text_tokens if vocab_size is None else vocab_size
        outside = (ids < 0) | (ids >= bound)
        if bool(outside.any()):
            position = tuple(int(i) for i in outside.nonzero()[0])
            position = position[0] if len(position) == 1 else position
            allowed = (f'text ids must lie in [0, num_text_tokens) = [0, {num_text_tokens})' if vocab_size is None else
                       f'ids must lie in [0, vocab size) = [0, {vocab_size}) (text ids below num_text_tokens = {num_text_tokens}, '
                       f'then the structural ids of model.vocab)')
            raise ValueError(f'{where}: {allowed}, got the id {int(ids[outside][0])} at position {position}')

    return ids


def to_channel_last(latent: Tensor, spec: ModalitySpec, modality_type: int, where: str) -> Tensor:
    """Checks an (encoded) latent against the spec of its type and returns it as (*shape, dim_latent)."""
    if latent.ndim == 0:
        raise ValueError(f'{where}: a modality of type {modality_type} needs at least a latent dim of size {spec.dim_latent}, got a scalar')

    if spec.channel_first:
        latent = latent.movedim(0, -1)

    if latent.shape[-1] != spec.dim_latent:
        axis = 'first' if spec.channel_first else 'last'
        raise ValueError(
            f'{where}: modality type {modality_type} expects latent dim {spec.dim_latent} on its {axis} axis, '
            f'got a tensor of shape {tuple(latent.shape) if not spec.channel_first else tuple(latent.movedim(-1, 0).shape)} '
            f'(text must be an integer tensor; a float tensor is a modality)'
        )

    num_dim = latent.ndim - 1
    if spec.num_dim is not None and num_dim != spec.num_dim:
        raise ValueError(
            f'{where}: modality type {modality_type} expects {spec.num_dim} axes besides the latent dim (modality_num_dim), '
            f'got {num_dim} in a tensor of shape {tuple(latent.shape)}'
        )

    if any(size == 0 for size in latent.shape[:-1]):
        raise ValueError(f'{where}: a modality must have at least one token, got the shape {tuple(latent.shape[:-1])}')

    if not torch.isfinite(latent).all():
        raise ValueError(f'{where}: modality values must be finite, got NaN or inf in a tensor of shape {tuple(latent.shape)}')

    return latent


def normalize_samples(
    modalities: list,
    num_text_tokens: int,
    specs: tuple[ModalitySpec, ...],
    encode: Callable[[int, Tensor], Tensor] | None = None,
) -> list[Sample]:
    """The list form of the contract -> `Sample`s. `encode(modality_type, raw)` turns a raw
    modality into its latent (identity when the type has no encoder)."""

    if not isinstance(modalities, (list, tuple)):
        raise TypeError(f'`modalities` must be a list of samples, an Int[b n] tensor or a Float[b ...] tensor, got {describe(modalities)}')

    if len(modalities) == 0:
        raise ValueError('`modalities`: expected at least one sample, got an empty list')

    samples = []

    for sample_index, sample in enumerate(modalities):
        try:
            samples.append(_normalize_sample(sample, sample_index, num_text_tokens, specs, encode))
        except (TypeError, ValueError) as error:
            # the error names the sample by its place in this batch; a trainer names it by its
            # place in the data (`training.data.in_the_data`)
            error.sample_index = sample_index
            raise

    return samples


def _normalize_sample(sample, sample_index: int, num_text_tokens, specs, encode) -> Sample:
    if torch.is_tensor(sample):
        sample = [sample]   # a sample given as one bare tensor

    if not isinstance(sample, (list, tuple)):
        raise TypeError(f'`modalities[{sample_index}]` must be a list of tensors and (modality_type, tensor) tuples, got {describe(sample)}')

    if len(sample) == 0:
        raise ValueError(f'`modalities[{sample_index}]` is an empty sample: expected at least one text or modality element, got an empty list')

    return _normalize_elements(sample, f'`modalities[{sample_index}]', num_text_tokens, specs, encode)


def normalize_prompt(
    prompt,
    name: str,
    num_text_tokens: int,
    specs: tuple[ModalitySpec, ...],
    encode: Callable[[int, Tensor], Tensor] | None,
    vocab_size: int,
) -> list[tuple[str, Segment]]:
    """One prompt of `sample()` -> its segments, each with how errors call it. A prompt is
    None or `[]` (no prompt), one text tensor, one `(modality_type, tensor)` tuple, or a list
    of these, where None elements stand for nothing; `name` is how errors call the prompt
    (`prompt` or `prompt[i]`). Text may be a 0-d id or one `(1, n)` row, and may hold ids up to
    `vocab_size` (the structural ids that `prompts.py` reads)."""
    if prompt is None:
        return []
    if torch.is_tensor(prompt) or isinstance(prompt, tuple):
        elements = [(f'`{name}`', prompt)]
    elif isinstance(prompt, list):
        elements = [(f'`{name}[{index}]`', element) for index, element in enumerate(prompt) if element is not None]
    else:
        raise TypeError(f'`{name}` must be None, a text tensor, a (modality_type, tensor) tuple or a list of them, got {describe(prompt)}')
    return [
        (where, _normalize_element(element, where, num_text_tokens, specs, encode, prompt_vocab_size = vocab_size))
        for where, element in elements
    ]


def _normalize_elements(sample, prefix: str, num_text_tokens, specs, encode) -> Sample:
    """The elements of one sample; `prefix` is how errors call the sample, without the closing backtick."""
    return [
        _normalize_element(element, f'{prefix}[{element_index}]`', num_text_tokens, specs, encode)
        for element_index, element in enumerate(sample)
    ]


def _normalize_element(element, where, num_text_tokens, specs, encode, prompt_vocab_size: int | None = None) -> Segment:
    """One element; `prompt_vocab_size` is set for the elements of a prompt (see `normalize_prompt`)."""
    modality_type = None

    if isinstance(element, tuple):
        if len(element) != 2 or not torch.is_tensor(element[1]):
            raise TypeError(f'{where} must be a (modality_type, tensor) tuple, got {describe(element)}')

        modality_type, element = element

        if isinstance(modality_type, Tensor) and modality_type.numel() == 1 and is_text_dtype(modality_type.dtype):
            modality_type = int(modality_type)

        if isinstance(modality_type, bool) or not isinstance(modality_type, int):
            raise TypeError(f'{where}: the modality type must be an int, got {describe(modality_type)}')

        if not 0 <= modality_type < len(specs):
            raise ValueError(f'{where}: modality type must lie in [0, {len(specs)}), got {modality_type}')

        if not element.is_floating_point():
            raise TypeError(f'{where}: a modality must be a float tensor, got {describe(element)}')

    if not torch.is_tensor(element):
        raise TypeError(f'{where} must be a tensor or a (modality_type, tensor) tuple, got {describe(element)}')

    if modality_type is None and not element.is_floating_point():
        if prompt_vocab_size is not None and (element.ndim == 0 or (element.ndim == 2 and element.shape[0] == 1)):
            element = element.reshape(-1)       # a prompt's 0-d id, or its one (1, n) row
        if element.ndim != 1:
            also = ' (in a prompt also a 0-d id or one (1, n) row)' if prompt_vocab_size is not None else ''
            raise ValueError(f'{where}: text must be a 1-d integer tensor{also}, got {describe(element)}')
        return Text(check_text(element, num_text_tokens, where, prompt_vocab_size))

    if not element.is_floating_point():
        raise TypeError(f'{where}: expected text as an integer tensor or a modality as a float tensor, got {describe(element)}')

    modality_type = 0 if modality_type is None else modality_type

    if len(specs) == 0:
        raise ValueError(f'{where}: this model has no modality types (dim_latent), got a float tensor {describe(element)}')

    if not torch.isfinite(element).all():
        raise ValueError(f'{where}: modality values must be finite, got NaN or inf in a tensor of shape {tuple(element.shape)}')

    latent = encode(modality_type, element) if encode is not None else element
    latent = to_channel_last(latent, specs[modality_type], modality_type, where)

    return Modality(modality_type, latent, raw = element)


def text_batch(text: Tensor, num_text_tokens: int) -> list[Sample]:
    """`Int['b n']` -> one text segment per row."""
    if text.ndim != 2:
        raise ValueError(f'`modalities`: text alone must be an Int[b n] tensor, got {describe(text)}')
    if text.shape[0] == 0 or text.shape[1] < 2:
        raise ValueError(f'`modalities`: text alone needs at least one row of at least 2 tokens, got the shape {tuple(text.shape)}')

    text = check_text(text, num_text_tokens, '`modalities`')
    return [[Text(row)] for row in text]


def modality_batch(
    batch: Tensor,
    modality_type: int | None,
    specs: tuple[ModalitySpec, ...],
    encode: Callable[[int, Tensor], Tensor] | None = None,
) -> list[Sample]:
    """`Float['b ...']` with `modality_type=` -> one modality per sample."""
    if modality_type is None:
        if len(specs) != 1:
            raise ValueError(f'`modality_type` must be given for a Float[b ...] batch when the model has {len(specs)} modality types')
        modality_type = 0

    if not 0 <= modality_type < len(specs):
        raise ValueError(f'`modality_type` must lie in [0, {len(specs)}), got {modality_type}')

    if batch.ndim == 0 or batch.shape[0] == 0:
        raise ValueError(f'`modalities`: expected a Float[b ...] batch with at least one sample, got {describe(batch)}')

    samples = []
    for index, element in enumerate(batch):
        where = f'`modalities[{index}]`'
        if not torch.isfinite(element).all():
            raise ValueError(f'{where}: modality values must be finite, got NaN or inf in a tensor of shape {tuple(element.shape)}')
        latent = encode(modality_type, element) if encode is not None else element
        samples.append([Modality(modality_type, to_channel_last(latent, specs[modality_type], modality_type, where), raw = element)])

    return samples
