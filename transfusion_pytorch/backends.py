"""How generation runs the model: one step feeds every row a chunk of its sequence.

A row's sequence is a list of items: token ids, and `Latents` blocks (a modality's latent
tokens, all at one time t). Each step takes, per row, a `Request` (items to feed, their
time, whether to keep them) and returns per row the logits at the last item when it is a
token, or the velocity at the latents when it is a `Latents` block.

- `CachedBackend` runs the chunk against a `KVCache`: the cost of a step follows the chunk,
  not the sequence;
- `ReferenceBackend` recomputes the whole sequence with `Transfusion.hidden_states` on a
  freshly packed batch, exactly as training sees it. It is slow and obviously correct, and
  the tests check the cached path against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .inputs import Modality, Sample, Text
from .kv_cache import KVCache
from .packing import grid_coords, pack
from .vocab import Vocab


@dataclass
class Latents:
    modality_type: int
    values: Tensor              # (n, dim_latent), channel last, flattened row-major over `shape`
    shape: tuple[int, ...]
    token_shape: tuple[int, ...] | None = None      # its grid of tokens in the sequence, when not `shape`

    def __len__(self) -> int:
        """The number of tokens it takes in the sequence."""
        return self.values.shape[0] if self.token_shape is None else math.prod(self.token_shape)


Item = int | Latents


@dataclass
class Request:
    items: list[Item]
    time: float = 1.            # time of every Latents block among the items (1 = clean data)
    keep: bool = True           # whether the items stay in the sequence after this step

    @property
    def num_tokens(self) -> int:
        return sum(len(item) if isinstance(item, Latents) else 1 for item in self.items)


def sequence_length(items: list[Item]) -> int:
    return Request(items).num_tokens


def items_to_sample(items: list[Item], vocab: Vocab, wrapped: bool) -> Sample:
    """A sequence of items -> the `Sample` that `pack` lays out as exactly that sequence (less a
    trailing EOS): the META, shape and BOM tokens before a modality and the EOM after it are
    the ones `pack` writes itself; any other token stays as text."""
    if wrapped:
        assert items[0] == vocab.sos, 'a wrapped sequence starts with SOS'
        items = items[1:]

    segments, text, skip_eom = [], [], None
    device = next((item.values.device for item in items if isinstance(item, Latents)), torch.device('cpu'))

    for item in items:
        if isinstance(item, Latents):
            header = [vocab.meta, *vocab.encode_shape(item.shape), vocab.bom(item.modality_type)]
            assert text[-len(header):] == header, 'a modality must follow its META, shape and BOM tokens'
            del text[-len(header):]
            if len(text) > 0:
                segments.append(Text(torch.tensor(text, dtype = torch.long, device = device)))
                text = []
            segments.append(Modality(item.modality_type, item.values.reshape(*item.shape, -1), token_shape = item.token_shape))
            skip_eom = vocab.eom(item.modality_type)
        elif item == skip_eom:
            skip_eom = None
        else:
            text.append(item)

    if len(text) > 0 or len(segments) == 0:
        segments.append(Text(torch.tensor(text, dtype = torch.long, device = device)))     # SOS alone: an empty text
    return segments


def latents_output(model, block: Latents, hidden: Tensor, time: float) -> Tensor:
    """The velocity at a block of noised latents at `time`, from the hidden states of its tokens."""
    output = model.tokens_to_output(block.modality_type, hidden, [block.shape]).float()
    times = torch.full((output.shape[0], 1), time, device = output.device)
    return model.output_to_velocity(output, block.values.to(output), times)


class ReferenceBackend:
    """Recomputes every row from scratch at every step (no cache)."""

    def __init__(self, model, batch_size: int, wrapped: bool = True):
        self.model, self.wrapped = model, wrapped
        self.sequences: list[list[Item]] = [[] for _ in range(batch_size)]

    def rewind(self, row: int, num: int):
        """Drops the last `num` items of a row, which must be tokens."""
        kept = len(self.sequences[row]) - num
        assert all(isinstance(item, int) for item in self.sequences[row][kept:])
        del self.sequences[row][kept:]

    def step(self, requests: list[Request | None]) -> list[Tensor | None]:
        outputs = []
        for row, request in enumerate(requests):
            if request is None or len(request.items) == 0:
                outputs.append(None)
                continue
            outputs.append(self.run_row(self.sequences[row] + request.items, request))
            if request.keep:
                self.sequences[row] = self.sequences[row] + request.items
        return outputs

    def decode(self, tokens: Tensor) -> Tensor:
        """As `CachedBackend.decode`: (B, Q) token ids, all kept -> (B, vocab) logits."""
        return torch.stack(self.step([Request(row) for row in tokens.tolist()]))

    def run_row(self, items: list[Item], request: Request) -> Tensor:
        model = self.model
        sample = items_to_sample(items, model.vocab, self.wrapped)
        packed = pack([sample], model.vocab, wrap = self.wrapped).to(model.device)

        # spans fed by this request are at its time, the earlier ones are clean
        num_new_spans = sum(isinstance(item, Latents) for item in request.items)
        span_times = torch.ones(packed.num_spans, device = model.device)
        if num_new_spans > 0:
            span_times[-num_new_spans:] = request.time

        hidden = model.hidden_states(packed, packed.latents, span_times)
        last = request.items[-1]

        if isinstance(last, Latents):
            index = packed.latent_index[last.modality_type][-len(last):]
            return latents_output(model, last, hidden[index], request.time)

        return model.to_logits(hidden[sequence_length(items) - 1])


def cache_dtype(model) -> torch.dtype:
    """The dtype of the keys and values that the model computes: autocast's where it is on (no
    float32 copy of bfloat16 keys, and no cast of the whole cache at every step), else the weights'."""
    device_type = model.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return model.token_embed.weight.dtype


@dataclass
class RowCursor:
    position: int = 0           # next rotary position
    span: int = 0               # next span id


class CachedBackend:
    """Runs each step's chunks against a preallocated KV cache."""

    def __init__(self, model, batch_size: int, max_len: int):
        self.model = model
        config = model.config.transformer
        self.cache = KVCache(config.depth, batch_size, config.num_kv_heads, config.dim_head, max_len,
                             device = model.device, dtype = cache_dtype(model))
        self.cursors = [RowCursor() for _ in range(batch_size)]

    def rewind(self, row: int, num: int):
        """Drops the last `num` tokens of a row; they must be text-like tokens, one position each."""
        self.cache.rewind(row, num)
        self.cursors[row].position -= num

    def step(self, requests: list[Request | None]) -> list[Tensor | None]:
        model, batch = self.model, len(requests)
        device = model.device
        num_new = [0 if request is None else request.num_tokens for request in requests]
        chunk = max(num_new)
        if chunk == 0:
            return [None] * batch
        if min(num_new) == chunk and all(request.keep and all(type(item) is int for item in request.items) for request in requests):
            return list(self.decode(torch.tensor([request.items for request in requests])).unbind(0))

        tokens = torch.zeros(batch, chunk, dtype = torch.long)
        positions = torch.zeros(batch, chunk, dtype = torch.long)
        span = torch.full((batch, chunk), -1, dtype = torch.long)          # per-row span ids, for the mask
        local_span = torch.full((batch, chunk), -1, dtype = torch.long)    # index into span_times, for conditioning
        span_times, blocks = [], []                                         # blocks: (flat index, Latents)

        for row, request in enumerate(requests):
            if request is None:
                continue
            cursor, offset = self.cursors[row], 0
            position, next_span = cursor.position, cursor.span
            for item in request.items:
                if isinstance(item, Latents):
                    n = len(item)
                    positions[row, offset:offset + n] = position
                    span[row, offset:offset + n] = next_span
                    local_span[row, offset:offset + n] = len(span_times)
                    span_times.append(request.time)
                    blocks.append((row * chunk + offset, item))
                    position, next_span, offset = position + 1, next_span + 1, offset + n
                else:
                    tokens[row, offset] = item
                    positions[row, offset] = position
                    position, offset = position + 1, offset + 1
            if request.keep:
                cursor.position, cursor.span = position, next_span

        tokens, positions, span, local_span = (t.to(device) for t in (tokens, positions, span, local_span))

        x = self.embed(tokens.view(-1), blocks)
        self.cache.prepare(num_new, span)
        times = torch.tensor(span_times, device = device) if len(span_times) > 0 else None
        hidden = model.transformer(x, None, positions.view(-1), times, local_span.view(-1), cache = self.cache)
        hidden = hidden.view(batch, chunk, -1)
        self.cache.commit([n if request is not None and request.keep else 0 for n, request in zip(num_new, requests)])

        outputs: list[Tensor | None] = [None] * batch
        text_rows = []
        for row, request in enumerate(requests):
            if request is None:
                continue
            last, n = request.items[-1], num_new[row]
            if isinstance(last, Latents):
                outputs[row] = latents_output(model, last, hidden[row, n - len(last):n], request.time)
            else:
                text_rows.append(row)
        if len(text_rows) > 0:
            # one projection to the vocabulary for every row that ends with a token
            last_slots = torch.tensor([num_new[row] - 1 for row in text_rows], device = device)
            logits = model.to_logits(hidden[torch.tensor(text_rows, device = device), last_slots])
            for row, row_logits in zip(text_rows, logits):
                outputs[row] = row_logits
        return outputs

    def decode(self, tokens: Tensor) -> Tensor:
        """Text decoding: every row feeds the same number of tokens, all kept. (B, Q) token ids
        -> (B, vocab) logits at each row's last token."""
        model, device = self.model, self.model.device
        batch, chunk = tokens.shape
        positions = torch.tensor([[cursor.position + i for i in range(chunk)] for cursor in self.cursors], device = device)
        for cursor in self.cursors:
            cursor.position += chunk

        self.cache.prepare([chunk] * batch, None)
        hidden = model.transformer(model.token_embed(tokens.to(device).reshape(-1)), None, positions.view(-1), cache = self.cache)
        self.cache.commit([chunk] * batch)
        return model.to_logits(hidden.view(batch, chunk, -1)[:, -1])

    def embed(self, tokens: Tensor, blocks: list[tuple[int, Latents]]) -> Tensor:
        """(B * Q, dim), as `Transfusion.embed`: token embeddings, latents projected in at their slots."""
        model = self.model
        x = model.token_embed(tokens)
        for start, block in blocks:
            m = block.modality_type
            values = model.latents_to_tokens(m, block.values.to(device = x.device, dtype = x.dtype), [block.shape])
            if model.config.add_pos_emb[m]:
                values = values + model.pos_embs[m](grid_coords(block.token_shape or block.shape).to(x.device))
            x[start:start + len(block)] = values
        return x
