"""Property-based tests over random mixed batches (hypothesis).

Each case is a batch of 1-4 samples, each a random interleaving of text runs (0 to 5 tokens)
and modalities of four types: a zero-dim type (shape `()`), a 1-axis and a 2-axis type, and
a type of any number of axes (0 to 2, no `modality_num_dim`). For each case:

- packing then unpacking returns the inputs;
- the attention mask (flat and padded) equals the slow reference;
- with fixed per-sample noise and times, each sample's loss is the same alone and inside the
  batch, at any position;
- a sample's loss does not change when another sample of the batch changes.

Sampling (at the end): a batch of rows, each made to write random text and modality headers
(random shapes: valid, of the wrong number of axes, that the learned down / up blocks cannot
take there and back, too long, or no shape at all), with and without learned blocks, never
crashes; a usable written shape is kept or stands aside for the default, an unusable one gives
the default or (no usable default) ends the row; every returned modality round-trips through
its type's blocks for real; no row generates more than `max_length` tokens.

The structure of a case (lengths, types, shapes, order) is drawn by hypothesis; the values of
its tensors come from a seed it draws, so shrinking works on the structure. Settings are
derandomized (no example database), so CI runs the same cases every time.
"""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from torch import nn

from transfusion_pytorch import Transfusion
from transfusion_pytorch.masks import dense_mask, padded_layout
from transfusion_pytorch.packing import unpack

from reference import reference_mask
from test_generation import generated_tokens, run

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


# sampling: random shapes written by the model

def image_and_sequence_model() -> Transfusion:
    """Learned down / up blocks for both types: type 0, 2 axes channel first with a default
    shape, halved per axis; type 1, any number of axes (only one works) and no default shape."""
    torch.manual_seed(0)
    dim = 16
    return Transfusion(
        num_text_tokens = NUM_TEXT, dim_latent = (4, 3), channel_first_latent = True,
        modality_default_shape = ((2, 2), None), modality_num_dim = (2, None),
        transformer = dict(dim = dim, depth = 1, dim_head = 8, heads = 2, dim_time = 16),
        pre_post_transformer_enc_dec = ((nn.Conv2d(4, dim, 2, stride = 2), nn.ConvTranspose2d(dim, 4, 2, stride = 2)),
                                        (nn.Conv1d(3, dim, 2, stride = 2), nn.ConvTranspose1d(dim, 3, 2, stride = 2))),
    ).eval()


SAMPLING_MODELS = dict(plain = MODEL, pre_post = image_and_sequence_model())

SAMPLING_SETTINGS = settings(SETTINGS, max_examples = 300)

digits_or_sep = st.integers(0, 10)      # a digit, or 10 for ','


@st.composite
def written_modality(draw, num_types: int):
    """(type, shape tokens as digit indices): mostly a small shape, else a few random tokens."""
    m = draw(st.integers(0, num_types - 1))
    if draw(st.booleans()):
        shape = draw(st.lists(st.integers(1, 6), min_size = 0, max_size = 3))
        text = ','.join(map(str, shape))
        return m, [10 if c == ',' else int(c) for c in text]
    return m, draw(st.lists(digits_or_sep, max_size = 6))


def sampling_script(vocab, steps: list) -> tuple[list, list]:
    """A row's script (the tokens pushed at each of its steps) and its modalities' (type, tokens)."""
    script, written = [], []
    for kind, what in steps:
        if kind == 'text':
            script.extend(what)
            continue
        m, digits = what
        tokens = [vocab.sep if d == 10 else vocab.digit0 + d for d in digits]
        script.extend([vocab.meta, *tokens, vocab.bom(m), None])    # None: the logits after BOM are not sampled
        written.append((m, tokens))
    return [*script, vocab.eos], written


def modality_shape(model, m: int, x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape[1:] if model.config.channel_first_latent[m] else x.shape[:-1])


def round_trips_for_real(model, m: int, shape) -> bool | None:
    """Whether the type's blocks take zeros of `shape` there and back, run for real (None: too large to try)."""
    if shape is None or model.config.modality_num_dim[m] not in (None, len(shape)):
        return False
    if not model.uses_pre_post(m):
        return True
    if math.prod(shape) > 4096:
        return None
    blocks, dim = model.pre_post[m], model.config.dim_latent[m]
    try:
        with torch.no_grad():
            out = blocks.decoder(blocks.encoder(blocks.to_user_layout(torch.zeros(*shape, dim))))
    except Exception:
        return False
    return tuple(blocks.from_user_layout(out).shape) == (*shape, dim)


@pytest.mark.parametrize('which', list(SAMPLING_MODELS))
@SAMPLING_SETTINGS
@given(data = st.data(), max_length = st.integers(0, 40))
def test_sampling_random_written_shapes_never_crashes_a_batch(which, data, max_length):
    model = SAMPLING_MODELS[which]
    vocab, num_types = model.vocab, model.vocab.num_modality_types
    step = st.one_of(st.lists(st.integers(0, NUM_TEXT - 1), min_size = 1, max_size = 3).map(lambda t: ('text', t)),
                      written_modality(num_types).map(lambda w: ('modality', w)))
    rows = data.draw(st.lists(st.lists(step, max_size = 4), min_size = 1, max_size = 3), label = 'rows')
    scripts, written = zip(*[sampling_script(vocab, steps) for steps in rows])

    with warnings.catch_warnings(record = True) as caught:
        warnings.simplefilter('always')
        samples = run(model, [None] * len(rows), list(scripts), max_length = max_length, modality_steps = 1)
    assert all(str(w.message).startswith('the model wrote') for w in caught), [str(w.message) for w in caught]
    for w in caught:        # how shapes were handled (pytest --hypothesis-show-statistics)
        event('written shape replaced by the default' if 'using modality_default_shape' in str(w.message) else 'row ended by a shape')

    for sample, asked in zip(samples, written):
        assert generated_tokens(model, None, sample) <= max_length
        returned = [(x[0], modality_shape(model, x[0], x[1])) for x in sample if isinstance(x, tuple)]
        assert len(returned) <= len(asked)
        for index, (m, shape) in enumerate(returned):
            assert round_trips_for_real(model, m, shape) is True
            asked_m, tokens = asked[index]
            wrote = vocab.decode_shape(tokens)
            usable = round_trips_for_real(model, asked_m, wrote)
            assert m == asked_m
            event('a modality of the written shape' if shape == wrote else 'a modality of the default shape')
            assert shape in ((wrote, model.config.modality_default_shape[m]) if usable is not False else (model.config.modality_default_shape[m],))
        for index, (m, tokens) in enumerate(asked):
            if model.config.modality_default_shape[m] is None and round_trips_for_real(model, m, vocab.decode_shape(tokens)) is False:
                assert len(returned) <= index       # no default to stand in: the row ended there
                break
