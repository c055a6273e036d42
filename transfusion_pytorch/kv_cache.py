"""A key / value cache for generation (allocated as rows grow), and the forward pass of one chunk against it.

The cache holds, for every layer, the keys (after rotary) and values of every slot of every
row (non-persistent buffers: never saved with a checkpoint). Nothing grows by concatenation: a
step writes its tokens at their slots. `max_len` bounds a row; the buffers start at
`min(max_len, INITIAL_SLOTS)` slots and double when a step needs more (`reserve`), so a large
`max_length` whose rows stop early costs no memory, and growing costs one copy of the cache
per doubling. See docs/decoding.md for the memory per token.

Each generation step feeds every row a chunk of tokens, padded to the longest chunk:

- text decoding: one token;
- a modality's ODE step: its latent tokens at time t. They are written at the slots after the
  prefix but not committed (the row's length does not move), so the next step overwrites them;
- committing a finished modality: its clean latents at t = 1 followed by its EOM token.

A query attends to a cached key of its row when the key lies before the end of the row's chunk
and is not later than the query, or lies in the same modality span (the rule of `masks.py`,
with span ids kept per slot). Padded queries write to a spare slot past the end, never read.

Text decoding of rows of equal length (`generate_text_only`, or a batch whose rows happen to
be in step) takes a shorter path: the rows write at the same slots, through one slice, and one
token per row attends to its whole prefix with no mask at the row's lengths, which are kept on
the host so a step never waits on the device to learn them.

Static steps (`static_decode.py`, for CUDA graphs) see the cache through `prepare_static`: the
slots to write and the end of each row's visible prefix are device tensors, and queries attend
over every allocated slot with a (B, 1, 1, slots) mask, so the shapes of a step depend on the
allocation alone, never on the rows' lengths. Growing the allocation bumps `version`, which
tells the static steps that their captured graphs point at freed buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import attend_cached


INITIAL_SLOTS = 256         # slots per row allocated at first (fewer when max_len is smaller); then doubled as needed


class KVCache(nn.Module):
    def __init__(self, depth: int, batch_size: int, kv_heads: int, dim_head: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, initial_slots: int | None = None):
        super().__init__()
        self.max_len = max_len
        self.version = 0                        # bumped by every reallocation
        self.allocate(depth, batch_size, kv_heads, dim_head, min(max_len, initial_slots or INITIAL_SLOTS), device, dtype)
        # the rows' lengths live on the host: a step never waits on the device to learn them
        self.lengths = [0] * batch_size

        # set by `prepare` for the step in flight
        self.write_slots: Tensor | slice | None = None  # (B, Q) slots, or one slice when every row writes the same ones
        self.mask: Tensor | None = None             # (B or 1, 1, Q, L) bool, None where every query sees every key
        self.bias: Tensor | None = None             # the same as an additive 0 / -inf mask
        self.key_len = 0

    def allocate(self, depth: int, batch_size: int, kv_heads: int, dim_head: int, slots: int, device, dtype: torch.dtype):
        capacity = slots + 1                    # the last slot takes the writes of padded queries
        shape = (depth, batch_size, kv_heads, capacity, dim_head)       # key / value heads only: GQA's saving
        self.register_buffer('keys', torch.zeros(shape, device = device, dtype = dtype), persistent = False)
        self.register_buffer('values', torch.zeros(shape, device = device, dtype = dtype), persistent = False)
        self.register_buffer('slot_span', torch.full((batch_size, capacity), -1, device = device, dtype = torch.long), persistent = False)

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def slots(self) -> int:
        """Slots per row allocated now (the spare one aside): at most max_len."""
        return self.keys.shape[-2] - 1

    @property
    def spare_slot(self) -> int:
        return self.slots

    def reserve(self, length: int):
        """Makes room for `length` tokens per row: the allocation doubles (within max_len) until
        it holds them, the cached keys and values copied over."""
        if length > self.max_len:
            raise RuntimeError(f'the KV cache holds {self.max_len} tokens per row, a step would need {length}')
        if length <= self.slots:
            return
        keys, values, slot_span, used = self.keys, self.values, self.slot_span, self.slots
        depth, batch, kv_heads, _, dim_head = keys.shape
        self.allocate(depth, batch, kv_heads, dim_head, min(self.max_len, max(length, 2 * used)), keys.device, keys.dtype)
        self.keys[..., :used, :].copy_(keys[..., :used, :])
        self.values[..., :used, :].copy_(values[..., :used, :])
        self.slot_span[:, :used].copy_(slot_span[:, :used])
        self.version += 1

    def prepare(self, num_new: list[int], span: Tensor | None):
        """Sets up a step: row b feeds `num_new[b]` tokens (the first ones of its padded chunk),
        whose span ids (unique within the row, -1 for text) are `span` (B, Q); None when the
        step holds text tokens only."""
        ends = [length + n for length, n in zip(self.lengths, num_new)]
        self.reserve(max(ends))
        chunk = max(num_new)
        self.key_len = max(max(ends), 1)

        if span is None and len(set(self.lengths)) == 1 and min(num_new) == chunk:
            self.prepare_uniform(self.lengths[0], chunk)
        else:
            self.prepare_general(num_new, span if span is not None else torch.full((len(num_new), chunk), -1, device = self.keys.device))

    def prepare_uniform(self, start: int, chunk: int):
        """Text tokens at the same slots of every row (decoding rows of equal length): plain
        causal attention over the prefix, written through a slice, with no mask at all for one
        token per row."""
        self.write_slots = slice(start, start + chunk)
        self.slot_span[:, self.write_slots] = -1
        if chunk == 1:
            self.mask = self.bias = None
            return
        key_slot = torch.arange(self.key_len, device = self.keys.device)
        query_slot = torch.arange(start, start + chunk, device = self.keys.device)
        self.set_mask((key_slot[None, :] <= query_slot[:, None])[None, None])

    def prepare_general(self, num_new: list[int], span: Tensor):
        batch, chunk = span.shape
        device = span.device
        offset = torch.arange(chunk, device = device)
        lengths = torch.tensor(self.lengths, device = device)
        new = torch.tensor(num_new, device = device)
        valid = offset[None, :] < new[:, None]                                       # (B, Q)
        end = lengths + new

        slots = torch.where(valid, lengths[:, None] + offset[None, :], torch.full_like(span, self.spare_slot))
        rows = torch.arange(batch, device = device)[:, None]
        self.slot_span[rows, slots] = torch.where(valid, span, -1)

        key_slot = torch.arange(self.key_len, device = device)
        key_span = self.slot_span[:, :self.key_len]                                   # (B, L)
        causal = key_slot[None, None, :] <= slots[:, :, None]
        same_span = (key_span[:, None, :] == span[:, :, None]) & (span[:, :, None] >= 0)
        allowed = (key_slot[None, None, :] < end[:, None, None]) & (causal | same_span)
        # a padded query sees slot 0 only, so that its (discarded) softmax has something to normalise
        allowed = torch.where(valid[:, :, None], allowed, key_slot[None, None, :] == 0)
        self.write_slots = slots
        self.set_mask(allowed[:, None])

    def prepare_static(self, write_slots: Tensor, ends: Tensor, text: bool):
        """Sets up a static step with no host sync: row b writes at `write_slots[b]` (B, Q) and
        its queries see the slots below `ends[b]` (B,): a text token its prefix and itself, a
        modality's tokens their prefix and their own span. Queries attend over every allocated
        slot, so the shapes follow the allocation, not the rows' lengths. Text tokens mark their
        slots as text for the general path's span rule (a modality's uncommitted tokens need
        no mark: the step that commits them writes their spans)."""
        if text:
            rows = torch.arange(write_slots.shape[0], device = write_slots.device)[:, None]
            self.slot_span[rows, write_slots] = torch.full_like(write_slots, -1)      # a device fill: no host scalar in a graph
        self.write_slots = write_slots
        self.key_len = self.keys.shape[-2]
        key_slot = torch.arange(self.key_len, device = ends.device)
        self.mask = (key_slot[None, :] < ends[:, None])[:, None, None]                  # (B, 1, 1, slots)
        self.bias = torch.zeros(self.mask.shape, dtype = self.keys.dtype, device = ends.device).masked_fill_(~self.mask, float('-inf'))

    def set_mask(self, allowed: Tensor):
        # SDPA on CPU is an order of magnitude slower with a bool mask than with an additive
        # float one (torch 2.13), and fastest with none (a batch of one row denoising its
        # modality needs none, for instance)
        if bool(allowed.all()):
            self.mask = self.bias = None
            return
        self.mask = allowed
        self.bias = torch.zeros(allowed.shape, dtype = self.keys.dtype, device = allowed.device).masked_fill_(~allowed, float('-inf'))

    def commit(self, num_new: list[int]):
        """Keeps the tokens of the step just run: the rows' lengths move past them."""
        self.lengths = [length + n for length, n in zip(self.lengths, num_new)]

    def rewind(self, row: int, num: int):
        self.lengths[row] -= num

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)


@dataclass
class LayerCache:
    cache: KVCache
    index: int

    def attend(self, q: Tensor, k: Tensor, v: Tensor, softcap: float | None = None) -> Tensor:
        """(B * Q, heads, dim_head) queries, (B * Q, kv_heads, dim_head) keys and values ->
        (B * Q, heads, dim_head): writes k, v at the step's slots and attends the queries to the
        row's cache."""
        cache = self.cache
        batch, heads, dim_head = cache.batch_size, *q.shape[-2:]
        chunk = q.shape[0] // batch

        keys, values = cache.keys[self.index], cache.values[self.index]              # (B, kv_heads, capacity, dim_head)
        k, v = (t.view(batch, chunk, -1, dim_head).to(keys.dtype) for t in (k, v))
        if isinstance(cache.write_slots, slice):
            keys[:, :, cache.write_slots] = k.transpose(1, 2)
            values[:, :, cache.write_slots] = v.transpose(1, 2)
        else:
            rows = torch.arange(batch, device = q.device)[:, None]
            keys[rows, :, cache.write_slots] = k
            values[rows, :, cache.write_slots] = v

        q = q.view(batch, chunk, heads, dim_head).transpose(1, 2)                     # (B, heads, Q, dim_head)
        mask = cache.mask if softcap is not None else (None if cache.bias is None else cache.bias.to(q.dtype))
        out = attend_cached(q, keys[:, :, :cache.key_len].to(q.dtype), values[:, :, :cache.key_len].to(q.dtype), mask, softcap = softcap)
        return out.transpose(1, 2).reshape(batch * chunk, heads, dim_head)
