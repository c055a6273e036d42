"""Attention masks, from the per-token tensors of a `PackedBatch`.

One rule: a query may attend to a key of the same sample (document) that comes no later than
itself (causal), or that lies in the same modality span (bidirectional inside a modality):

    allowed(q, k) = same_doc(q, k) and (k <= q or same_span(q, k))

It is evaluated by elementwise lookups on per-token ids, never by a loop over spans. Which
layout a batch takes, and its sizes, follow from the samples' lengths and segments as packing
found them on the host (`PackedBatch.sample_lengths`, `layout`), so that building one never
waits on the device. The layouts:

- padded (SDPA): samples become the rows of a (B, L) grid, L the longest sample, so the mask
  costs B * L^2 rather than (total packed length)^2, and a batch without modalities needs no
  mask at all (plain causal attention: padding lies after every real token);
- per sample (SDPA): each sample is attended by itself, over its own slice of the flat
  sequence, with its own L_i^2 mask, or none (plain causal) when it has no modality. Chosen when
  the samples' lengths differ, so that padding would waste work (the cost follows the sum of
  L_i^2, as with flex attention), and there are not so many samples that one SDPA call each
  costs more than it saves. On the training benchmark's multimodal batch (8 samples of 270 to
  431 tokens) attention's forward and backward take 30% less time than padded;
- flat (flex attention): a block mask over the packed sequence; blocks of different samples
  are skipped, so the cost follows the sum of squared sample lengths;
- flat and padded, for compiled blocks (`pad_to_multiple`): the packed sequence is padded up
  to a multiple of a fixed length, so that batches of changing length reach the compiled
  blocks with one shape. The padding tokens form a document of their own (they attend to one
  another, causally, so no row of the mask is empty, and no real token attends to them); the
  transformer drops them again, so they take no loss. With flex attention the mask is a block
  mask; with SDPA one dense (N, N) mask over the whole padded sequence (the cost follows N^2:
  compiled SDPA blocks are for checking the compiled path on CPU, flex attention is for speed).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .packing import PackedBatch


def mask_rule(q_doc: Tensor, q_idx: Tensor, q_span: Tensor, k_doc: Tensor, k_idx: Tensor, k_span: Tensor) -> Tensor:
    causal = k_idx <= q_idx
    same_span = (q_span == k_span) & (q_span >= 0)
    return (q_doc == k_doc) & (causal | same_span)


@dataclass
class AttentionLayout:
    """How attention sees a packed batch; built once per batch and shared by every layer."""
    num_tokens: int
    batch_size: int
    max_len: int
    gather: Tensor | None = None        # (B * L,) flat index for each padded slot; None when samples need no padding
    scatter: Tensor | None = None       # (N,) padded slot of each flat token
    mask: Tensor | None = None          # (B, 1, L, L) bool; None means plain causal
    block_mask: object = None           # flex attention BlockMask over the flat sequence, when using flex
    samples: list[SampleSlice] | None = None    # the per-sample layout: each sample's slice and mask
    _additive: dict = field(default_factory = dict, repr = False)

    def additive_mask(self, dtype: torch.dtype, sample: int | None = None) -> Tensor:
        """`mask` (or sample `sample`'s) as 0 / -inf of the queries' dtype, for SDPA's fused CPU
        kernel, which would otherwise convert the bool mask in every layer, forward and
        backward. Made on the first layer's call and reused by the others (one per dtype: bf16
        under autocast). Inside a compiled block it is made in the graph instead (one fused
        pass), since a compiled block must not change its inputs."""
        mask = self.mask if sample is None else self.samples[sample].mask
        if torch.compiler.is_compiling():
            return to_additive(mask, dtype)
        key = (dtype, sample)
        if key not in self._additive:
            self._additive[key] = to_additive(mask, dtype)
        return self._additive[key]


def to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    zero = torch.zeros((), dtype = dtype, device = mask.device)
    return torch.where(mask, zero, torch.tensor(float('-inf'), dtype = dtype, device = mask.device))


@dataclass
class SampleSlice:
    start: int                          # the sample's tokens are start:end of the flat sequence
    end: int
    mask: Tensor | None                 # (1, 1, L, L) bool; None means plain causal (no modality)


def padded_layout(packed: PackedBatch) -> AttentionLayout:
    device = packed.tokens.device
    lengths = packed.seq_lengths
    batch_size, max_len = packed.batch_size, max(packed.sample_lengths)     # host integers: no wait on the device

    # padded slot (b, i) holds flat token cu_seqlens[b] + i when i < length[b]
    slot = torch.arange(max_len, device = device)
    valid = slot[None, :] < lengths[:, None]                                     # (B, L)
    flat = packed.cu_seqlens[:-1, None] + slot[None, :]                           # (B, L)

    layout = AttentionLayout(packed.num_tokens, batch_size, max_len)

    if min(packed.sample_lengths) < max_len:
        layout.gather = torch.where(valid, flat, torch.zeros_like(flat)).reshape(-1)
        offset_in_sample = torch.arange(packed.num_tokens, device = device) - packed.cu_seqlens[packed.doc]
        layout.scatter = packed.doc * max_len + offset_in_sample

    if packed.num_spans == 0:
        return layout   # text only: causal attention, padding sits after every real token

    span = torch.where(valid, packed.span[flat.clamp(max = packed.num_tokens - 1)], torch.full_like(flat, -1))
    doc = valid.long() - 1                                                        # 0 for tokens, -1 for padding
    layout.mask = mask_rule(
        doc[:, :, None], slot[None, :, None], span[:, :, None],
        doc[:, None, :], slot[None, None, :], span[:, None, :],
    )[:, None]                                                                     # (B, 1, L, L)
    return layout


def per_sample_layout(packed: PackedBatch) -> AttentionLayout:
    bounds = [0, *itertools.accumulate(packed.sample_lengths)]
    layout = AttentionLayout(packed.num_tokens, packed.batch_size, max(packed.sample_lengths), samples = [])
    for start, end, has_modality in zip(bounds[:-1], bounds[1:], packed.sample_has_modality):
        span = packed.span[start:end]
        mask = None
        if has_modality:
            idx = torch.arange(end - start, device = span.device)
            same = torch.zeros_like(idx)
            mask = mask_rule(same[:, None], idx[:, None], span[:, None], same[None, :], idx[None, :], span[None, :])[None, None]
        layout.samples.append(SampleSlice(start, end, mask))
    return layout


# a batch is attended per sample when padding would cost at least this much more work, and it
# holds at most this many samples (each SDPA call costs some tens of microseconds by itself)
PER_SAMPLE_MIN_SAVING = 1.05
PER_SAMPLE_MAX_SAMPLES = 64


def flex_layout(packed: PackedBatch, pad_to_multiple: int | None = None) -> AttentionLayout:
    from torch.nn.attention.flex_attention import create_block_mask

    doc, span = padded_ids(packed, pad_to_multiple)
    n = doc.shape[0]

    def mask_mod(b, h, q_idx, kv_idx):
        return mask_rule(doc[q_idx], q_idx, span[q_idx], doc[kv_idx], kv_idx, span[kv_idx])

    block_mask = create_block_mask(mask_mod, B = None, H = None, Q_LEN = n, KV_LEN = n, device = packed.tokens.device)
    return AttentionLayout(n, 1, n, block_mask = block_mask)


def dense_padded_layout(packed: PackedBatch, pad_to_multiple: int) -> AttentionLayout:
    """SDPA over the whole padded sequence with one (1, 1, N, N) mask, for compiled blocks on CPU."""
    doc, span = padded_ids(packed, pad_to_multiple)
    idx = torch.arange(doc.shape[0], device = doc.device)
    mask = mask_rule(doc[:, None], idx[:, None], span[:, None], doc[None, :], idx[None, :], span[None, :])
    return AttentionLayout(doc.shape[0], 1, doc.shape[0], mask = mask[None, None])


def padded_length(num_tokens: int, multiple: int | None) -> int:
    return num_tokens if multiple is None else -(-num_tokens // multiple) * multiple


def padded_ids(packed: PackedBatch, multiple: int | None) -> tuple[Tensor, Tensor]:
    """(doc, span) of every token, padded up to a multiple of `multiple` tokens: the padding is
    document B (one past the last sample) and no modality span."""
    padding = padded_length(packed.num_tokens, multiple) - packed.num_tokens
    if padding == 0:
        return packed.doc, packed.span
    doc = torch.cat((packed.doc, packed.doc.new_full((padding,), packed.batch_size)))
    span = torch.cat((packed.span, packed.span.new_full((padding,), -1)))
    return doc, span


def build_layout(packed: PackedBatch, use_flex_attn: bool = False, pad_to_multiple: int | None = None) -> AttentionLayout:
    """The attention layout of a batch. With `pad_to_multiple` (compiled blocks), a flat layout
    over the sequence padded to a multiple of that many tokens; the layout's `num_tokens` is
    then the padded length, and the transformer pads its inputs to it."""
    if use_flex_attn:
        return flex_layout(packed, pad_to_multiple)
    if pad_to_multiple is not None:
        return dense_padded_layout(packed, pad_to_multiple)
    lengths = packed.sample_lengths
    padded_work, own_work = len(lengths) * max(lengths) ** 2, sum(length ** 2 for length in lengths)
    if padded_work >= PER_SAMPLE_MIN_SAVING * own_work and len(lengths) <= PER_SAMPLE_MAX_SAMPLES:
        return per_sample_layout(packed)
    return padded_layout(packed)


def dense_mask(packed: PackedBatch) -> Tensor:
    """(N, N) mask over the flat sequence. Costs (total length)^2: for tests and small batches."""
    idx = torch.arange(packed.num_tokens, device = packed.tokens.device)
    doc, span = packed.doc, packed.span
    return mask_rule(doc[:, None], idx[:, None], span[:, None], doc[None, :], idx[None, :], span[None, :])
