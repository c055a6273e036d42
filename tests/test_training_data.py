import random

import pytest
import torch

from transfusion_pytorch.training import TokenBudgetLoader, packed_num_tokens

from conftest import DIM_LATENTS, random_sample, tiny_model


pytestmark = pytest.mark.usefixtures('one_thread')     # tiny models: one thread is fastest (conftest)

class ListDataset:
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def dataset(size = 37, seed = 0):
    rng = random.Random(seed)
    return ListDataset([random_sample(rng) for _ in range(size)])


def epoch_of(loader):
    """This rank's batches of the loader's current epoch."""
    return [loader.next_batch() for _ in range(len(loader))]


def test_token_count_is_the_packed_length():
    model = tiny_model()
    sample = [torch.tensor([1, 2, 3]), (0, torch.randn(4, DIM_LATENTS[0])), (1, torch.randn(2, 3, DIM_LATENTS[1])), torch.tensor([5])]
    # SOS + 3 text + (META '4' BOM 4 latents EOM) + (META '2' ',' '3' BOM 6 latents EOM) + 1 text + EOS
    assert packed_num_tokens(model)(sample) == 1 + 3 + (1 + 1 + 1 + 4 + 1) + (1 + 3 + 1 + 6 + 1) + 1 + 1


@pytest.mark.parametrize('world_size, multiple_of', [(1, 1), (2, 1), (3, 2)])
def test_every_sample_once_per_epoch_across_ranks_and_never_cut(world_size, multiple_of):
    data, count = dataset(), packed_num_tokens(tiny_model())
    lengths = [count(sample) for sample in data.samples]
    loaders = [TokenBudgetLoader(data, 60, count, seed = 3, rank = r, world_size = world_size, multiple_of = multiple_of) for r in range(world_size)]

    for epoch in range(2):
        seen = []
        per_rank = [epoch_of(loader) for loader in loaders]
        assert len({len(batches) for batches in per_rank}) == 1, 'ranks must take the same number of batches'
        assert len(per_rank[0]) % multiple_of == 0
        for batches in per_rank:
            for batch in batches:
                assert batch.epoch == epoch
                assert batch.num_tokens == sum(lengths[i] for i in batch.indices) <= 60
                for index, sample in zip(batch.indices, batch.samples):
                    assert sample is data.samples[index]            # whole samples, untouched
                seen.extend(batch.indices)
        assert sorted(seen) == list(range(len(data)))


def test_shuffle_is_deterministic_by_seed_and_differs_by_epoch():
    data, count = dataset(), packed_num_tokens(tiny_model())
    first = TokenBudgetLoader(data, 60, count, seed = 1)
    second = TokenBudgetLoader(data, 60, count, seed = 1)
    assert first.global_batches(0) == second.global_batches(0)
    assert first.global_batches(0) != first.global_batches(1)
    assert first.global_batches(0) != TokenBudgetLoader(data, 60, count, seed = 2).global_batches(0)


def test_a_sample_longer_than_the_budget_is_an_error_naming_it():
    data = dataset(10)
    data.samples[7] = [torch.randint(0, 10, (100,))]
    with pytest.raises(ValueError, match = 'sample 7 has 102 tokens'):
        TokenBudgetLoader(data, 60, packed_num_tokens(tiny_model()))


def test_position_resumes_exactly():
    data, count = dataset(), packed_num_tokens(tiny_model())
    loader = TokenBudgetLoader(data, 60, count, seed = 5, rank = 1, world_size = 2)
    first = len(loader) + 3
    for _ in range(first):                          # into the second epoch
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch().indices for _ in range(len(loader) + 2)]

    resumed = TokenBudgetLoader(data, 60, count, seed = 5, rank = 1, world_size = 2)
    resumed.load_state_dict(state)
    assert [resumed.next_batch().indices for _ in range(len(expected))] == expected

    with pytest.raises(ValueError, match = 'world_size'):
        TokenBudgetLoader(data, 60, count, seed = 5).load_state_dict(state)
    # every rank is at the same position (the ranks take the same number of batches), and each resumes from its own
    other = TokenBudgetLoader(data, 60, count, seed = 5, rank = 0, world_size = 2)
    for _ in range(first + len(expected)):          # as far as `resumed`
        other.next_batch()
    assert dict(other.state_dict(), rank = 1) == resumed.state_dict()
    with pytest.raises(ValueError, match = "the data position is rank 1's, and this loader is rank 0's"):
        TokenBudgetLoader(data, 60, count, seed = 5, rank = 0, world_size = 2).load_state_dict(state)


# a bad value in the data is named by its place in the data, not in a batch

def nan_at(dataset: ListDataset, index: int) -> ListDataset:
    """A copy of `dataset` whose sample `index` gets a NaN in its first modality."""
    samples = [list(sample) for sample in dataset.samples]
    position = next(i for i, element in enumerate(samples[index]) if isinstance(element, tuple))
    modality_type, latent = samples[index][position]
    latent = latent.clone()
    latent.view(-1)[0] = float('nan')
    samples[index][position] = (modality_type, latent)
    return ListDataset(samples), position


def test_a_nan_in_an_in_memory_dataset_is_named_by_its_dataset_index(tmp_path):
    from transfusion_pytorch.training import TrainConfig, Trainer
    from transfusion_pytorch.training.data import SampleError
    data = dataset(20, seed = 3)
    index = next(i for i in range(7, 20) if any(isinstance(e, tuple) for e in data.samples[i]))
    bad, position = nan_at(data, index)
    config = TrainConfig(out_dir = str(tmp_path), max_steps = 2, max_tokens = 400, ema_beta = None, checkpoint_every = 100)
    with pytest.raises(SampleError, match = rf'^sample {index} of the dataset: `sample\[{position}\]`: modality values must be finite'):
        Trainer(tiny_model(), bad, config)


class Measured(ListDataset):
    """A dataset that knows its samples' lengths, so that the loader packs none of them before training."""
    def __init__(self, samples, lengths):
        super().__init__(samples)
        self.lengths = lengths

    def num_tokens(self, index):
        return self.lengths[index]


def test_a_nan_met_in_training_is_named_by_its_dataset_index(tmp_path):
    from transfusion_pytorch.training import TrainConfig, Trainer
    from transfusion_pytorch.training.data import SampleError
    model = tiny_model()
    data = dataset(20, seed = 3)
    index = next(i for i in range(7, 20) if any(isinstance(e, tuple) for e in data.samples[i]))
    bad, position = nan_at(data, index)
    config = TrainConfig(out_dir = str(tmp_path), max_steps = 10, max_tokens = 4000, ema_beta = None, checkpoint_every = 100)
    with pytest.raises(SampleError, match = rf'^sample {index} of the dataset: `sample\[{position}\]`: modality values must be finite'):
        Trainer(model, Measured(bad.samples, [packed_num_tokens(model)(s) for s in data.samples]), config).train()
