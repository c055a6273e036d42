"""A streaming, resumable loader over prepared folders: shards in, token-budget batches of
samples in the contract's list form out. The trainer sees the same interface as its
`TokenBudgetLoader` (`next_batch()`, `state_dict()`, `load_state_dict()`), never a file.

How a rank's batches are made:

- Slots. The rank's `num_workers` DataLoader workers (or the rank itself with none) are
  slots `rank * workers + worker` out of `world_size * workers`. Each epoch of a source, its
  shards are put in an order seeded by (seed, source, epoch), the samples of that order are
  cut into as many contiguous, near-equal runs as there are slots, and each slot reads its
  run: every sample is read once per epoch by one slot, whatever the numbers of ranks and
  workers, and a slot touches about 1 / slots of the shards.
- Shuffling. Within its run a slot permutes each shard's samples and passes them through a
  shuffle buffer (webdataset's `shuffle`); all of this is done on sample references, read
  from the shard only when the sample leaves the buffer, with a few shards open at a time,
  so memory does not grow with the data set.
- Mixing. Draw k of a slot picks a source with a probability set by the weights, from a hash
  of (seed, slot, k); each source runs its own epochs. Image-text folders and text-only
  folders mix this way (the realised mix is counted in the state).
- Batching. Today's rule (`training/data.py`): samples are taken in order while their
  lengths fit in `max_tokens`; none is cut or dropped; one longer than the budget is an error.
- Samples. An image-caption pair is caption-then-image (text to image) or, for a share
  `caption_fraction`, image-then-caption (captioning), drawn per sample and epoch; with a
  stochastic VAE the latent is a fresh `mean + std * noise` each epoch (Transfusion,
  Zhou et al., 2024, trains 80% text to image and 20% captioning).
- Position. A slot's state is (draws taken, each source's epoch and position, batches made);
  everything else follows from the seed, so resuming replays the reference stream up to the
  position without reading data. The main process keeps each slot's state as of the last
  batch it handed out, and how many it handed out, which says which worker is next; on
  resume the workers are rotated so that the order of batches is the same (the same on the
  standard DataLoader as torchdata's StatefulDataLoader gives, with no extra dependency).
  Per-batch noise is seeded by (epoch, global_index) with global_index = batch * slots + slot.
- Checks. A slot opens a shard checked against the manifest (`shards.Shard`): its SHA-256,
  hashed once per process, and its header's sample count, before any of its samples is read.
  A ShardError found in a worker is handed to the training process as a value and raised
  there, with its own one-line message.
- A stuck worker. A worker that gives no batch within `timeout` seconds (stopped, deadlocked,
  or waiting on a file system that does not answer) is `LoaderTimeout`, naming it; a worker
  that dies is reported by the DataLoader at once.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..training.data import Batch
from .shards import Prepared, Shard, ShardError


class SampleTooLong(ValueError):
    """A sample longer than the token budget of a batch: it fits in no batch."""


def mix64(*values: int) -> int:
    """A 64-bit hash of integers that is the same in every process (Python's str hash is not)."""
    return int.from_bytes(hashlib.blake2b(struct.pack(f'<{len(values)}q', *values), digest_size = 8).digest(), 'little') >> 1


@dataclass(kw_only = True)
class LoaderConfig:
    max_tokens: int                         # token budget of one batch on one rank
    seed: int = 0
    caption_fraction: float = 0.2           # share of image-caption pairs laid out image first (captioning)
    shuffle_buffer: int = 1000              # samples in each slot's shuffle buffer
    num_workers: int = 2                    # DataLoader workers per rank; 0 reads in the training process
    prefetch_factor: int = 4                # batches each worker keeps ready
    weights: tuple[float, ...] | None = None   # per source; None: proportional to their sizes
    open_shards: int = 4                    # shards a slot keeps open
    timeout: float = 300.                   # seconds to wait for a worker's batch before LoaderTimeout (0: forever; no workers: none)

    def __post_init__(self):
        if not 0. <= self.caption_fraction <= 1.:
            raise ValueError(f'caption_fraction must lie in [0, 1], got {self.caption_fraction}')
        if not (self.timeout >= 0 and math.isfinite(self.timeout)):
            raise ValueError(f'timeout must be a number of seconds >= 0 (0: wait forever), got {self.timeout}')
        for name in ('max_tokens', 'shuffle_buffer', 'prefetch_factor', 'open_shards'):
            if getattr(self, name) <= 0:
                raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
        if self.num_workers < 0:
            raise ValueError(f'num_workers must be >= 0, got {self.num_workers}')


@dataclass
class Source:
    """A prepared folder as the slots see it: its shard paths, sizes and SHA-256 sums (as its
    manifest gives them) and its kind."""
    name: str
    paths: list[Path]
    sizes: list[int]
    digests: list[str]
    is_text: bool
    stochastic: bool

    @classmethod
    def of(cls, prepared: Prepared) -> Source:
        codec = prepared.codec or {}
        return cls(str(prepared.folder), prepared.shard_paths(), prepared.shard_sizes(), prepared.shard_digests(), prepared.kind == 'text',
                   bool(codec.get('stochastic')))


def slot_runs(sizes: list[int], order: list[int], slot: int, num_slots: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) pieces of this slot's contiguous share of the shards' samples in `order`."""
    total = sum(sizes)
    first, last = total * slot // num_slots, total * (slot + 1) // num_slots
    runs, offset = [], 0
    for shard in order:
        start, stop = max(first, offset), min(last, offset + sizes[shard])
        if start < stop:
            runs.append((shard, start - offset, stop - offset))
        offset += sizes[shard]
    return runs


def epoch_references(source: Source, source_index: int, epoch: int, slot: int, num_slots: int, seed: int, buffer: int):
    """The (shard, sample) references of one slot's epoch of one source, shuffled: shard order,
    a permutation within each shard, then a shuffle buffer. Reads no data."""
    rng = random.Random(mix64(seed, source_index, epoch, slot, 1))
    order = list(range(len(source.sizes)))
    random.Random(mix64(seed, source_index, epoch, 0)).shuffle(order)       # the same on every slot
    pending = []
    for shard, start, stop in slot_runs(source.sizes, order, slot, num_slots):
        within = list(range(start, stop))
        rng.shuffle(within)
        for sample in within:
            if len(pending) < buffer:
                pending.append((shard, sample))
                continue
            pick = rng.randrange(buffer)
            yield pending[pick]
            pending[pick] = (shard, sample)
    rng.shuffle(pending)
    yield from pending


@dataclass
class SourceState:
    epoch: int = 0
    position: int = 0           # references of this epoch taken
    taken: int = 0              # samples taken in all, for the realised mix


@dataclass
class SlotState:
    draws: int = 0
    batches: int = 0
    sources: list[SourceState] = field(default_factory = list)

    def to_dict(self) -> dict:
        return dict(draws = self.draws, batches = self.batches, sources = [vars(s).copy() for s in self.sources])

    @classmethod
    def from_dict(cls, state: dict) -> SlotState:
        return cls(state['draws'], state['batches'], [SourceState(**s) for s in state['sources']])


class SourceCursor:
    """One source's reference stream in one slot, with a peek and the epoch roll-over."""

    def __init__(self, stream: SlotStream, index: int, state: SourceState):
        self.stream, self.index, self.state = stream, index, state
        self.references, self.head = None, None
        self.start_epoch()
        for _ in range(state.position):             # replay to the saved position (no data read)
            next(self.references)

    def start_epoch(self):
        s = self.stream
        self.references = epoch_references(s.sources[self.index], self.index, self.state.epoch, s.slot, s.num_slots, s.config.seed,
                                           s.config.shuffle_buffer)

    def peek(self) -> tuple[int, int]:
        if self.head is None:
            self.head = next(self.references, None)
            if self.head is None:                   # the epoch is over: the next one
                self.state.epoch, self.state.position = self.state.epoch + 1, 0
                self.start_epoch()
                self.head = next(self.references, None)
                if self.head is None:
                    raise RuntimeError(f'source {self.stream.sources[self.index].name} gives slot {self.stream.slot} no samples')
        return self.head

    def take(self):
        self.head = None
        self.state.position += 1
        self.state.taken += 1


class SlotStream(torch.utils.data.IterableDataset):
    """The batches of the slots of one rank: each DataLoader worker runs one slot (rotated on
    resume, see the module docstring); yields (Batch, slot, the slot's state after it)."""

    def __init__(self, sources: list[Source], weights: list[float], modality_tokens: dict[tuple, int], config: LoaderConfig,
                 rank: int, world_size: int):
        super().__init__()
        self.sources, self.weights, self.modality_tokens, self.config = sources, weights, modality_tokens, config
        self.workers = max(1, config.num_workers)
        self.rank, self.num_slots = rank, world_size * self.workers
        self.cumulative = [sum(weights[:i + 1]) / sum(weights) for i in range(len(weights))]
        self.states = {}            # slot within the rank -> SlotState to start from
        self.rotation = 0           # on resume: the first worker runs the slot that was next
        self.slot = None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        local = ((info.id if info is not None else 0) + self.rotation) % self.workers
        self.slot = self.rank * self.workers + local
        state = self.states.get(local) or SlotState(sources = [SourceState() for _ in self.sources])
        state = SlotState.from_dict(state.to_dict())
        cursors = [SourceCursor(self, i, s) for i, s in enumerate(state.sources)]
        shards = OrderedDict()
        while True:
            try:
                batch = self.next_batch(state, cursors, shards)
            except ShardError as error:
                if info is None:
                    raise
                # handed to the training process as it is (`StreamingLoader.next_batch` raises it):
                # torch would raise there a new ShardError whose message is this worker's traceback
                yield error, local, None
                return
            if info is not None:                # to the training process as two tensors, not two per sample
                batch.samples = PackedSamples.of(batch.samples)
            yield batch, local, state.to_dict()

    def choose(self, draw: int) -> int:
        if len(self.sources) == 1:
            return 0
        u = mix64(self.config.seed, self.slot, draw, 2) / 2 ** 63
        return min(bisect.bisect_right(self.cumulative, u), len(self.sources) - 1)

    def shard(self, shards: OrderedDict, source: int, index: int) -> Shard:
        key = (source, index)
        if key not in shards:
            if len(shards) >= self.config.open_shards:
                shards.popitem(last = False)[1].close()
            s = self.sources[source]          # checked against the manifest before any sample is read
            shards[key] = Shard(s.paths[index], sha256 = s.digests[index], samples = s.sizes[index]).open()
        shards.move_to_end(key)
        return shards[key]

    def length(self, entry: dict) -> int:
        """The sample's length in the packed sequence: SOS, text, the modality with its header, EOS."""
        return 2 + entry['text_tokens'] + (self.modality_tokens[tuple(entry['shape'])] if entry['shape'] is not None else 0)

    def next_batch(self, state: SlotState, cursors: list[SourceCursor], shards: OrderedDict) -> Batch:
        samples, keys, used = [], [], 0
        first_epoch = cursors[0].state.epoch
        while True:
            cursor = cursors[self.choose(state.draws)]
            shard_index, sample = cursor.peek()
            shard = self.shard(shards, cursor.index, shard_index)
            entry = shard.samples[sample]
            length = self.length(entry)
            if length > self.config.max_tokens:
                raise SampleTooLong(f"sample {entry['key']} of {self.sources[cursor.index].name} has {length} tokens, "
                                 f'more than the budget of max_tokens = {self.config.max_tokens}')
            if samples and used + length > self.config.max_tokens:
                break
            samples.append(self.materialize(cursor.index, cursor.state.epoch, shard, sample, entry))     # while its shard is open
            keys.append(f"{self.sources[cursor.index].name}:{entry['key']}")
            used += length
            cursor.take()
            state.draws += 1
        global_index = state.batches * self.num_slots + self.slot
        state.batches += 1
        return Batch(samples = samples, indices = keys, num_tokens = used, epoch = first_epoch, global_index = global_index)

    def materialize(self, source: int, epoch: int, shard: Shard, sample: int, entry: dict) -> list:
        tensors = shard.tensors(sample)
        text = tensors['text']
        if self.sources[source].is_text:
            return [text]
        generator = torch.Generator().manual_seed(mix64(self.config.seed, source, epoch, hash_key(entry['key']), 3))
        latent = tensors['mean']
        if 'std' in tensors:
            latent = latent + tensors['std'] * torch.randn(latent.shape, generator = generator)
        if text.numel() == 0:
            return [latent]
        captioning = float(torch.rand((), generator = generator)) < self.config.caption_fraction
        return [latent, text] if captioning else [text, latent]


@dataclass
class PackedSamples:
    """A batch's samples as one tensor of text ids and one of latents, flattened and concatenated.
    Each tensor a worker sends goes through its own shared-memory file, which costs about a
    millisecond; a batch of 20 samples as 40 tensors took longer to send than to make."""
    ids: torch.Tensor
    latents: torch.Tensor
    layout: list[list[tuple[bool, tuple[int, ...]]]]       # per sample, per element: (is a latent, shape)

    @classmethod
    def of(cls, samples: list[list[torch.Tensor]]) -> PackedSamples:
        elements = [t for sample in samples for t in sample]
        ids = [t.reshape(-1) for t in elements if not t.is_floating_point()]
        latents = [t.reshape(-1) for t in elements if t.is_floating_point()]
        return cls(torch.cat(ids) if ids else torch.zeros(0, dtype = torch.long),
                   torch.cat(latents) if latents else torch.zeros(0),
                   [[(t.is_floating_point(), tuple(t.shape)) for t in sample] for sample in samples])

    def unpack(self) -> list[list[torch.Tensor]]:
        """The samples again, as views of the two tensors."""
        offsets, samples = {False: 0, True: 0}, []
        for layout in self.layout:
            sample = []
            for is_latent, shape in layout:
                flat, start = (self.latents if is_latent else self.ids), offsets[is_latent]
                size = math.prod(shape)
                sample.append(flat[start:start + size].view(shape))
                offsets[is_latent] = start + size
            samples.append(sample)
        return samples


def hash_key(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size = 8).digest(), 'little') >> 1


def identity(batch):
    return batch


def modality_tokens_of(model) -> Callable[[tuple], int]:
    """shape -> tokens an image latent of that shape takes in the packed sequence (META, shape
    digits, BOM, the latent tokens, EOM), as the model lays it out."""
    from ..training.data import packed_num_tokens
    count, dim = packed_num_tokens(model), model.config.dim_latent[0]
    return lambda shape: count([torch.zeros(*shape, dim)]) - 2


def check_sources(prepared: list[Prepared], tokenizer: dict | None = None, codec: dict | None = None) -> tuple[dict, dict | None]:
    """All folders tokenized alike and (image folders) encoded alike, and as `tokenizer` /
    `codec` when given (what a run was made with). Returns the tokenizer and codec descriptions."""
    from . import codecs, tokenizers
    images = [p for p in prepared if p.kind != 'text']
    tokenizer_from = 'this run' if tokenizer is not None else f'the data in {prepared[0].folder}'
    codec_from = 'this run' if codec is not None else (f'the data in {images[0].folder}' if images else None)
    tokenizer = tokenizer or prepared[0].tokenizer
    codec = codec or (images[0].codec if images else None)
    for p in prepared:
        tokenizers.check_same(tokenizer, p.tokenizer, tokenizer_from, f'the data in {p.folder}')
    for p in images:
        codecs.check_same(codec, p.codec, codec_from, f'the data in {p.folder}')
    return tokenizer, codec


class KindNotTrainable(ShardError):
    """A prepared folder of a kind that training does not read yet (interleaved documents, edits)."""


def refuse_untrainable(prepared: Prepared):
    if prepared.kind not in ('image_text', 'text'):
        raise KindNotTrainable(f'{prepared.folder} holds {prepared.kind} samples: training on {prepared.kind} data is not supported yet '
                               f'(image-caption and text folders are)')


class LoaderTimeout(RuntimeError):
    """A DataLoader worker gave no batch within `LoaderConfig.timeout`: it is stuck."""


class StreamingLoader:
    """The trainer's loader over prepared folders (see the module docstring). `modality_tokens`
    maps a latent shape to its tokens in the packed sequence (`modality_tokens_of(model)`)."""

    def __init__(self, folders: list, modality_tokens: Callable[[tuple], int], config: LoaderConfig, *, rank: int = 0, world_size: int = 1,
                 tokenizer: dict | None = None, codec: dict | None = None):
        prepared = [f if isinstance(f, Prepared) else Prepared(f) for f in folders]
        if not prepared:
            raise ValueError('give at least one prepared data folder')
        for p in prepared:
            refuse_untrainable(p)
        self.tokenizer, self.codec = check_sources(prepared, tokenizer, codec)
        self.config, self.rank, self.world_size = config, rank, world_size
        weights = list(config.weights) if config.weights is not None else [float(p.num_samples) for p in prepared]
        if len(weights) != len(prepared) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f'weights must be one non-negative number per data folder ({len(prepared)}), not all zero; got {config.weights}')
        self.names, self.weights = [str(p.folder) for p in prepared], weights

        num_slots = world_size * max(1, config.num_workers)
        shapes = {}
        for p in prepared:
            if p.num_samples < num_slots:
                raise ValueError(f'{p.folder} has {p.num_samples} samples, fewer than the {num_slots} readers '
                                 f'({world_size} ranks x {max(1, config.num_workers)} workers): use fewer workers')
            for name, stats in p.manifest['shapes'].items():
                shape = None if name == 'text' else tuple(int(n) for n in name.split('x'))
                if shape is not None and shape not in shapes:
                    shapes[shape] = modality_tokens(shape)
                longest = 2 + stats['max_text_tokens'] + (shapes[shape] if shape is not None else 0)
                if longest > config.max_tokens:
                    raise SampleTooLong(f"sample {stats['longest']} of {p.folder} has {longest} tokens, more than the budget of "
                                     f'max_tokens = {config.max_tokens}: raise max_tokens, or prepare with a smaller image size or shorter texts')
        self.stream = SlotStream([Source.of(p) for p in prepared], weights, shapes, config, rank, world_size)
        self.slots, self.consumed, self.iterator, self.started = {}, 0, None, 0

    def batches(self):
        if self.iterator is None:
            self.stream.states = {local: SlotState.from_dict(state) for local, state in self.slots.items()}
            self.stream.rotation = self.consumed % self.stream.workers
            self.started = self.consumed
            if self.config.num_workers == 0:
                self.iterator = iter(self.stream)
            else:
                self.iterator = iter(torch.utils.data.DataLoader(
                    self.stream, batch_size = None, collate_fn = identity, num_workers = self.config.num_workers,
                    prefetch_factor = self.config.prefetch_factor, timeout = self.config.timeout))
        return self.iterator

    def next_batch(self) -> Batch:
        try:
            batch, local, state = next(self.batches())
        except RuntimeError as error:
            if 'DataLoader timed out' not in str(error):
                raise
            raise LoaderTimeout(self.timeout_message()) from None
        if isinstance(batch, ShardError):               # a damaged shard, found in a worker
            self.close()
            raise batch
        if isinstance(batch.samples, PackedSamples):
            batch.samples = batch.samples.unpack()
        self.slots[local] = state
        self.consumed += 1
        return batch

    def sample_name(self, index: str) -> str:
        """How errors name a sample of a batch, from its `Batch.indices` entry ('folder:key'): its
        key, folder and shard file (found by reading the shards' headers, only when asked)."""
        source = next((s for s in self.stream.sources if index.startswith(s.name + ':')), None)
        if source is None:
            return f'sample {index!r}'
        key = index[len(source.name) + 1:]
        for path in source.paths:
            with Shard(path) as shard:
                if any(entry['key'] == key for entry in shard.samples):
                    return f'sample {key!r} of {source.name} (in {path.name})'
        return f'sample {key!r} of {source.name}'

    def timeout_message(self) -> str:
        """Which worker was waited for: the DataLoader takes batches from its workers in turn."""
        worker = (self.consumed - self.started) % self.config.num_workers
        processes = getattr(self.iterator, '_workers', None)        # the DataLoader's worker processes, for their pids
        pid = f', pid {processes[worker].pid}' if processes else ''
        rank = f'rank {self.rank}: ' if self.world_size > 1 else ''
        return (f'{rank}DataLoader worker {worker}{pid} gave no batch in {self.config.timeout:g} s (the loader timeout): it is stuck '
                f'(stopped, deadlocked, or waiting on a file system that does not answer). Look at that process and the storage of '
                f'{", ".join(self.names)}, then rerun to resume from the last checkpoint; if reading is only slow, raise the timeout '
                f'(LoaderConfig.timeout; the image_text job\'s loader_timeout)')

    def mix(self) -> dict[str, float]:
        """The share of samples each folder has given so far (this rank)."""
        taken = [sum(slot['sources'][i]['taken'] for slot in self.slots.values()) for i in range(len(self.names))]
        return {name: count / max(1, sum(taken)) for name, count in zip(self.names, taken)}

    def state_dict(self) -> dict:
        """This rank's position: each rank has its own (its slots' batches hold different numbers
        of samples), and a checkpoint keeps every rank's."""
        return dict(kind = 'streaming', seed = self.config.seed, rank = self.rank, world_size = self.world_size,
                    num_workers = self.config.num_workers, sources = self.names, weights = self.weights, consumed = self.consumed,
                    slots = {local: dict(state) for local, state in self.slots.items()})

    def load_state_dict(self, state: dict):
        """Resumes from a position saved by the same rank of a run with the same world size,
        workers, seed and weights; another is refused (positions are not re-split)."""
        if state.get('kind') != 'streaming':
            raise ValueError('the data position was saved by another kind of loader (an in-memory dataset), not from prepared folders')
        mine = self.state_dict()
        for key in ('seed', 'world_size', 'num_workers', 'weights'):
            if state[key] != mine[key]:
                raise ValueError(f'the data position was saved with {key} = {state[key]}; this loader has {key} = {mine[key]}: '
                                 f'resume with the same setting')
        if state.get('rank', 0) != self.rank:       # saved before positions carried their rank: rank 0's
            raise ValueError(f"the data position is rank {state.get('rank', 0)}'s, and this loader is rank {self.rank}'s: "
                             f'each rank resumes from its own position (one saved before each rank\'s position was kept '
                             f'holds rank 0\'s only)')
        if len(state['sources']) != len(self.names):
            raise ValueError(f'the data position was saved over {len(state["sources"])} data folders; this loader has {len(self.names)}')
        self.close()
        self.consumed, self.slots = state['consumed'], {int(k): v for k, v in state['slots'].items()}

    def close(self):
        """Stops the workers (dropping the DataLoader iterator shuts them down); a next batch
        starts them again from the current position."""
        self.iterator = None
