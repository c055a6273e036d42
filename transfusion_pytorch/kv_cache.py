"""A preallocated key / value cache for generation, and the forward pass of one chunk against it.

The cache holds, for every layer, the keys (after rotary) and values of every slot of every
row, in buffers allocated once for the longest sequence (non-persistent: never saved with a
checkpoint). Nothing grows by concatenation: a step writes its tokens at their slots.

Each generation step feeds every row a chunk of tokens, padded to the longest chunk:

- text decoding: one token;
- a modality's ODE step: its latent tokens at time t. They are written at the slots after the
  prefix but not committed (the row's length does not move), so the next step overwrites them;
- committing a finished modality: its clean latents at t = 1 followed by its EOM token.

A query attends to a cached key of its row when the key lies before the end of the row's chunk
and is not later than the query, or lies in the same modality span (the rule of `masks.py`,
with span ids kept per slot). Padded queries write to a spare slot past the end, never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import attend_cached


class KVCache(nn.Module):
    def __init__(self, depth: int, batch_size: int, heads: int, dim_head: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.max_len = max_len
        capacity = max_len + 1                  # the last slot takes the writes of padded queries
        shape = (depth, batch_size, heads, capacity, dim_head)
        self.register_buffer('keys', torch.zeros(shape, device = device, dtype = dtype), persistent = False)
        self.register_buffer('values', torch.zeros(shape, device = device, dtype = dtype), persistent = False)
        self.register_buffer('slot_span', torch.full((batch_size, capacity), -1, device = device, dtype = torch.long), persistent = False)
        self.register_buffer('length', torch.zeros(batch_size, device = device, dtype = torch.long), persistent = False)

        # set by `prepare` for the step in flight
        self.write_slots: Tensor | None = None      # (B, Q)
        self.mask: Tensor | None = None             # (B, 1, Q, L) bool, None where every query sees every key
        self.bias: Tensor | None = None             # the same as an additive 0 / -inf mask
        self.key_len = 0

    @property
    def batch_size(self) -> int:
        return self.length.shape[0]

    @property
    def spare_slot(self) -> int:
        return self.max_len

    def prepare(self, num_new: Tensor, span: Tensor):
        """Sets up a step: row b feeds `num_new[b]` tokens (the first ones of its padded chunk),
        whose span ids (unique within the row, -1 for text) are `span` (B, Q)."""
        batch, chunk = span.shape
        offset = torch.arange(chunk, device = span.device)
        valid = offset[None, :] < num_new[:, None]                                   # (B, Q)
        end = self.length + num_new
        if int(end.max()) > self.max_len:
            raise RuntimeError(f'the KV cache holds {self.max_len} tokens per row, a step would need {int(end.max())}')

        slots = torch.where(valid, self.length[:, None] + offset[None, :], torch.full_like(span, self.spare_slot))
        rows = torch.arange(batch, device = span.device)[:, None]
        self.slot_span[rows, slots] = torch.where(valid, span, -1)

        key_len = max(int(end.max()), 1)
        key_slot = torch.arange(key_len, device = span.device)
        key_span = self.slot_span[:, :key_len]                                        # (B, L)
        causal = key_slot[None, None, :] <= slots[:, :, None]
        same_span = (key_span[:, None, :] == span[:, :, None]) & (span[:, :, None] >= 0)
        allowed = (key_slot[None, None, :] < end[:, None, None]) & (causal | same_span)
        # a padded query sees slot 0 only, so that its (discarded) softmax has something to normalise
        allowed = torch.where(valid[:, :, None], allowed, key_slot[None, None, :] == 0)

        # SDPA on CPU is an order of magnitude slower with a bool mask than with an additive
        # float one (torch 2.13), and fastest with none: text decoding of rows of equal length
        # (generate_text_only) needs none at all
        if bool(allowed.all()):
            self.mask = self.bias = None
        else:
            self.mask = allowed[:, None]
            self.bias = torch.zeros(self.mask.shape, dtype = self.keys.dtype, device = span.device).masked_fill_(~self.mask, float('-inf'))
        self.write_slots, self.key_len = slots, key_len

    def commit(self, num_new: Tensor):
        """Keeps the tokens of the step just run: the rows' lengths move past them."""
        self.length += num_new

    def rewind(self, row: int, num: int):
        self.length[row] -= num

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)


@dataclass
class LayerCache:
    cache: KVCache
    index: int

    def attend(self, q: Tensor, k: Tensor, v: Tensor, softcap: float | None = None) -> Tensor:
        """(B * Q, heads, dim_head) x 3 -> (B * Q, heads, dim_head): writes k, v at the step's
        slots and attends the queries to the row's cache."""
        cache = self.cache
        batch, chunk = cache.write_slots.shape
        heads, dim_head = q.shape[-2:]
        rows = torch.arange(batch, device = q.device)[:, None]

        keys, values = cache.keys[self.index], cache.values[self.index]              # (B, heads, capacity, dim_head)
        keys[rows, :, cache.write_slots] = k.view(batch, chunk, heads, dim_head).to(keys.dtype)
        values[rows, :, cache.write_slots] = v.view(batch, chunk, heads, dim_head).to(values.dtype)

        q = q.view(batch, chunk, heads, dim_head).transpose(1, 2)                     # (B, heads, Q, dim_head)
        mask = cache.mask if softcap is not None else (None if cache.bias is None else cache.bias.to(q.dtype))
        out = attend_cached(q, keys[:, :, :cache.key_len].to(q.dtype), values[:, :, :cache.key_len].to(q.dtype), mask, softcap = softcap)
        return out.transpose(1, 2).reshape(batch * chunk, heads, dim_head)
