"""Rotary positions (Su et al., 2021, "RoFormer", https://arxiv.org/abs/2104.09864).

A head's channels are rotated in pairs (first half, second half), pair i by the angle
position * inv_freq[i] with inv_freq[i] = theta ** (-2 i / dim_head): the layout of the
Hugging Face Llama / Qwen checkpoints, whose weights therefore load without permutation.

`rotary_scaling` rescales the frequencies for contexts longer than pretraining:
- 'linear' divides every frequency by `factor` (position interpolation, Chen et al., 2023);
- 'llama3' divides the low frequencies by `factor`, keeps the high ones and interpolates
  smoothly in between (Llama 3.1, Grattafiori et al., 2024, https://arxiv.org/abs/2407.21783).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .losses import at_least_float32


def inverse_frequencies(dim_head: int, theta: float, scaling: dict | None = None, device: torch.device | str | None = None) -> Tensor:
    """(dim_head / 2,) float32 angular frequencies of the rotated pairs."""
    inv_freq = 1. / theta ** (torch.arange(0, dim_head, 2, dtype = torch.float32, device = device) / dim_head)
    if scaling is None:
        return inv_freq
    if scaling['type'] == 'linear':
        return inv_freq / scaling['factor']

    factor, context = scaling['factor'], scaling['original_max_position_embeddings']
    low_freq_wavelen = context / scaling['low_freq_factor']         # longer waves than this are slowed down by factor
    high_freq_wavelen = context / scaling['high_freq_factor']       # shorter ones are kept
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - scaling['low_freq_factor']) / (scaling['high_freq_factor'] - scaling['low_freq_factor'])
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


class Rotary(nn.Module):
    """The frequencies are computed where they are used, from the config, and not kept in a
    buffer: a non-persistent buffer is neither saved nor restored, so a model built on the meta
    device (`to_empty`, then `load_state_dict`, as for FSDP and large checkpoints) would hold
    uninitialised memory there. A few small operations per forward pass, once for all layers."""

    def __init__(self, dim_head: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.dim_head, self.theta, self.scaling = dim_head, theta, scaling

    def inv_freq(self, device: torch.device) -> Tensor:
        return inverse_frequencies(self.dim_head, self.theta, self.scaling, device)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(N,) positions -> cos and signed sin over the whole head, each (N, 1, dim_head):
        (cos, cos) and (-sin, sin), so that `apply_rotary` is two fused elementwise passes.
        Computed once per forward pass and shared by every layer."""
        angles = positions.float()[:, None] * self.inv_freq(positions.device)[None, :]
        cos, sin = angles.cos(), angles.sin()
        return torch.cat((cos, cos), dim = -1)[:, None], torch.cat((-sin, sin), dim = -1)[:, None]


def apply_rotary(t: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """(N, heads, dim_head): rotates the pairs (first half, second half) of each head,

        (first, second) -> (first cos - second sin, second cos + first sin)
                         = t * (cos, cos) + (second, first) * (-sin, sin)

    written as one multiply and one fused multiply-add (`roll` by half a head swaps the halves).
    Nothing of the size of t is saved for the backward pass (cos and sin are constants)."""
    t32 = at_least_float32(t)
    rotated = torch.addcmul(t32 * cos, t32.roll(t.shape[-1] // 2, dims = -1), signed_sin)
    return rotated if rotated.dtype == t.dtype else rotated.to(t.dtype)
