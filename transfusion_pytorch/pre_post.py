"""Learned down / up blocks around the transformer for one modality type: the paper's U-Net
patch encoder and decoder (Zhou et al., 2024, section 3), e.g. a strided `Conv2d` in and a
`ConvTranspose2d` out. They replace the linear projections in and out of that type.

The encoder takes a noised latent with a batch dim in the user's layout, `(1, dim_latent,
*shape)` with `channel_first_latent` and `(1, *shape, dim_latent)` otherwise, and returns
`(1, dim, *token_shape)` (or `(1, *token_shape, dim)`): the tokens the transformer sees. The
decoder maps back to the latent's shape. The sequence carries `prod(token_shape)` tokens for
the modality, while its shape tokens still announce the latent's `shape`.
"""

from __future__ import annotations

import math
from itertools import chain

import torch
from torch import Tensor, nn

# a block that cannot run on the meta device (it reads values, or holds tensors outside its
# parameters and buffers) is probed for real, on zeros, up to this many latent values
REAL_PROBE_LIMIT = 2 ** 24
PROBE_CACHE_SIZE = 1024         # shapes remembered per type (the oldest is dropped past it)
TOO_LARGE = 'it cannot be probed on the meta device, and is too large to probe for real'


def pairs_per_type(value, num_types: int) -> tuple:
    """`pre_post_transformer_enc_dec` as given -> one (encoder, decoder) pair or None per type."""
    is_pair = lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(m, nn.Module) for m in v)
    if value is None:
        return (None,) * num_types
    if is_pair(value) and num_types == 1:
        return (tuple(value),)
    if isinstance(value, (tuple, list)) and len(value) == num_types and all(v is None or is_pair(v) for v in value):
        return tuple(None if v is None else tuple(v) for v in value)
    raise ValueError(
        f'pre_post_transformer_enc_dec must be an (encoder, decoder) pair of modules for a model with one modality type, '
        f'or a tuple of {num_types} such pairs or None (one per type), got {value!r}'[:400]
    )


class PrePost(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, dim_latent: int, dim: int, channel_first: bool, modality_type: int):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.dim_latent, self.dim, self.channel_first = dim_latent, dim, channel_first
        self.modality_type = modality_type
        self._probes: dict[tuple[int, ...], tuple] = {}        # shape -> (token shape, restored shape), each a tuple or why not

    @classmethod
    def per_type(cls, value, config) -> nn.ModuleList:
        dim = config.transformer.dim
        pairs = pairs_per_type(value, config.num_modality_types)
        return nn.ModuleList([
            nn.Identity() if pair is None else cls(pair[0], pair[1], config.dim_latent[m], dim, config.channel_first_latent[m], m)
            for m, pair in enumerate(pairs)
        ])

    def to_user_layout(self, t: Tensor) -> Tensor:
        """(*grid, channels) -> (1, channels, *grid) or (1, *grid, channels)"""
        return (t.movedim(-1, 0) if self.channel_first else t)[None]

    def from_user_layout(self, t: Tensor) -> Tensor:
        """(1, channels, *grid) or (1, *grid, channels) -> (*grid, channels)"""
        return t[0].movedim(0, -1) if self.channel_first else t[0]

    def token_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The grid of tokens that the down block makes of a latent of `shape`."""
        token_shape, _ = self.probe(tuple(shape), real_limit = math.inf)   # for a latent that exists, a real probe costs no more
        if isinstance(token_shape, str):
            raise ValueError(f'the pre-transformer encoder of modality type {self.modality_type} fails on a latent of shape '
                             f'{tuple(shape)}: {token_shape}')
        return token_shape

    def round_trip_problem(self, shape: tuple[int, ...]) -> str | None:
        """None when the down and up blocks take a latent of `shape` there and back; else why not."""
        token_shape, restored = self.probe(tuple(shape), real_limit = REAL_PROBE_LIMIT)
        if isinstance(token_shape, str):
            return f'its down block fails on it ({token_shape})'
        if isinstance(restored, str):
            return f'its up block fails on its tokens of shape {token_shape} ({restored})'
        if restored != (*shape, self.dim_latent):
            return f'its up block restores its tokens of shape {token_shape} as {restored[:-1]}'
        return None

    def probe(self, shape: tuple[int, ...], real_limit: float) -> tuple:
        """(token shape, restored (*shape, dim_latent) channel last) of a latent of `shape`,
        each a tuple or, where its block fails, the error's text; remembered per shape."""
        if shape in self._probes:
            return self._probes[shape]
        out = self.shape_through(self.encoder, shape, self.dim_latent, real_limit)
        if isinstance(out, tuple) and out[-1] != self.dim:
            raise ValueError(
                f'the pre-transformer encoder of modality type {self.modality_type} must output {self.dim} channels (transformer dim), '
                f'got an output of {out[-1]} channels on a grid of {out[:-1]} for a latent of shape {shape}'
            )
        result = (out, out) if isinstance(out, str) else (out[:-1], self.shape_through(self.decoder, out[:-1], self.dim, real_limit))
        if not any(isinstance(r, str) and r.startswith(TOO_LARGE) for r in result):    # that is no verdict on the shape
            if len(self._probes) >= PROBE_CACHE_SIZE:
                del self._probes[next(iter(self._probes))]
            self._probes[shape] = result
        return result

    def shape_through(self, module: nn.Module, grid: tuple[int, ...], channels: int, real_limit: float) -> tuple[int, ...] | str:
        """The (*grid', channels') shape, channel last, of what `module` makes of a (*grid,
        channels) input; the error's text where it fails."""
        try:
            return self.output_shape(module, (*grid, channels), meta = True)
        except Exception as error:      # a shape the block cannot take, or a block that cannot run on meta
            if math.prod(grid) * channels > real_limit:
                return f'{TOO_LARGE} ({type(error).__name__}: {error})'
        try:
            return self.output_shape(module, (*grid, channels), meta = False)
        except Exception as error:
            return f'{type(error).__name__}: {error}'

    def output_shape(self, module: nn.Module, shape: tuple[int, ...], meta: bool) -> tuple[int, ...]:
        """The shape, channel last, of `module`'s output for an input of `shape`, channel last.
        On the meta device nothing is allocated or computed, and the module's own tensors are
        left alone: it runs on meta copies of its parameters and buffers."""
        reference = next(chain(module.parameters(), module.buffers()), None)
        dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
        device = 'meta' if meta else (reference.device if reference is not None else None)
        x = self.to_user_layout(torch.zeros(shape, dtype = dtype, device = device))
        with torch.no_grad():
            if not meta:
                return tuple(self.from_user_layout(module(x)).shape)
            state = {name: tensor.to('meta') for name, tensor in chain(module.named_parameters(remove_duplicate = False),
                                                                       module.named_buffers(remove_duplicate = False))}
            return tuple(self.from_user_layout(torch.func.functional_call(module, state, (x,))).shape)

    def encode(self, rows: Tensor, shapes: list[tuple[int, ...]]) -> Tensor:
        """(R, dim_latent) latent rows of modalities of `shapes` -> (N, dim) tokens."""
        tokens, offset = [], 0
        for shape in shapes:
            size = math.prod(shape)
            latent = rows[offset:offset + size].reshape(*shape, self.dim_latent)
            tokens.append(self.from_user_layout(self.encoder(self.to_user_layout(latent))).reshape(-1, self.dim))
            offset += size
        return torch.cat(tokens)

    def decode(self, hidden: Tensor, shapes: list[tuple[int, ...]]) -> Tensor:
        """(N, dim) hidden states of modalities of `shapes` -> (R, dim_latent) output rows."""
        rows, offset = [], 0
        for shape in shapes:
            token_shape = self.token_shape(shape)
            size = math.prod(token_shape)
            h = hidden[offset:offset + size].reshape(*token_shape, self.dim)
            out = self.from_user_layout(self.decoder(self.to_user_layout(h)))
            if tuple(out.shape) != (*shape, self.dim_latent):
                raise ValueError(
                    f'the post-transformer decoder of modality type {self.modality_type} must restore the latent shape '
                    f'{(*shape, self.dim_latent)} (channel last) from tokens of shape {token_shape}, got {tuple(out.shape)}'
                )
            rows.append(out.reshape(-1, self.dim_latent))
            offset += size
        return torch.cat(rows)

