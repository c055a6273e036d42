"""One attention facade over two backends.

- SDPA (`F.scaled_dot_product_attention`), used on CPU and wherever flex attention is off:
  the flat tokens are gathered into a (B, L) padded grid, attended with the padded mask
  (or `is_causal` when the batch has no modality), and scattered back;
- flex attention over the flat sequence with a block mask, used on CUDA (`use_flex_attn`).

Both take and return flat (N, heads, dim_head) tensors, so the transformer never sees the
difference. `tests/test_attention.py` checks that they agree with a naive reference.
"""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import AttentionLayout


@cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    # flex attention is only fast compiled; on CPU tests it runs eagerly instead
    return torch.compile(flex_attention, dynamic = False) if torch.cuda.is_available() else flex_attention


def attend(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, dropout_p: float = 0.) -> Tensor:
    """(N, heads, dim_head) x 3 -> (N, heads, dim_head)"""
    if layout.block_mask is not None:
        return _attend_flex(q, k, v, layout)
    return _attend_sdpa(q, k, v, layout, dropout_p)


def _attend_flex(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout) -> Tensor:
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))                  # (1, heads, N, dim_head)
    out = _compiled_flex_attention()(q, k, v, block_mask = layout.block_mask)
    return out[0].transpose(0, 1)


def _attend_sdpa(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, dropout_p: float) -> Tensor:
    batch, length = layout.batch_size, layout.max_len
    heads, dim_head = q.shape[-2:]

    def to_padded(t: Tensor) -> Tensor:
        if layout.gather is not None:
            t = t[layout.gather]
        return t.view(batch, length, heads, dim_head).transpose(1, 2)         # (B, heads, L, dim_head)

    out = F.scaled_dot_product_attention(
        to_padded(q), to_padded(k), to_padded(v),
        attn_mask = layout.mask,
        is_causal = layout.mask is None,
        dropout_p = dropout_p,
    )

    out = out.transpose(1, 2).reshape(batch * length, heads, dim_head)
    return out if layout.scatter is None else out[layout.scatter]


def attend_cached(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Generation against a KV cache: (B, heads, Q, dim_head) queries, (B, heads, L, dim_head)
    cached keys and values, (B, 1, Q, L) bool mask -> (B, heads, Q, dim_head)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask = mask)
