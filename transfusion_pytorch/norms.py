"""RMSNorm with an optional unit offset: the stored gain g is used as (g + 1) and starts at 0,
so weight decay pulls a norm towards the identity rather than towards zero (Rubin, 2024,
"Exploring weight decay in layer normalization")."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.RMSNorm):
    def __init__(self, dim: int, unit_offset: bool = True):
        super().__init__(dim)
        self.unit_offset = unit_offset
        if unit_offset:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        gain = self.weight + 1. if self.unit_offset else self.weight
        return F.rms_norm(x, self.normalized_shape, gain, self.eps)
