"""Training data: a dataset protocol and a loader that batches samples by a token budget.

A dataset is anything with `len(dataset)` and `dataset[index]` returning one sample in the
contract's list form (text as 1-d long tensors, modalities as float tensors or
`(modality_type, tensor)` tuples). It may also offer `num_tokens(index)`, the sample's length
in the packed sequence, when that is cheap to know; otherwise the loader packs each sample
once (`packed_num_tokens`) to learn it.

Each epoch, the loader

1. shuffles the indices with a generator seeded by `seed + epoch` (as `DistributedSampler`);
2. walks them in that order, closing a batch when the next sample would exceed `max_tokens`.
   Samples are never cut or dropped; one longer than the budget on its own is an error;
3. splits the largest batches in two until their number is a multiple of
   `world_size * multiple_of`, so that every rank takes the same number of optimizer steps;
4. deals the batches out round robin: rank r gets global batches r, r + W, r + 2W, ...

So the ranks together see every sample exactly once per epoch, and global batch g is the same
whatever the number of ranks (for equal `world_size * multiple_of`). The position, (epoch,
batches taken this epoch), is all the state there is: `state_dict` / `load_state_dict` resume
it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from ..packing import pack


@runtime_checkable
class SampleDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> list: ...


def packed_num_tokens(model) -> Callable[[list], int]:
    """A sample's length as the model lays it out (SOS, text, META, shape digits, BOM, latents,
    EOM, ..., EOS), found by packing it alone. Runs the model's encoders."""
    def count(sample: list) -> int:
        samples, wrap = model.to_samples([sample])
        return pack(samples, model.vocab, wrap = wrap).num_tokens
    return count


@dataclass
class Batch:
    samples: list[list]     # in the contract's list form, ready for `model(samples)`
    indices: list[int | str]    # their indices in the dataset (a streaming loader gives keys)
    num_tokens: int         # their total length in the packed sequence
    epoch: int
    global_index: int       # index of this batch among all ranks' batches of the epoch


class SampleError(ValueError):
    """A sample of the data that the model refuses, named by its place in the data (its dataset
    index, or its folder, shard and key) rather than by its position in a batch."""


def in_the_data(error: Exception, indices: list, describe: Callable[[object], str] | None = None) -> SampleError | None:
    """`error`, raised by the model's input checks about `modalities[i]` of a batch whose
    samples are `indices` in the data, retold about that sample (`describe(index)`: how the
    loader names it, its `sample_name`); None for an error that is not about one sample."""
    position = getattr(error, 'sample_index', None)
    if position is None:
        return None
    index = indices[position]
    name = describe(index) if describe is not None else f'sample {index!r}'
    return SampleError(f"{name}: {str(error).replace(f'`modalities[{position}]', '`sample')}")


def plan_batches(lengths: Sequence[int], order: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy batches of consecutive indices of `order` whose lengths sum to at most `max_tokens`
    (each length is at most `max_tokens`; the loader checks)."""
    batches, current, used = [], [], 0
    for index in order:
        if current and used + lengths[index] > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(index)
        used += lengths[index]
    if current:
        batches.append(current)
    return batches


def split_to_multiple(batches: list[list[int]], multiple: int) -> list[list[int]]:
    """Splits the largest batch (first one on ties) in two until the count is a multiple of `multiple`."""
    batches = list(batches)
    while len(batches) % multiple != 0:
        largest = max(range(len(batches)), key = lambda b: len(batches[b]))
        if len(batches[largest]) < 2:
            raise ValueError(f'{sum(map(len, batches))} samples cannot make a multiple of {multiple} batches (world size x gradient accumulation)')
        half = len(batches[largest]) // 2
        batches[largest:largest + 1] = [batches[largest][:half], batches[largest][half:]]
    return batches


class TokenBudgetLoader:
    def __init__(
        self,
        dataset: SampleDataset,
        max_tokens: int,
        num_tokens: Callable[[list], int] | None = None,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        multiple_of: int = 1,
        shuffle: bool = True,
    ):
        if len(dataset) == 0:
            raise ValueError('the dataset is empty')
        self.dataset, self.max_tokens, self.seed, self.shuffle = dataset, max_tokens, seed, shuffle
        self.rank, self.world_size, self.multiple_of = rank, world_size, multiple_of

        if hasattr(dataset, 'num_tokens'):
            self.lengths = [int(dataset.num_tokens(i)) for i in range(len(dataset))]
        elif num_tokens is not None:
            self.lengths = [self.measure(num_tokens, i) for i in range(len(dataset))]
        else:
            raise ValueError('give `num_tokens` (e.g. `packed_num_tokens(model)`) or a dataset with a `num_tokens(index)` method')

        for index, length in enumerate(self.lengths):
            if length > max_tokens:
                raise ValueError(f'sample {index} has {length} tokens, more than the budget of max_tokens = {max_tokens}')

        self.epoch, self.position = 0, 0
        self._plan_epoch = None

    def measure(self, num_tokens: Callable[[list], int], index: int) -> int:
        """The length of sample `index`, packed alone; a sample the model refuses is named by its index."""
        try:
            return int(num_tokens(self.dataset[index]))
        except (TypeError, ValueError) as error:
            retold = in_the_data(error, [index], self.sample_name)
            if retold is None:
                raise
            raise retold from None

    @staticmethod
    def sample_name(index: int) -> str:
        """How errors name the sample at `index` of the dataset."""
        return f'sample {index} of the dataset'

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of an epoch, as dataset indices."""
        if self.shuffle:
            order = torch.randperm(len(self.dataset), generator = torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(len(self.dataset)))
        return split_to_multiple(plan_batches(self.lengths, order, self.max_tokens), self.world_size * self.multiple_of)

    def local_batches(self, epoch: int) -> list[list[int]]:
        """This rank's share, each batch with its global index."""
        if self._plan_epoch != epoch:
            self._plan = self.global_batches(epoch)[self.rank::self.world_size]
            self._plan_epoch = epoch
        return self._plan

    def __len__(self) -> int:
        """Batches this rank takes in the current epoch."""
        return len(self.local_batches(self.epoch))

    def next_batch(self) -> Batch:
        """This rank's next batch; rolls over into the next epoch at the end of one."""
        if self.position >= len(self.local_batches(self.epoch)):
            self.epoch, self.position = self.epoch + 1, 0
        indices = self.local_batches(self.epoch)[self.position]
        batch = Batch(
            samples = [self.dataset[i] for i in indices],
            indices = list(indices),
            num_tokens = sum(self.lengths[i] for i in indices),
            epoch = self.epoch,
            global_index = self.position * self.world_size + self.rank,
        )
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return dict(epoch = self.epoch, position = self.position, seed = self.seed, rank = self.rank, world_size = self.world_size)

    def load_state_dict(self, state: dict):
        """Every rank is at the same (epoch, position): each epoch's batches are split into a
        multiple of `world_size`. A position of another world size or seed is refused."""
        if state['world_size'] != self.world_size or state['seed'] != self.seed:
            raise ValueError(f'the data position was saved with world_size {state["world_size"]} and seed {state["seed"]}; '
                             f'this loader has world_size {self.world_size} and seed {self.seed}')
        if state.get('rank', self.rank) != self.rank:
            raise ValueError(f"the data position is rank {state['rank']}'s, and this loader is rank {self.rank}'s")
        self.epoch, self.position = state['epoch'], state['position']
