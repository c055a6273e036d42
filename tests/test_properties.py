"""Property-based tests over random mixed batches (hypothesis).

Each case is a batch of 1-4 samples, each a random interleaving of text runs (0 to 5 tokens)
and modalities of four types: a zero-dim type (shape `()`), a 1-axis and a 2-axis type, and
a type of any number of axes (0 to 2, no `modality_num_dim`). For each case:

- packing then unpacking returns the inputs;
- the attention mask (flat and padded) equals the slow reference;
- with fixed per-sample noise and times, each sample's loss is the same alone and inside the
  batch, at any position;
- a sample's loss does not change when another sample of the batch changes.

The structure of a case (lengths, types, shapes, order) is drawn by hypothesis; the values of
its tensors come from a seed it draws, so shrinking works on the structure. Settings are
derandomized (no example database), so CI runs the same cases every time.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from transfusion_pytorch import Transfusion
from transfusion_pytorch.masks import dense_mask, padded_layout
from transfusion_pytorch.packing import unpack

from reference import reference_mask

NUM_TEXT = 16
DIM_LATENTS = (3, 4, 5, 2)
DEFAULT_SHAPES = ((), (2,), (2, 2), None)   # zero-dim, 1 axis, 2 axes, any number of axes

SETTINGS = settings(
    max_examples = 200, deadline = None, derandomize = True, database = None, print_blob = True,
    suppress_health_check = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

torch.manual_seed(0)
MODEL = Transfusion(
    num_text_tokens = NUM_TEXT,
    dim_latent = DIM_LATENTS,
    modality_default_shape = DEFAULT_SHAPES,
    transformer = dict(dim = 16, depth = 2, dim_head = 8, heads = 2, dim_time = 16),
).eval()

# the zero-initialised parts (adaLN-zero, skips) perturbed, so that times and every layer matter
with torch.no_grad():
    for parameter in MODEL.parameters():
        parameter.add_(torch.randn_like(parameter) * 0.1)


pytestmark = pytest.mark.usefixtures('one_thread')     # tiny models: one thread is fastest (conftest)


# strategies: the structure of a batch, then tensors from a seed

sizes = st.integers(1, 3)

@st.composite
def modality_spec(draw):
    m = draw(st.integers(0, len(DIM_LATENTS) - 1))
    default = DEFAULT_SHAPES[m]
    num_axes = len(default) if default is not None else draw(st.integers(0, 2))
    return ('modality', m, tuple(draw(sizes) for _ in range(num_axes)))


text_spec = st.integers(0, 5).map(lambda n: ('text', n))
element_spec = st.one_of(text_spec, modality_spec())
sample_spec = st.lists(element_spec, min_size = 1, max_size = 5)
batch_spec = st.lists(sample_spec, min_size = 1, max_size = 4)
seeds = st.integers(0, 2 ** 31 - 1)


def realise(spec: list, seed: int) -> list:
    """A sample spec -> a sample in the contract's list form."""
    generator = torch.Generator().manual_seed(seed)
    sample = []
    for element in spec:
        if element[0] == 'text':
            sample.append(torch.randint(0, NUM_TEXT, (element[1],), generator = generator))
        else:
            _, m, shape = element
            sample.append((m, torch.randn(*shape, DIM_LATENTS[m], generator = generator)))
    return sample


def realise_batch(specs: list, seed: int) -> list:
    return [realise(spec, seed + index) for index, spec in enumerate(specs)]


def noise_and_times(sample: list, seed: int) -> tuple[list, list]:
    """Fixed per-sample noise (one (rows, dim_latent) tensor per type) and a time per modality."""
    generator = torch.Generator().manual_seed(seed + 10_000)
    noise = [[] for _ in DIM_LATENTS]
    times = []
    for element in sample:
        if isinstance(element, tuple):
            m, latent = element
            noise[m].append(torch.randn(math.prod(latent.shape[:-1]), DIM_LATENTS[m], generator = generator))
            times.append(float(torch.rand((), generator = generator)))
    noise = [torch.cat(n) if n else torch.zeros(0, d) for n, d in zip(noise, DIM_LATENTS)]
    return noise, times


def per_sample_losses(batch: list, noise: list, times: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample text loss, per-sample flow loss) of a batch, with the given per-sample noise and times."""
    packed = MODEL.pack(batch)
    flat_noise = tuple(
        torch.cat([n[m] for n in noise]) if packed.latents[m].numel() > 0 else packed.latents[m]   # (0, 0) for an absent type
        for m in range(len(DIM_LATENTS))
    )
    most = max(1, max(len(t) for t in times))
    time_grid = torch.zeros(len(batch), most)
    for doc, t in enumerate(times):
        time_grid[doc, :len(t)] = torch.tensor(t)
    with torch.no_grad():
        breakdown = MODEL.compute_loss(packed, MODEL.span_times(packed, times = time_grid), flat_noise)
    return breakdown.per_sample_text, breakdown.per_sample_flow


def assert_same_loss(a: tuple, b: tuple, index_a: int, index_b: int):
    for which, (x, y) in zip(('text', 'flow'), zip(a, b)):
        torch.testing.assert_close(x[index_a], y[index_b], atol = 1e-5, rtol = 1e-5, equal_nan = True,
                                   msg = lambda m: f'{which} loss differs: {m}')


# the properties

@SETTINGS
@given(batch_spec, seeds)
def test_pack_then_unpack_returns_the_inputs(specs, seed):
    batch = realise_batch(specs, seed)
    restored = unpack(MODEL.pack(batch))

    assert len(restored) == len(batch)
    for original, back in zip(batch, restored):
        assert len(original) == len(back)
        for a, b in zip(original, back):
            assert isinstance(a, tuple) == isinstance(b, tuple)
            if isinstance(a, tuple):
                assert a[0] == b[0]
                a, b = a[1], b[1]
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@SETTINGS
@given(batch_spec, seeds)
def test_attention_mask_equals_the_reference(specs, seed):
    packed = MODEL.pack(realise_batch(specs, seed))
    reference = reference_mask(packed)
    assert torch.equal(dense_mask(packed), reference)

    layout = padded_layout(packed)
    for doc in range(packed.batch_size):
        start, end = int(packed.cu_seqlens[doc]), int(packed.cu_seqlens[doc + 1])
        block = reference[start:end, start:end]
        if layout.mask is None:         # no modality in the batch: plain causal attention
            assert packed.num_spans == 0
            assert torch.equal(block, torch.ones_like(block).tril())
        else:
            assert torch.equal(layout.mask[doc, 0, :end - start, :end - start], block)
            assert not layout.mask[doc, 0, :end - start, end - start:].any()    # real queries never see padding


@SETTINGS
@given(batch_spec, seeds, st.randoms(use_true_random = False))
def test_each_sample_loss_is_the_same_alone_and_at_any_position(specs, seed, rng):
    batch = realise_batch(specs, seed)
    noise, times = zip(*[noise_and_times(sample, seed + index) for index, sample in enumerate(batch)])

    order = list(range(len(batch)))
    rng.shuffle(order)
    together = per_sample_losses([batch[i] for i in order], [noise[i] for i in order], [times[i] for i in order])

    for position, index in enumerate(order):
        alone = per_sample_losses([batch[index]], [noise[index]], [times[index]])
        assert_same_loss(together, alone, position, 0)


@SETTINGS
@given(batch_spec.filter(lambda specs: len(specs) >= 2), sample_spec, seeds, st.data())
def test_a_sample_loss_does_not_change_when_another_changes(specs, replacement, seed, data):
    batch = realise_batch(specs, seed)
    noise, times = map(list, zip(*[noise_and_times(sample, seed + index) for index, sample in enumerate(batch)]))
    before = per_sample_losses(batch, noise, times)

    changed = data.draw(st.integers(0, len(batch) - 1), label = 'changed sample')
    batch[changed] = realise(replacement, seed + 999)
    noise[changed], times[changed] = noise_and_times(batch[changed], seed + 999)
    after = per_sample_losses(batch, noise, times)

    for index in range(len(batch)):
        if index != changed:
            assert_same_loss(before, after, index, index)
