import warnings
from dataclasses import replace

import pytest
import torch
from torch import nn

from transfusion_pytorch import Transfusion, print_modality_sample
from transfusion_pytorch.backends import CachedBackend, Latents, ReferenceBackend, Request
from transfusion_pytorch.generation import SampleOptions, Sampler, make_backend, row_generators, to_output
from transfusion_pytorch.packing import pack

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, tiny_model

GREEDY = dict(text_temperature = 0., modality_steps = 3)


def untrained_but_not_trivial(**kwargs) -> Transfusion:
    """A tiny model whose zero-initialised parts (adaLN-zero, skips) are perturbed, so that time
    conditioning and every layer matter."""
    model = tiny_model(**kwargs)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


class Scripted:
    """Wraps a backend: the k-th logits of a row are pushed towards `scripts[row][k]` (None:
    left as is), and `banned` tokens are pushed away. The model still computes everything."""

    def __init__(self, backend, scripts: list[list], banned: list[int] = ()):
        self.backend, self.scripts, self.banned = backend, scripts, list(banned)
        self.counts = [0] * len(scripts)

    def rewind(self, row, num):
        self.backend.rewind(row, num)

    def step(self, requests):
        outputs = self.backend.step(requests)
        for row, (request, output) in enumerate(zip(requests, outputs)):
            if output is None or isinstance(request.items[-1], Latents):
                continue
            output = output.clone()
            output[self.banned] -= 1e4
            script, count = self.scripts[row], self.counts[row]
            if count < len(script) and script[count] is not None:
                output[script[count]] += 1e4
            self.counts[row] += 1
            outputs[row] = output
        return outputs


def run(model, prompts, scripts = None, banned = (), use_cache = True, seeds = None, **options):
    """Samples a batch of prompts through `Sampler`, with optional scripted logits."""
    options = SampleOptions(**{**GREEDY, **options})
    batch = len(prompts)
    prompts = [[] if p is None else model.to_samples([p])[0][0] for p in prompts]
    backend = Scripted(make_backend(model, prompts, options, use_cache), scripts or [[]] * batch, banned)
    generators = [torch.Generator().manual_seed(seed) for seed in (seeds or range(batch))]
    with torch.no_grad():
        sequences = Sampler(model, options, backend).run(prompts, generators)
        return [to_output(model, items, return_latents = True) for items in sequences]


def assert_same_samples(a, b, atol = 1e-4):
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            assert isinstance(y, tuple) and x[0] == y[0] and x[1].shape == y[1].shape
            assert torch.allclose(x[1], y[1], atol = atol), (x[1] - y[1]).abs().max()
        else:
            assert not isinstance(y, tuple) and torch.equal(x, y), (x, y)


def kinds(sample):
    return [('modality', x[0], tuple(x[1].shape[:-1])) if isinstance(x, tuple) else 'text' for x in sample]


# the cached-against-uncached tests also run with grouped-query attention and separate modality
# weights (the KV cache holds key / value heads only; a step routes its text and latent rows)
MODELS = dict(shared = {}, separate = dict(transformer = dict(dim = 32, depth = 2, dim_head = 8, heads = 4, kv_heads = 2,
                                                              separate_modality_weights = True)))
BOTH = pytest.mark.parametrize('model', list(MODELS), indirect = True)


@pytest.fixture
def model(request):
    return untrained_but_not_trivial(**MODELS[getattr(request, 'param', 'shared')])


def written_shape_script(model, shape, modality_type, before = (5,), after = (7,)):
    """Text, then META, the shape's tokens and BOM; then (after the BOM's ignored logits) text and EOS."""
    vocab = model.vocab
    return [*before, vocab.meta, *vocab.encode_shape(shape), vocab.bom(modality_type), None, *after, vocab.eos]


PROMPTS = dict(
    none = None,
    text = [torch.randint(0, NUM_TEXT_TOKENS, (5,))],
    modality = [(1, torch.randn(2, 3, DIM_LATENTS[1]))],
    mixed = [torch.randint(0, NUM_TEXT_TOKENS, (3,)), (0, torch.randn(3, DIM_LATENTS[0])), torch.randint(0, NUM_TEXT_TOKENS, (2,))],
)


# cached against uncached

@pytest.mark.parametrize('prompt', list(PROMPTS))
@BOTH
def test_cached_matches_uncached_with_a_written_modality(model, prompt):
    # after the prompt: text, a modality of a written 2-d shape, text, a second modality of type 0, text
    vocab = model.vocab
    script = [4, vocab.meta, *vocab.encode_shape((2, 3)), vocab.bom(1), None, 9,
              vocab.meta, *vocab.encode_shape((3,)), vocab.bom(0), None, 2, vocab.eos]
    cached = run(model, [PROMPTS[prompt]], [script], max_length = 64)[0]
    uncached = run(model, [PROMPTS[prompt]], [script], max_length = 64, use_cache = False)[0]

    assert kinds(cached)[-5:] == ['text', ('modality', 1, (2, 3)), 'text', ('modality', 0, (3,)), 'text']
    assert_same_samples(cached, uncached)


@pytest.mark.parametrize('prompt', list(PROMPTS))
@BOTH
def test_cached_matches_uncached_free_greedy_decoding(model, prompt):
    # no script: whatever the model decodes, with modalities forced at the start
    options = dict(max_length = 40, force_modality_at_start = (1, (2, 2)))
    cached = run(model, [PROMPTS[prompt]], **options)[0]
    uncached = run(model, [PROMPTS[prompt]], use_cache = False, **options)[0]
    assert ('modality', 1, (2, 2)) in kinds(cached)
    assert_same_samples(cached, uncached)


@BOTH
def test_cached_modality_only_matches_uncached(model):
    a = model.generate_modality_only(batch_size = 3, modality_type = 1, fixed_modality_shape = (2, 3), seed = 0)
    b = model.generate_modality_only(batch_size = 3, modality_type = 1, fixed_modality_shape = (2, 3), seed = 0, use_cache = False)
    assert a.shape == (3, 2, 3, DIM_LATENTS[1])
    assert torch.allclose(a, b, atol = 1e-5)
    c = model.generate_modality_only(batch_size = 3, modality_type = 1, fixed_modality_shape = (2, 3), seed = 0, ode_method = 'euler')
    assert not torch.allclose(a, c, atol = 1e-3)     # the solver matters, so the comparison above could fail


@BOTH
def test_cached_text_only_matches_uncached(model):
    prompt = torch.randint(0, NUM_TEXT_TOKENS, (3, 4))
    cached = model.generate_text_only(prompt, 20, temperature = 0.)
    uncached = model.generate_text_only(prompt, 20, temperature = 0., use_cache = False)
    assert cached.shape == (3, 16)
    assert torch.equal(cached, uncached)
    assert cached.max() < NUM_TEXT_TOKENS

    # sampled with a seed per row: reproducible, and the same cached or not
    a = model.generate_text_only(prompt, 12, temperature = 1., min_p = 0.05, seed = 3)
    assert torch.equal(a, model.generate_text_only(prompt, 12, temperature = 1., min_p = 0.05, seed = 3, use_cache = False))


def test_text_decoding_of_equal_rows_needs_no_mask(model):
    """Rows of equal length decoding text write their keys through one slice and attend with no
    mask at all; the logits are those of the general path (per-row slots and a mask), which
    rows of unequal chunks take."""
    with torch.no_grad():
        fast = CachedBackend(model, 2, 16)
        fast.decode(torch.tensor([[1, 2, 3], [4, 5, 6]]))
        logits = fast.decode(torch.tensor([[7], [8]]))
        assert isinstance(fast.cache.write_slots, slice) and fast.cache.mask is None

        general = CachedBackend(model, 2, 16)
        general.step([Request([1, 2]), Request([4])])
        outputs = general.step([Request([3, 7]), Request([5, 6, 8])])
        assert not isinstance(general.cache.write_slots, slice) and general.cache.mask is not None
    assert torch.allclose(logits, torch.stack(outputs), atol = 1e-5)


@BOTH
def test_committed_modality_is_what_training_sees(model):
    """After ODE steps that are not kept, the committed clean modality (t = 1) gives the logits
    of the training forward over the finished sequence."""
    vocab = model.vocab
    latent = torch.randn(2, 2, DIM_LATENTS[1])
    sample = [torch.tensor([5]), (1, latent), torch.tensor([7, 8])]
    packed = pack(model.to_samples([sample])[0], vocab)
    with torch.no_grad():
        hidden = model.hidden_states(packed, packed.latents, torch.ones(packed.num_spans))
        expected = model.to_logits(hidden[packed.num_tokens - 2])           # at the last text token, before EOS

        backend = CachedBackend(model, 1, 40)
        block = Latents(1, latent.reshape(4, -1), (2, 2))
        backend.step([Request([vocab.sos, 5, vocab.meta, *vocab.encode_shape((2, 2)), vocab.bom(1)])])
        noisy = Latents(1, torch.randn(4, DIM_LATENTS[1]), (2, 2))
        backend.step([Request([noisy], time = 0.3, keep = False)])
        logits = backend.step([Request([block, vocab.eom(1), 7, 8])])[0]
    assert torch.allclose(logits, expected, atol = 1e-4)


def test_init_modality_noise_sets_every_modality(model):
    # the forced modality, then one the model writes: both start from the given noise, so the
    # row's seed changes nothing (text is greedy)
    vocab = model.vocab
    script = [None, 3, vocab.meta, *vocab.encode_shape((2, 2)), vocab.bom(1), None, 4, vocab.eos]
    noise = torch.randn(2, 2, DIM_LATENTS[1])
    options = dict(max_length = 30, force_modality_at_start = 1, init_modality_noise = noise)
    a = run(model, [None], [script], seeds = [0], **options)[0]
    b = run(model, [None], [script], seeds = [1], **options)[0]
    c = run(model, [None], [script], seeds = [1], **{**options, 'init_modality_noise': None})[0]
    assert kinds(a) == ['text', ('modality', 1, (2, 2)), 'text', ('modality', 1, (2, 2)), 'text']
    assert_same_samples(a, b, atol = 0.)
    assert not torch.allclose(b[1][1], c[1][1]) and not torch.allclose(b[3][1], c[3][1])


def test_adaptive_solver_in_sample():
    # dopri5 integrates each row's modality alone: cached = uncached and batch = alone. The two
    # backends' velocities differ by float noise (1e-7), which a perturbed model's steep flow
    # amplifies over dopri5's many evaluations: from 2e-5 to 6e-3 over the random models tried
    # (more at tighter tolerances, which take more steps), hence a model of its own, seeded, and
    # a margin. Exactness of the cache is tested with the fixed-grid solvers above. (While
    # torchdiffeq stepped past t = 1, where the flow is wilder still, they agreed to 5e-2.)
    torch.manual_seed(0)
    model = untrained_but_not_trivial()
    # unguided, as the margin was measured: guidance (`sample`'s default) amplifies the float noise further
    options = dict(max_length = 24, force_modality_at_start = (1, (2, 2)), ode_method = 'dopri5', ode_atol = 1e-3, ode_rtol = 1e-3,
                   cfg_scale = 1.)
    prompts = [PROMPTS['text'], PROMPTS['mixed']]
    cached = run(model, prompts, **options)
    uncached = run(model, prompts, use_cache = False, **options)
    alone = run(model, [prompts[1]], seeds = [1], **options)[0]
    euler = run(model, prompts, **{**options, 'ode_method': 'euler', 'modality_steps': 2})
    for a, b, c in zip(cached, uncached, euler):
        assert ('modality', 1, (2, 2)) in kinds(a)
        assert_same_samples(a, b, atol = 1e-2)
        forced = [x for x in a if isinstance(x, tuple)][-1][1]
        assert not torch.allclose(forced, [x for x in c if isinstance(x, tuple)][-1][1], atol = 5e-2)   # the solver ran
    assert_same_samples(cached[1], alone, atol = 1e-2)


# batches

@BOTH
def test_batch_matches_each_prompt_alone(model):
    prompts = list(PROMPTS.values())
    scripts = [[], written_shape_script(model, (3, 1), 1), [], written_shape_script(model, (2,), 0, before = ())]
    options = dict(max_length = 48, force_modality_at_start = None)
    batched = run(model, prompts, scripts, seeds = [0, 1, 2, 3], **options)
    for index, prompt in enumerate(prompts):
        alone = run(model, [prompt], [scripts[index]], seeds = [index], **options)[0]
        assert_same_samples(batched[index], alone)


def test_public_sample_batches_and_seeds(model):
    prompts = [[torch.randint(0, NUM_TEXT_TOKENS, (3,))], [(0, torch.randn(2, DIM_LATENTS[0]))]]
    options = dict(max_length = 30, text_temperature = 1., modality_steps = 2, force_modality_at_start = 1)
    batched = model.sample(prompts, generator = [torch.Generator().manual_seed(s) for s in (5, 6)], **options)
    assert len(batched) == 2
    for prompt, seed, sample in zip(prompts, (5, 6), batched):
        assert_same_samples(sample, model.sample(prompt, generator = torch.Generator().manual_seed(seed), **options))
        assert ('modality', 1, (2, 2)) in kinds(sample)


# shapes

def test_written_2d_shape_is_honoured(model):
    sample = run(model, [None], [written_shape_script(model, (3, 2), 1)], max_length = 40)[0]
    assert kinds(sample) == ['text', ('modality', 1, (3, 2)), 'text']
    assert sample[0].tolist() == [5] and sample[2].tolist() == [7]


@pytest.mark.parametrize('shape_tokens', [
    lambda v: [v.digit0, v.digit0 + 3],                 # '03': leading zero
    lambda v: [v.digit0 + 2, v.sep],                    # '2,': empty axis
    lambda v: [v.digit0 + 2],                           # one axis for a type of two
    lambda v: [v.digit0 + 9, v.digit0 + 9, v.sep, v.digit0 + 9],  # does not fit in max_length
])
def test_invalid_shape_falls_back_with_a_warning(model, shape_tokens):
    vocab = model.vocab
    script = [vocab.meta, *shape_tokens(vocab), vocab.bom(1), None, 7, vocab.eos]
    with pytest.warns(UserWarning, match = 'invalid shape|a shape that does not fit'):
        cached = run(model, [None], [script], max_length = 40)[0]
    with pytest.warns(UserWarning, match = 'invalid shape|a shape that does not fit'):
        uncached = run(model, [None], [script], max_length = 40, use_cache = False)[0]
    assert kinds(cached) == ['text', ('modality', 1, (2, 2)), 'text']      # the default shape of type 1
    assert_same_samples(cached, uncached)


@pytest.mark.parametrize('shape_tokens, invalid', [
    (lambda v: [v.digit0, v.digit0 + 3], True),
    (lambda v: [v.digit0 + 2], True),
    (lambda v: [v.digit0 + 9, v.digit0 + 9, v.sep, v.digit0 + 9], False),     # valid, but does not fit
])
def test_fallback_to_default_shape_if_invalid_off(model, shape_tokens, invalid):
    """The public package's switch: off, an invalid shape is an error; a valid one that does not
    fit ends the row as it would with the switch on (when the default does not fit either)."""
    model.config = replace(model.config, fallback_to_default_shape_if_invalid = False)
    vocab = model.vocab
    script = [4, vocab.meta, *shape_tokens(vocab), vocab.bom(1), None, 7, vocab.eos]
    if invalid:
        with pytest.raises(ValueError, match = r'the model wrote an invalid shape .* for modality type 1 \(.*\), and fallback_to_default_shape_if_invalid is off'):
            run(model, [None], [script], max_length = 40)
        return
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        sample = run(model, [None], [script], max_length = 40)[0]
    assert kinds(sample) == ['text'] and sample[0].tolist() == [4]    # the unfinished header is dropped
    assert Transfusion(num_text_tokens = 4, transformer = dict(dim = 8, depth = 1), fallback_to_default_shape_if_invalid = False
                       ).config.fallback_to_default_shape_if_invalid is False


def test_fixed_modality_shape_is_written_for_the_model(model):
    vocab = model.vocab
    script = [vocab.meta, vocab.bom(0), None, 3, vocab.eos]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        sample = run(model, [None], [script], max_length = 40, fixed_modality_shape = (5,))[0]
    assert kinds(sample) == ['text', ('modality', 0, (5,)), 'text']


# stopping

def test_stops_at_eos(model):
    vocab = model.vocab
    sample = run(model, [None], [[3, 4, vocab.eos]], max_length = 100)[0]
    assert len(sample) == 1 and sample[0].tolist() == [3, 4]


def generated_tokens(model, prompt, sample) -> int:
    """The tokens a returned sample holds after its prompt (less the EOS that pack appends)."""
    prompt_length = pack(model.to_samples([prompt])[0], model.vocab).num_tokens - 1 if prompt else 1
    return pack(model.to_samples([sample])[0], model.vocab).num_tokens - 1 - prompt_length


@pytest.mark.parametrize('max_length', [1, 2, 9, 23])
def test_stops_at_max_length(model, max_length):
    # EOS banned: the model runs until it has generated max_length tokens, modalities included
    vocab = model.vocab
    script = [1, vocab.meta, *vocab.encode_shape((2, 2)), vocab.bom(1), None, 2, vocab.meta, vocab.digit0 + 4]
    samples = run(model, [None, None], [script, []], banned = [vocab.eos], max_length = max_length)
    for sample in samples:
        assert generated_tokens(model, None, sample) <= max_length
    text_only = run(model, [None], banned = [vocab.eos, vocab.meta], max_length = max_length)[0]
    assert sum(len(t) for t in text_only) == max_length         # exactly max_length text tokens, not one more


@pytest.mark.parametrize('prompt', ['text', 'modality', 'mixed'])
@pytest.mark.parametrize('max_length', [3, 8, 12, 20])
@pytest.mark.parametrize('cfg_scale', [1., 3.])
def test_max_length_bounds_what_follows_the_prompt(model, prompt, max_length, cfg_scale):
    # whatever the model writes, a row never generates more than max_length tokens after its
    # prompt: free sampling with EOS banned, and a script of modalities that stop fitting
    # somewhere along the way
    vocab = model.vocab
    script = [3, vocab.meta, *vocab.encode_shape((2, 2)), vocab.bom(1), None, 4,
              vocab.meta, *vocab.encode_shape((3,)), vocab.bom(0), None, 5, vocab.meta, vocab.digit0 + 2]
    options = dict(banned = [vocab.eos], max_length = max_length, cfg_scale = cfg_scale, text_temperature = 1., modality_steps = 2)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        samples = run(model, [PROMPTS[prompt]] * 2, [script, []], **options)
        public = model.sample(PROMPTS[prompt], max_length = max_length, cfg_scale = cfg_scale, modality_steps = 2, seed = 0)
    for sample in [*samples, public]:
        assert generated_tokens(model, PROMPTS[prompt], sample) <= max_length
    # EOS and META banned: text only, and the budget is spent to the last token (free sampling
    # may also end early by writing a modality that would not fit, which is not started)
    text_only = run(model, [PROMPTS[prompt]], **{**options, 'banned': [vocab.eos, vocab.meta]})
    assert generated_tokens(model, PROMPTS[prompt], text_only[0]) == max_length


# the contract's sampling calls, with small transformers

def test_contract_sample_calls_run():
    model = Transfusion(num_text_tokens = 256, dim_latent = 384, modality_default_shape = (4,),
                        transformer = dict(dim = 32, depth = 2, dim_head = 16, heads = 2))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        one_multimodal_sample = model.sample(max_length = 256)
    assert isinstance(one_multimodal_sample, list) and len(one_multimodal_sample) > 0
    print_modality_sample(one_multimodal_sample)

    model = Transfusion(num_text_tokens = 256, dim_latent = (384, 192), modality_default_shape = ((4,), (2,)),
                        transformer = dict(dim = 32, depth = 2, dim_head = 16, heads = 2))
    assert isinstance(model.sample(max_length = 64, force_modality_at_start = 1), list)

    mock_encoder, mock_decoder = nn.Conv2d(3, 384, 3, padding = 1), nn.Conv2d(384, 3, 3, padding = 1)
    model = Transfusion(num_text_tokens = 12, dim_latent = 384, channel_first_latent = True, modality_default_shape = (4, 4),
                        modality_encoder = mock_encoder, modality_decoder = mock_decoder,
                        transformer = dict(dim = 32, depth = 2, dim_head = 16, heads = 2))
    sample = model.sample(max_length = 64, force_modality_at_start = 0, modality_steps = 2)
    images = [x for x in sample if isinstance(x, tuple)]
    assert images[0][1].shape == (3, 4, 4)           # decoded, channel first
    raw = model.sample(max_length = 64, force_modality_at_start = 0, modality_steps = 2, return_latents = True)
    assert [x for x in raw if isinstance(x, tuple)][0][1].shape == (384, 4, 4)

    model = Transfusion(num_text_tokens = 256, dim_latent = 384, transformer = dict(dim = 32, depth = 2, dim_head = 16, heads = 2))
    text = torch.randint(0, 256, (2, 1024))
    sampled = model.generate_text_only(text[:, :1], 64)
    assert sampled.shape == (2, 63) and sampled.dtype == torch.long


def test_sampling_options_are_checked(model):
    with pytest.raises(ValueError):
        model.sample(ode_method = 'rk17')
    with pytest.raises(ValueError):
        model.sample(max_length = -1)
