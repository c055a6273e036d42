"""Static decoding steps (`static_decode.py`): the same tokens and latents as the dynamic path.

On CUDA the static steps are replayed from CUDA graphs; here they run eagerly, which is the
computation the graphs record. Each test also checks that the static steps did run."""

import functools
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from transfusion_pytorch import generation, kv_cache, static_decode
from transfusion_pytorch.attention import attend_cached, scaled_dot_product
from transfusion_pytorch.backends import CachedBackend
from transfusion_pytorch.generation import SampleOptions, Sampler, make_backend, to_output
from transfusion_pytorch.static_decode import StaticBackend

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS
from test_generation import MODELS, PROMPTS, Scripted, assert_same_samples, kinds, untrained_but_not_trivial

BOTH = pytest.mark.parametrize('model', list(MODELS), indirect = True)


@pytest.fixture
def model(request):
    return untrained_but_not_trivial(**MODELS[getattr(request, 'param', 'shared')])


@pytest.fixture
def static_calls(monkeypatch) -> Counter:
    """How many times each kind of static step ran ('text', 'modality')."""
    calls = Counter()
    for name, cls in (('text', static_decode.TextStep), ('modality', static_decode.ModalityStep)):
        def counted(self, forward = cls.forward, name = name):
            calls[name] += 1
            return forward(self)
        monkeypatch.setattr(cls, 'forward', counted)
    return calls


# generate_text_only

@BOTH
def test_text_only_greedy_and_seeded_match_the_dynamic_path(model, static_calls):
    prompt = torch.randint(0, NUM_TEXT_TOKENS, (3, 4))
    for options in (dict(temperature = 0.), dict(temperature = 1., min_p = 0.05, seed = 3), dict(top_k = 5, seed = 0)):
        dynamic = model.generate_text_only(prompt, 20, **options, static_decode = False)
        static = model.generate_text_only(prompt, 20, **options, static_decode = True)
        assert static.shape == (3, 16)
        assert torch.equal(static, dynamic), options
    assert static_calls['text'] == 3 * 15           # every token after the prompt's first step
    assert not torch.equal(dynamic, model.generate_text_only(prompt, 20, temperature = 0.))     # the options mattered


def test_text_only_from_a_sliced_prompt(model, static_calls):
    prompt = torch.randint(0, NUM_TEXT_TOKENS, (4, 12))[1:, ::3]        # non-contiguous rows
    assert not prompt.is_contiguous()
    dynamic = model.generate_text_only(prompt, 20, seed = 1, static_decode = False)
    assert torch.equal(model.generate_text_only(prompt, 20, seed = 1, static_decode = True), dynamic)
    assert torch.equal(model.generate_text_only(prompt.contiguous(), 20, seed = 1, static_decode = True), dynamic)
    assert static_calls['text'] == 2 * 15


def test_one_token_prompt_is_decoded_by_static_steps_alone(model, static_calls):
    prompt = torch.randint(0, NUM_TEXT_TOKENS, (2, 1))
    dynamic = model.generate_text_only(prompt, 9, temperature = 0., static_decode = False)
    assert torch.equal(model.generate_text_only(prompt, 9, temperature = 0., static_decode = True), dynamic)
    assert static_calls['text'] == 8


# sample

def sample_rows(model, prompts, scripts, static: bool, **options) -> list:
    """`sample`'s state machine over a batch, with scripted logits (`test_generation.Scripted`)."""
    options = SampleOptions(**options)
    backend = Scripted(make_backend(model, prompts, options, static = static), scripts)
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(prompts))]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        sequences = Sampler(model, options, backend).run(prompts, generators)
    return [to_output(model, items, return_latents = True) for items in sequences]


@BOTH
@pytest.mark.parametrize('cfg_scale', [1., 3.])
def test_sample_with_modalities_matches_the_dynamic_path(model, static_calls, cfg_scale):
    """Rows that end at different times (EOS after two tokens, after a modality, or free
    sampling to the budget), a modality of a fixed shape written by the model between text,
    seeded text sampling, guidance on and off, and a sliced prompt."""
    vocab = model.vocab
    sliced = [torch.randint(0, NUM_TEXT_TOKENS, (10,))[::2], (1, torch.randn(2, 2, 2 * DIM_LATENTS[1])[..., ::2])]
    prompts = [model.to_samples([p])[0][0] for p in (PROMPTS['text'], sliced, PROMPTS['mixed'])]
    scripts = [[3, vocab.eos],
               [4, vocab.meta, vocab.bom(1), None, 5, 6, vocab.eos],
               [None, None, vocab.meta, vocab.bom(1), None, 7]]
    options = dict(max_length = 40, text_temperature = 1., modality_steps = 3, fixed_modality_shape = (2, 2), cfg_scale = cfg_scale,
                   guidance_interval = (0., 1.))
    dynamic = sample_rows(model, prompts, scripts, static = False, **options)
    static = sample_rows(model, prompts, scripts, static = True, **options)

    for a, b in zip(dynamic, static):
        assert_same_samples(a, b, atol = 1e-5)
    assert kinds(static[0]) == ['text'] and static[0][0].tolist() == PROMPTS['text'][0].tolist() + [3]
    assert ('modality', 1, (2, 2)) in kinds(static[1])[2:] and static[1][-1].tolist() == [5, 6]
    assert static_calls['text'] > 0 and static_calls['modality'] > 0


def test_public_sample_and_forced_modality(model, static_calls):
    prompts = [[torch.randint(0, NUM_TEXT_TOKENS, (3,))], [(0, torch.randn(2, DIM_LATENTS[0]))]]
    options = dict(max_length = 20, text_temperature = 1., modality_steps = 2, force_modality_at_start = 1, seed = 5)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        dynamic = model.sample(prompts, **options, static_decode = False)
        static = model.sample(prompts, **options, static_decode = True)
    for a, b in zip(dynamic, static):
        assert_same_samples(a, b, atol = 1e-5)
        assert ('modality', 1, (2, 2)) in kinds(b)
    assert static_calls['modality'] >= 2 * 2


@BOTH
@pytest.mark.parametrize('method, stages', [('midpoint', 2), ('euler', 1)])
def test_modality_only_matches_the_dynamic_path(model, static_calls, method, stages):
    options = dict(batch_size = 3, modality_type = 1, fixed_modality_shape = (2, 3), seed = 0, ode_method = method)
    dynamic = model.generate_modality_only(**options, static_decode = False)
    static = model.generate_modality_only(**options, static_decode = True)
    assert static.shape == (3, 2, 3, DIM_LATENTS[1])
    assert torch.allclose(static, dynamic, atol = 1e-5), (static - dynamic).abs().max()
    assert static_calls['modality'] == 8 * stages        # every row in each stage of the 8 steps


# the cache

def test_a_large_max_length_allocates_what_is_used(model, monkeypatch):
    """The cache starts small and doubles as rows grow: a budget of a billion tokens costs
    nothing until it is used, and the grown cache decodes as one allocated in full."""
    backend = make_backend(model, [[]], SampleOptions(max_length = 10 ** 9, cfg_scale = 1.))
    assert backend.cache.max_len == 10 ** 9 + 1
    assert backend.cache.keys.numel() == 2 * 1 * 2 * (kv_cache.INITIAL_SLOTS + 1) * 8      # depth, rows, kv heads, slots, dim_head
    sample = sample_rows(model, [[]], [[3, 4, model.vocab.eos]], static = False, max_length = 10 ** 9, cfg_scale = 1.)[0]
    assert sample[0].tolist() == [3, 4]

    monkeypatch.setattr(kv_cache, 'INITIAL_SLOTS', 4)
    prompt = torch.randint(0, NUM_TEXT_TOKENS, (2, 3))
    full = model.generate_text_only(prompt, 20, seed = 0, use_cache = False)
    for static in (False, True):
        assert torch.equal(model.generate_text_only(prompt, 20, seed = 0, static_decode = static), full)
    with torch.no_grad():
        backend = CachedBackend(model, 2, 1000)
        backend.decode(prompt)
        slots = [backend.cache.slots]
        for _ in range(10):
            backend.decode(torch.zeros(2, 1, dtype = torch.long))
            slots.append(backend.cache.slots)
    assert slots == [4] + [4] + [8] * 4 + [16] * 5 and backend.cache.version == 2


def test_static_steps_are_rebuilt_when_the_cache_grows(model, monkeypatch):
    monkeypatch.setattr(kv_cache, 'INITIAL_SLOTS', 4)
    with torch.no_grad():
        backend = StaticBackend(model, 2, 100)
        backend.decode(torch.randint(0, NUM_TEXT_TOKENS, (2, 3)))
        steps = set()
        for _ in range(12):
            backend.decode(torch.zeros(2, 1, dtype = torch.long))
            steps.add(id(backend.steps['text']))
    assert backend.cache.slots == 16 and len(steps) == 3           # 4, 8 and 16 slots
    assert backend.steps['text'].step.cache.keys is backend.cache.keys


def test_cache_holds_autocast_dtype(model):
    with torch.no_grad(), torch.autocast('cpu', dtype = torch.bfloat16):
        assert CachedBackend(model, 1, 8).cache.keys.dtype == torch.bfloat16
        prompt = torch.randint(0, NUM_TEXT_TOKENS, (2, 3))
        dynamic = model.generate_text_only(prompt, 12, temperature = 0., static_decode = False)
        assert torch.equal(model.generate_text_only(prompt, 12, temperature = 0., static_decode = True), dynamic)
    assert CachedBackend(model, 1, 8).cache.keys.dtype == torch.float32


def test_grouped_heads_folded_into_the_queries_attend_as_grouped_attention():
    q, k, v = torch.randn(3, 8, 5, 16), torch.randn(3, 2, 11, 16), torch.randn(3, 2, 11, 16)
    allowed = (torch.arange(11)[None] < torch.tensor([3, 11, 7])[:, None])[:, None, None]       # one row of the mask per row
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, float('-inf'))
    expanded = [t.repeat_interleave(4, dim = 1) for t in (k, v)]                                  # query head i reads head i // 4
    expected = scaled_dot_product(q, *expanded, mask = allowed)
    assert torch.allclose(attend_cached(q, k, v, additive), expected, atol = 1e-6)
    assert torch.allclose(attend_cached(q, k, v, allowed, softcap = 50.), scaled_dot_product(q, *expanded, mask = allowed, softcap = 50.), atol = 1e-6)


# switches, compile, CUDA graphs

def test_static_decode_switch_is_checked(model):
    prompt = torch.randint(0, NUM_TEXT_TOKENS, (1, 2))
    with pytest.raises(ValueError, match = r'static_decode = True needs the KV cache: it cannot be combined with use_cache = False'):
        model.generate_text_only(prompt, 4, static_decode = True, use_cache = False)
    with pytest.raises(ValueError, match = r"static_decode must be True, False or None, got 'yes'"):
        model.sample(static_decode = 'yes')
    with pytest.raises(ValueError, match = 'static_decode = True needs the KV cache'):
        model.generate_modality_only(static_decode = True, cache_kv = False)
    # off by default on CPU: the dynamic path is faster there
    assert type(make_backend(model, [[]], SampleOptions(cfg_scale = 1.))) is CachedBackend


def test_decode_benchmark_runs_and_agrees(model):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    from decode_static import decode_benchmark
    results = decode_benchmark(model, batch_size = 2, prompt_length = 3, new_tokens = 6, repeats = 1, modality_batch = 2, modality_steps = 2)
    assert results['tokens_equal'] and results['steps_equal_before_first_difference'] == 6
    assert results['max_latent_difference'] < 1e-5 and not results['captured']
    assert results['static_steps_per_s'] > 0 and results['dynamic_modalities_per_s'] > 0


INDUCTOR = pytest.mark.skipif(
    os.environ.get('TRANSFUSION_INDUCTOR_TESTS') != '1',
    reason = 'inductor compiles C++ kernels on CPU: 54 s on the shared 2-core test machine, too long for a unit test; '
             'set TRANSFUSION_INDUCTOR_TESTS=1 to run it')


@pytest.mark.parametrize('backend', ['aot_eager', pytest.param('inductor', marks = INDUCTOR)])
def test_compiled_static_step_matches_eager(model, one_thread, backend):
    """`torch.compile` traces the static text step (its writes into the cache, the mask over the
    allocation) and gives the eager step's logits."""
    prompt = torch.randint(0, NUM_TEXT_TOKENS, (2, 3))
    torch._dynamo.reset()
    with torch.no_grad():
        logits = []
        for compile in (False, backend):
            backend = StaticBackend(model, 2, 12, compile = compile)
            backend.decode(prompt)
            logits.append(torch.stack([backend.decode(torch.full((2, 1), token)) for token in (1, 2, 3)]))
    assert torch.allclose(logits[0], logits[1], atol = 1e-5), (logits[0] - logits[1]).abs().max()


class FakeGraph:
    """A CUDA graph's contract, on CPU: capture runs nothing (the outputs hold garbage until a
    replay), and each replay reruns the step, writing into the outputs captured."""

    def __init__(self, fn, outputs):
        self.fn, self.outputs, self.replays = fn, outputs, 0

    def replay(self):
        self.outputs.copy_(self.fn())
        self.replays += 1


@pytest.fixture
def fake_graphs(monkeypatch) -> list:
    """Static backends that capture their steps, in FakeGraphs; the list of graphs made."""
    graphs = []

    def capture(fn, warmup = 2):
        for _ in range(warmup):         # run for real: the step must be idempotent
            fn()
        graphs.append(FakeGraph(fn, torch.full_like(fn(), float('nan'))))
        return graphs[-1], graphs[-1].outputs

    monkeypatch.setattr(static_decode, 'capture_cuda_graph', capture)
    monkeypatch.setattr(generation, 'StaticBackend', functools.partial(StaticBackend, capture = True))
    return graphs


def test_captured_steps_match_the_dynamic_path(model, fake_graphs, monkeypatch):
    """The bookkeeping of CUDA graphs without a GPU: one capture per kind of step (and again
    after the cache grows), replays whose outputs are copied before the next one, warm-up runs
    that change nothing."""
    monkeypatch.setattr(kv_cache, 'INITIAL_SLOTS', 8)
    prompt = torch.randint(0, NUM_TEXT_TOKENS, (3, 4))
    dynamic = model.generate_text_only(prompt, 24, seed = 0, static_decode = False)
    assert torch.equal(model.generate_text_only(prompt, 24, seed = 0, static_decode = True), dynamic)
    assert len(fake_graphs) == 3 and sum(g.replays for g in fake_graphs) == 19      # 8, 16 and 24 slots

    vocab = model.vocab
    prompts = [model.to_samples([p])[0][0] for p in (PROMPTS['text'], PROMPTS['mixed'])]
    scripts = [[3, vocab.eos], [4, vocab.meta, vocab.bom(1), None, 5, 6, vocab.eos]]
    options = dict(max_length = 30, text_temperature = 1., modality_steps = 2, fixed_modality_shape = (2, 2), cfg_scale = 3.,
                   guidance_interval = (0., 1.))
    static = sample_rows(model, prompts, scripts, static = True, **options)
    for a, b in zip(sample_rows(model, prompts, scripts, static = False, **options), static):
        assert_same_samples(a, b, atol = 1e-5)
    assert ('modality', 1, (2, 2)) in kinds(static[1])
    kinds_captured = {type(graph.fn.__self__).__name__ for graph in fake_graphs[3:]}
    assert kinds_captured == {'TextStep', 'ModalityStep'}


@pytest.mark.skipif(not torch.cuda.is_available(), reason = 'CUDA graphs need a CUDA device')
def test_cuda_graphs_match_the_dynamic_path():
    torch.manual_seed(0)
    model = untrained_but_not_trivial().cuda()
    prompt = torch.randint(0, NUM_TEXT_TOKENS, (3, 4), device = 'cuda')
    dynamic = model.generate_text_only(prompt, 30, temperature = 0., static_decode = False)
    assert torch.equal(model.generate_text_only(prompt, 30, temperature = 0.), dynamic)         # static, captured: the default
    options = dict(batch_size = 2, modality_type = 1, seed = 0)
    assert torch.allclose(model.generate_modality_only(**options), model.generate_modality_only(**options, static_decode = False), atol = 1e-4)

    # once captured, a greedy decoding step never waits on the host
    with torch.no_grad():
        backend = StaticBackend(model, 3, 32)
        logits = backend.decode(backend.decode(prompt).argmax(-1)[:, None])
        torch.cuda.set_sync_debug_mode('error')
        try:
            for _ in range(5):
                logits = backend.decode(logits.argmax(-1)[:, None])
        finally:
            torch.cuda.set_sync_debug_mode(0)
