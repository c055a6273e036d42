"""One attention facade over two backends.

- SDPA (`F.scaled_dot_product_attention`), used on CPU and wherever flex attention is off:
  the flat tokens are gathered into a (B, L) padded grid, attended with the padded mask
  (or `is_causal` when the batch has no modality), and scattered back; or, when padding would
  waste much of the work, each sample is attended over its own slice (`masks.py`);
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
    # flex attention is only fast compiled; on CPU tests it runs eagerly instead. Blocks that are
    # not compiled themselves call it on batches of changing length: with static shapes each new
    # length compiled again, until dynamo's recompile limit sent flex attention to its eager path
    # (dense scores, slow). By default dynamo compiles a second, dynamic graph on the second
    # length, and that one serves all lengths after it. (Compiled blocks inline this call.)
    return torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention


def softcap_scores(scores: Tensor, softcap: float) -> Tensor:
    """Bounds attention logits smoothly to (-softcap, softcap) (Gemma 2; tanh keeps gradients alive)."""
    return softcap * torch.tanh(scores / softcap)


def scaled_dot_product(
    q: Tensor, k: Tensor, v: Tensor,
    mask: Tensor | None = None, is_causal: bool = False, dropout_p: float = 0., softcap: float | None = None,
) -> Tensor:
    """(B, heads, Q, dim_head) queries, (B, kv_heads, L, dim_head) keys and values: attention,
    each key / value head shared by heads / kv_heads consecutive query heads (grouped-query
    attention). SDPA's fused kernels where they apply; with logit softcapping, the textbook
    formula (SDPA has no hook for the scores)."""
    is_grouped = k.shape[-3] != q.shape[-3]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask = mask, is_causal = is_causal, dropout_p = dropout_p, enable_gqa = is_grouped)
    if mask is not None and mask.dtype != torch.bool:
        raise ValueError('logit softcapping takes a bool mask')
    if is_grouped:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim = -3), v.repeat_interleave(group, dim = -3)

    scores = softcap_scores(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, softcap)       # (B, heads, Q, L)
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype = torch.bool, device = q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float('-inf'))
    weights = F.dropout(scores.softmax(dim = -1), p = dropout_p)
    return weights @ v


def attend(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, dropout_p: float = 0., softcap: float | None = None) -> Tensor:
    """(N, heads, dim_head) queries, (N, kv_heads, dim_head) keys and values -> (N, heads, dim_head)"""
    if layout.block_mask is not None:
        return _attend_flex(q, k, v, layout, softcap)
    return _attend_sdpa(q, k, v, layout, dropout_p, softcap)


def _attend_flex(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, softcap: float | None) -> Tensor:
    q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))                  # (1, heads, N, dim_head)
    score_mod = None if softcap is None else (lambda score, b, h, q_idx, kv_idx: softcap_scores(score, softcap))
    out = _compiled_flex_attention()(q, k, v, block_mask = layout.block_mask, score_mod = score_mod, enable_gqa = k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


def _attend_sdpa(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, dropout_p: float, softcap: float | None) -> Tensor:
    if layout.samples is not None:
        return _attend_per_sample(q, k, v, layout, dropout_p, softcap)
    batch, length = layout.batch_size, layout.max_len
    heads, dim_head = q.shape[-2:]

    def to_padded(t: Tensor) -> Tensor:
        if layout.gather is not None:
            t = t[layout.gather]
        return t.view(batch, length, t.shape[-2], dim_head).transpose(1, 2)   # (B, heads, L, dim_head)

    mask = layout.mask
    if mask is not None and softcap is None:
        mask = layout.additive_mask(q.dtype)
    out = scaled_dot_product(
        to_padded(q), to_padded(k), to_padded(v),
        mask = mask, is_causal = layout.mask is None, dropout_p = dropout_p, softcap = softcap,
    )

    out = out.transpose(1, 2).reshape(batch * length, heads, dim_head)
    return out if layout.scatter is None else out[layout.scatter]


def _attend_per_sample(q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, dropout_p: float, softcap: float | None) -> Tensor:
    # the samples tile the sequence in order: one split per tensor, whose backward pass is one
    # concatenation (a slice per sample would scatter each sample's gradient into a zero
    # tensor of the whole sequence: samples x sequence of memory traffic per layer)
    sizes = [sample.end - sample.start for sample in layout.samples]
    outs = []
    for index, (sample, *one) in enumerate(zip(layout.samples, q.split(sizes), k.split(sizes), v.split(sizes))):
        mask = sample.mask
        if mask is not None and softcap is None:
            mask = layout.additive_mask(q.dtype, sample = index)
        one = [t.transpose(0, 1).unsqueeze(0) for t in one]                                  # (1, heads, L, dim_head)
        out = scaled_dot_product(*one, mask = mask, is_causal = sample.mask is None, dropout_p = dropout_p, softcap = softcap)
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs)


def attend_cached(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, softcap: float | None = None) -> Tensor:
    """Generation against a KV cache: (B, heads, Q, dim_head) queries, (B, kv_heads, L, dim_head)
    cached keys and values, (B, 1, Q, L) bool or additive mask -> (B, heads, Q, dim_head).

    With grouped heads and a mask that is the same for every query of a row (B, 1, 1, L): the
    static decoding steps, and any one-token step), the query heads of a group are folded into
    the queries of their key / value head, (B, kv_heads, group * Q, dim_head): on CUDA, SDPA's
    fused kernels take a mask but not `enable_gqa`, which would send the step to the unfused
    one, expanding the whole cache per layer."""
    batch, heads, queries, dim_head = q.shape
    kv_heads = k.shape[1]
    if kv_heads == heads or mask is None or mask.shape[-2] != 1:
        return scaled_dot_product(q, k, v, mask = mask, softcap = softcap)
    folded = q.reshape(batch, kv_heads, heads // kv_heads * queries, dim_head)      # query head i reads head i // group
    return scaled_dot_product(folded, k, v, mask = mask, softcap = softcap).view(batch, heads, queries, dim_head)
