"""Packing: a batch of samples -> one flat `PackedBatch`. Pure functions, no model code.

Each sample is laid out as (see `vocab.py` for the ids)::

    SOS  text ...  META <shape tokens> BOM_m  x x x ... x  EOM_m  text ...  EOS

where `x` are the latent tokens of the modality (prod(shape) of them, row-major). All samples
are concatenated without padding; per-token integer tensors say which sample (document) a
token belongs to, its rotary position (every latent token of one modality shares one
position), which modality span it is in, and which token the model must predict from it.
Lists and tuples stop here: everything downstream works on these tensors.

Packing runs on the host, before the batch moves to the device: what needs the values of the
per-token tensors to decide a shape (the samples' lengths, the positions with a text target) is
found here, so that nothing after the move makes the host wait for the device
(docs/performance.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .inputs import Modality, Sample, Text
from .vocab import Vocab

IGNORE = -1     # text target of positions that predict nothing


@dataclass(frozen = True)
class SegmentRecord:
    """Where a segment of a sample landed in the packed sequence (for unpacking)."""
    kind: str                   # 'text' or 'modality'
    start: int                  # flat index of its first token (first latent token for a modality)
    length: int                 # number of tokens in the sequence
    modality_type: int = -1
    shape: tuple[int, ...] = ()         # shape of the modality's latent (without the latent dim)
    token_shape: tuple[int, ...] = ()   # grid of its tokens in the sequence (`shape` unless down-sampled)


@dataclass
class PackedBatch:
    # per token, (N,)
    tokens: Tensor              # token id; 0 at latent tokens, whose values are in `latents`
    doc: Tensor                 # index of the sample
    position: Tensor            # rotary position
    span: Tensor                # modality span id of a latent token, -1 elsewhere
    modality_type: Tensor       # modality type of a latent token, -1 elsewhere
    text_target: Tensor         # token to predict from this position, IGNORE where none
    text_index: Tensor          # (T,) the positions with a text target (`text_positions`)

    # per sample, (B + 1,)
    cu_seqlens: Tensor          # offsets of the samples in the flat sequence

    # per modality span, (S,)
    span_type: Tensor
    span_doc: Tensor
    span_rank: Tensor           # index of the modality within its sample
    span_start: Tensor          # flat index of its first latent token
    span_length: Tensor         # number of latent tokens
    span_before_text: Tensor    # (S,) bool: the sample's next segment is text (a caption after an image)

    # per modality type m, in sequence order
    latents: tuple[Tensor, ...]         # (R_m, dim_latent_m) latent rows, clean data (t = 1)
    latent_span: tuple[Tensor, ...]     # (R_m,) modality span of each latent row
    latent_index: tuple[Tensor, ...]    # (N_m,) flat index of each latent token (N_m = R_m unless down-sampled)
    latent_coords: tuple[Tensor, ...]   # (N_m, num_axes_m) coordinate of each token in its modality's grid

    layout: tuple[tuple[SegmentRecord, ...], ...]
    wrapped: bool               # whether samples were framed by SOS / EOS
    sample_lengths: tuple[int, ...]     # each sample's length (`seq_lengths`), as host integers
    span_records: tuple[SegmentRecord, ...] = ()    # the record of each modality span, in span order
    raw: tuple = ()             # per span, the modality as the user gave it (None where unknown)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_spans(self) -> int:
        return self.span_type.shape[0]

    @property
    def seq_lengths(self) -> Tensor:
        return self.cu_seqlens.diff()

    @property
    def is_latent(self) -> Tensor:
        return self.span >= 0

    @property
    def sample_has_modality(self) -> tuple[bool, ...]:
        """Whether each sample holds a modality span, from the host-side layout."""
        return tuple(any(record.kind == 'modality' for record in records) for records in self.layout)

    def spans_of_type(self, modality_type: int) -> list[SegmentRecord]:
        """The records of the modality spans of one type, in span order (as their latent rows lie)."""
        return [record for record in self.span_records if record.modality_type == modality_type]

    def to(self, device: torch.device | str) -> PackedBatch:
        """The batch on `device`. From the host the copies do not block: a blocking copy to a GPU
        waits for everything queued on the device first (PyTorch synchronises the stream after
        it), and this is the first thing each step does (docs/performance.md). A non-blocking
        copy from pageable memory is staged by CUDA before the call returns, so the host tensors
        may go; a copy back to the host blocks, as its values are read at once."""
        def move(tensor: Tensor) -> Tensor:
            return tensor.to(device, non_blocking = tensor.device.type == 'cpu')

        moved = {}
        for name, value in vars(self).items():
            if torch.is_tensor(value):
                value = move(value)
            elif isinstance(value, tuple) and len(value) > 0 and all(torch.is_tensor(t) for t in value):
                value = tuple(move(tensor) for tensor in value)
            moved[name] = value
        return PackedBatch(**moved)


def grid_coords(shape: tuple[int, ...]) -> Tensor:
    """(prod(shape), len(shape)) row-major coordinates of every cell of a grid."""
    if len(shape) == 0:
        return torch.zeros(1, 0, dtype = torch.long)
    axes = [torch.arange(size) for size in shape]
    return torch.stack(torch.meshgrid(*axes, indexing = 'ij'), dim = -1).reshape(-1, len(shape))


def pack(samples: list[Sample], vocab: Vocab, wrap: bool = True, latent_dtype: torch.dtype = torch.float32) -> PackedBatch:
    """Lays out and concatenates samples. With `wrap = False` (language pretraining on raw
    text rows) no SOS / EOS is added and a sample may hold only text. Everything is built on
    the device of the samples' tensors. Every latent is cast to `latent_dtype`, one dtype for
    the whole batch chosen by the caller, never by the other samples (see `latents.latent_dtype`)."""

    num_types = vocab.num_modality_types
    device = samples[0][0].ids.device if isinstance(samples[0][0], Text) else samples[0][0].latent.device
    long = dict(dtype = torch.long, device = device)

    tokens, positions, spans, types, docs = [], [], [], [], []
    span_type, span_doc, span_rank, span_start, span_length, span_before_text = [], [], [], [], [], []
    latents = [[] for _ in range(num_types)]
    latent_span = [[] for _ in range(num_types)]
    latent_index = [[] for _ in range(num_types)]
    latent_coords = [[] for _ in range(num_types)]
    layout, span_records, raw = [], [], []

    offset = 0

    for doc, sample in enumerate(samples):
        position, rank = 0, 0
        records = []
        doc_start = offset

        def emit(ids: list[int] | Tensor, span = -1, modality_type = -1, shared_position = False):
            nonlocal offset, position
            ids = torch.as_tensor(ids, **long)
            length = ids.shape[0]
            tokens.append(ids)
            if shared_position:
                positions.append(torch.full((length,), position, **long))
                position += 1
            else:
                positions.append(torch.arange(position, position + length, device = device))
                position += length
            spans.append(torch.full((length,), span, **long))
            types.append(torch.full((length,), modality_type, **long))
            offset += length

        if wrap:
            emit([vocab.sos])

        for index, segment in enumerate(sample):
            if isinstance(segment, Text):
                records.append(SegmentRecord('text', offset, segment.ids.shape[0]))
                emit(segment.ids)
                continue

            assert isinstance(segment, Modality) and wrap, 'modalities need the SOS / EOS framing'
            m, shape, token_shape = segment.modality_type, segment.shape, segment.tokens_shape
            emit([vocab.meta, *vocab.encode_shape(shape), vocab.bom(m)])

            span_id = len(span_type)
            length, num_rows = math.prod(token_shape), math.prod(shape)
            records.append(SegmentRecord('modality', offset, length, m, shape, token_shape))
            span_records.append(records[-1])
            raw.append(segment.raw)

            span_type.append(m)
            span_doc.append(doc)
            span_rank.append(rank)
            rank += 1
            span_start.append(offset)
            span_length.append(length)
            following = sample[index + 1] if index + 1 < len(sample) else None
            span_before_text.append(isinstance(following, Text) and following.ids.numel() > 0)

            latents[m].append(segment.latent.reshape(num_rows, -1))
            latent_span[m].append(torch.full((num_rows,), span_id, **long))
            latent_index[m].append(torch.arange(offset, offset + length, device = device))
            latent_coords[m].append(grid_coords(token_shape).to(device))

            emit(torch.zeros(length, **long), span = span_id, modality_type = m, shared_position = True)
            emit([vocab.eom(m)])

        if wrap:
            emit([vocab.eos])

        if offset == doc_start:
            raise ValueError(f'sample {doc} is empty')

        docs.append(torch.full((offset - doc_start,), doc, **long))
        layout.append(tuple(records))

    tokens = torch.cat(tokens)
    doc = torch.cat(docs)
    span = torch.cat(spans)
    sample_lengths = tuple(len(d) for d in docs)
    lengths = torch.tensor(sample_lengths, **long)
    text_target = next_token_targets(tokens, doc, span, vocab)

    def cat_or_empty(parts, *shape, dtype = torch.long):
        return torch.cat(parts) if len(parts) > 0 else torch.zeros(0, *shape, dtype = dtype, device = device)

    return PackedBatch(
        tokens = tokens,
        doc = doc,
        position = torch.cat(positions),
        span = span,
        modality_type = torch.cat(types),
        text_target = text_target,
        text_index = text_positions(text_target),
        cu_seqlens = torch.cat((torch.zeros(1, **long), lengths.cumsum(0))),
        span_type = torch.tensor(span_type, **long),
        span_doc = torch.tensor(span_doc, **long),
        span_rank = torch.tensor(span_rank, **long),
        span_start = torch.tensor(span_start, **long),
        span_length = torch.tensor(span_length, **long),
        span_before_text = torch.tensor(span_before_text, dtype = torch.bool, device = device),
        latents = tuple(cat_or_empty([part.to(latent_dtype) for part in latents[m]], dim_of(latents[m]), dtype = latent_dtype) for m in range(num_types)),
        latent_span = tuple(cat_or_empty(latent_span[m]) for m in range(num_types)),
        latent_index = tuple(cat_or_empty(latent_index[m]) for m in range(num_types)),
        latent_coords = tuple(cat_coords(latent_coords[m], device) for m in range(num_types)),
        layout = tuple(layout),
        wrapped = wrap,
        sample_lengths = sample_lengths,
        span_records = tuple(span_records),
        raw = tuple(raw),
    )


def dim_of(parts: list[Tensor]) -> int:
    return parts[0].shape[-1] if len(parts) > 0 else 0


def cat_coords(parts: list[Tensor], device: torch.device) -> Tensor:
    """Concatenates coordinates of grids with possibly different numbers of axes (missing axes are 0)."""
    if len(parts) == 0:
        return torch.zeros(0, 0, dtype = torch.long, device = device)
    num_axes = max(part.shape[-1] for part in parts)
    return torch.cat([torch.nn.functional.pad(part, (0, num_axes - part.shape[-1])) for part in parts])


def is_predicted(tokens: Tensor, span: Tensor, vocab: Vocab) -> Tensor:
    """Which tokens the model must learn to produce by next-token prediction: text, META, shape
    digits, BOM and EOS. Not SOS (given), not latents (flow matching) and not EOM (the sampler
    closes a modality itself once its tokens are denoised)."""
    first_eom = vocab.eom(0)
    is_eom = (tokens >= first_eom) & ((tokens - first_eom) % 2 == 0)
    return (span < 0) & (tokens != vocab.sos) & ~is_eom


def next_token_targets(tokens: Tensor, doc: Tensor, span: Tensor, vocab: Vocab) -> Tensor:
    next_tokens = tokens.roll(-1)
    valid = is_predicted(tokens, span, vocab).roll(-1) & (doc == doc.roll(-1))
    valid[-1] = False
    return torch.where(valid, next_tokens, torch.full_like(tokens, IGNORE))


def text_positions(text_target: Tensor) -> Tensor:
    """(T,) the positions that predict a text token. Found here, where the batch is still on the
    host (`nonzero` has a data-dependent size, so on a GPU it waits for the device), and moved with
    the batch; whatever changes `text_target` sets it again."""
    return (text_target != IGNORE).nonzero().squeeze(-1)


def unpack(packed: PackedBatch, latents: tuple[Tensor, ...] | None = None) -> list[list]:
    """The inverse of `pack`: samples in the contract's list form, text as 1-d long tensors and
    modalities as `(modality_type, latent)` with channel-last latents of their original shape.
    `latents` replaces the packed latents (e.g. by a model's predictions) when given."""

    latents = packed.latents if latents is None else latents
    offsets = [0] * len(latents)
    samples = []

    for records in packed.layout:
        sample = []
        for record in records:
            if record.kind == 'text':
                sample.append(packed.tokens[record.start:record.start + record.length])
                continue
            m, start, num_rows = record.modality_type, offsets[record.modality_type], math.prod(record.shape)
            offsets[m] += num_rows
            values = latents[m][start:start + num_rows]
            sample.append((m, values.reshape(*record.shape, values.shape[-1])))
        samples.append(sample)

    return samples
