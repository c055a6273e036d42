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

import torch
from torch import Tensor, nn


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
        self._token_shapes: dict[tuple[int, ...], tuple[int, ...]] = {}

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
        if shape not in self._token_shapes:
            probe = torch.zeros(*shape, self.dim_latent, device = next(self.parameters(), torch.empty(0)).device)
            with torch.no_grad():
                out = self.from_user_layout(self.encoder(self.to_user_layout(probe)))
            if out.shape[-1] != self.dim:
                raise ValueError(
                    f'the pre-transformer encoder of modality type {self.modality_type} must output {self.dim} channels (transformer dim), '
                    f'got an output of shape {tuple(self.to_user_layout(out).shape)} for a latent of shape {shape}'
                )
            self._token_shapes[shape] = tuple(out.shape[:-1])
        return self._token_shapes[shape]

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
