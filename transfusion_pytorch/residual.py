"""Hyper-connections (Zhu et al., 2024, arXiv 2409.19606) and frac-connections (Zhu et al.,
2025, arXiv 2503.14125): learned mixing of several residual streams around each branch.

The residual state of a token is (streams, dim). With fractions, each stream's dim is cut
into `fracs` pieces, so the state is seen as `rows = streams * fracs` rows of width
dim / fracs. Around one branch (attention or feed-forward):

    input fraction k   = sum_r read[r, k] * row_r                       (branch sees concat over k)
    new row_r          = sum_s mix[s, r] * row_s + sum_k write[k, r] * output fraction k

Each of read, mix and write is a static learned matrix plus a dynamic, per-token term
scale * tanh(norm(row) @ W) (the paper's dynamic hyper-connections), W starting at zero.
Static starting values make the block a plain residual one: layer l reads stream l mod
streams, mix is the identity, and the output is added to every stream. With one stream and
one fraction this is exactly `x + branch(x)`, and the transformer skips the module then.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .norms import RMSNorm


class ResidualMix(nn.Module):
    def __init__(self, dim: int, num_streams: int, num_fracs: int, layer_index: int, unit_offset_norm: bool = True):
        super().__init__()
        if dim % num_fracs != 0:
            raise ValueError(f'transformer.num_residual_fracs must divide dim {dim}, got {num_fracs}')

        self.dim, self.num_streams, self.num_fracs = dim, num_streams, num_fracs
        rows, fracs = num_streams * num_fracs, num_fracs
        self.num_rows, self.width = rows, dim // num_fracs

        read = torch.zeros(rows, fracs)
        write = torch.zeros(fracs, rows)
        reads_stream = layer_index % num_streams
        for k in range(fracs):
            read[reads_stream * fracs + k, k] = 1.
            for stream in range(num_streams):
                write[k, stream * fracs + k] = 1.

        self.static_read = nn.Parameter(read)                   # (rows, fracs)
        self.static_mix = nn.Parameter(torch.eye(rows))         # (rows, rows)
        self.static_write = nn.Parameter(write)                 # (fracs, rows)

        self.norm = RMSNorm(self.width, unit_offset = unit_offset_norm)
        self.to_dynamic = nn.Linear(self.width, fracs + rows + fracs, bias = False)
        nn.init.zeros_(self.to_dynamic.weight)
        self.dynamic_scale = nn.Parameter(torch.full((3,), 1e-2))

    def expand(self, x: Tensor) -> Tensor:
        """(N, dim) -> (N, streams, dim): every stream starts as a copy of the input."""
        return x[:, None].expand(-1, self.num_streams, -1).contiguous()

    @staticmethod
    def reduce(state: Tensor) -> Tensor:
        """(N, streams, dim) -> (N, dim)"""
        return state.sum(dim = 1)

    def read(self, state: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """(N, streams, dim) -> the branch input (N, dim), and what `write` needs."""
        n, fracs = state.shape[0], self.num_fracs
        rows = state.reshape(n, self.num_rows, self.width)                             # (N, rows, width)

        dynamic = torch.tanh(self.to_dynamic(self.norm(rows)))                          # (N, rows, 2 fracs + rows)
        d_read, d_mix, d_write = dynamic.split((fracs, self.num_rows, fracs), dim = -1)
        scale_read, scale_mix, scale_write = self.dynamic_scale.unbind()

        read = self.static_read + scale_read * d_read                                   # (N, rows, fracs)
        mix = self.static_mix + scale_mix * d_mix                                       # (N, rows, rows)
        write = self.static_write + scale_write * d_write.transpose(-1, -2)             # (N, fracs, rows)

        branch_input = torch.einsum('nrk,nrw->nkw', read, rows).reshape(n, self.dim)
        return branch_input, (rows, mix, write)

    def write(self, saved: tuple[Tensor, Tensor, Tensor], output: Tensor) -> Tensor:
        """Branch output (N, dim) -> the new state (N, streams, dim)."""
        rows, mix, write = saved
        n = rows.shape[0]
        output = output.view(n, self.num_fracs, self.width)
        new_rows = torch.einsum('nsr,nsw->nrw', mix, rows) + torch.einsum('nkr,nkw->nrw', write, output)
        return new_rows.reshape(n, self.num_streams, self.dim)
