import warnings

import pytest
import torch

import transfusion_pytorch.latents as latents_module
from transfusion_pytorch.backends import CachedBackend, Latents, items_to_sample
from transfusion_pytorch.generation import SampleOptions, Sampler
from transfusion_pytorch.guidance import Guidance, GuidedBackend, drop_text_conditions, mix, unconditional_items, unconditional_sample
from transfusion_pytorch.inputs import Text
from transfusion_pytorch.packing import IGNORE, pack

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, tiny_model
from test_generation import PROMPTS, assert_same_samples, kinds, run, untrained_but_not_trivial


@pytest.fixture
def model():
    return untrained_but_not_trivial()


def text(n):
    return torch.randint(0, NUM_TEXT_TOKENS, (n,))


MIXED_BATCH = lambda: [
    [text(4), (0, torch.randn(3, DIM_LATENTS[0])), text(2), (1, torch.randn(2, 2, DIM_LATENTS[1])), text(3)],
    [text(6)],                                      # text only: nothing to drop
    [(1, torch.randn(1, 2, DIM_LATENTS[1]))],       # modality only: nothing to drop
]


# training: condition dropout

def packed_samples(monkeypatch, model, batch, **forward_kwargs):
    """The samples that `model(batch)` hands to `pack`."""
    seen = []
    def spy(samples, vocab, **kwargs):
        seen.append(samples)
        return pack(samples, vocab, **kwargs)
    monkeypatch.setattr(latents_module, 'pack', spy)
    model(batch, **forward_kwargs)
    return seen[0]


def has_text(sample):
    return any(isinstance(segment, Text) for segment in sample)


def test_prob_uncond_one_trains_only_unconditional_sequences(monkeypatch):
    model = tiny_model(prob_uncond = 1.)
    batch = MIXED_BATCH()
    given = model.to_samples(batch)[0]

    samples = packed_samples(monkeypatch, model.train(), batch)
    # the text before the last modality of a mixed sample is gone; its modalities, in order,
    # and the text after the last one stay
    assert kinds_of(samples[0]) == [kinds_of(given[0])[1], kinds_of(given[0])[3], 'text']
    assert torch.equal(samples[0][-1].ids, given[0][-1].ids)
    assert samples[1] == given[1] and samples[2] == given[2]            # the others are left alone

    assert kinds_of(packed_samples(monkeypatch, model.eval(), batch)[0]) == kinds_of(given[0])            # not in eval mode
    assert kinds_of(packed_samples(monkeypatch, model.train(), batch, prob_uncond = 0.)[0]) == kinds_of(given[0])   # the override
    assert len(packed_samples(monkeypatch, tiny_model(prob_uncond = 0.), batch, prob_uncond = 1.)[0]) == 3


def kinds_of(sample):
    return ['text' if isinstance(segment, Text) else ('modality', segment.modality_type, segment.shape) for segment in sample]


def test_drop_rate_and_validation():
    model = tiny_model()
    samples = model.to_samples([MIXED_BATCH()[0]] * 2000)[0]
    _, dropped = drop_text_conditions(samples, 0.25, torch.Generator().manual_seed(0))
    assert 0.2 < dropped.float().mean() < 0.3
    with pytest.raises(ValueError):
        tiny_model(prob_uncond = 1.5)


# what dropout teaches, layout by layout: (layout, the dropped sample's kinds)

def t(*ids):
    return torch.tensor(ids)


def image():
    return (1, torch.randn(2, 2, DIM_LATENTS[1]))


LAYOUTS = dict(
    text_to_image = lambda: ([t(1, 2, 3), image()], ['modality']),
    image_to_text = lambda: ([image(), t(4, 5)], None),                                  # a caption: nothing to drop
    text_image_text = lambda: ([t(1, 2), image(), t(4, 5)], ['modality', 'text']),
    several_modalities = lambda: ([t(1), (0, torch.randn(3, DIM_LATENTS[0])), t(2, 3), image(), t(6, 7)], ['modality', 'modality', 'text']),
    two_modalities_in_a_row = lambda: ([t(1), image(), image()], ['modality', 'modality']),
    modality_last_after_a_caption = lambda: ([image(), t(8, 9), image()], ['modality', 'modality']),
)


def header(vocab, m, shape):
    return [vocab.meta, *vocab.encode_shape(shape), vocab.bom(m)]


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_what_condition_dropout_teaches_in_each_layout(layout):
    """The packed text targets of a dropped sample: the structure of every modality, the text
    after the last modality (a caption) and its EOS; never EOS straight after an image (the
    captioned image kept its caption, and a text -> image sample loses its EOS target)."""
    model = tiny_model(prob_uncond = 1.).train()
    vocab = model.vocab
    sample, dropped_kinds = LAYOUTS[layout]()
    packed = model.pack([sample], prob_uncond = 1.)
    targets = packed.text_target[packed.text_target != IGNORE].tolist()

    if dropped_kinds is None:                       # nothing to drop: taught as it is
        assert torch.equal(packed.tokens, model.pack([sample], prob_uncond = 0.).tokens)
        return

    last = max(i for i, element in enumerate(sample) if isinstance(element, tuple))
    kept = [element for i, element in enumerate(sample) if isinstance(element, tuple) or i > last]
    assert ['modality' if isinstance(e, tuple) else 'text' for e in kept] == dropped_kinds

    expected = []
    for element in kept:
        if isinstance(element, tuple):
            m, latent = element
            expected += header(vocab, m, tuple(latent.shape[:-1]))            # META, shape, BOM; EOM is not a target
        else:
            expected += element.tolist()
    if isinstance(sample[-1], torch.Tensor):
        assert targets == expected + [vocab.eos]
        assert targets[-len(sample[-1]) - 1:-1] == sample[-1].tolist()       # the caption is still taught
    else:
        assert targets == expected                                              # no EOS right after the image


def flat_tokens(items):
    """A generation sequence as `pack` lays it out: latent blocks as zeros."""
    out = []
    for item in items:
        out += [0] * len(item) if isinstance(item, Latents) else [item]
    return out


def as_items(sample, vocab):
    """The sample as the generation sequence that samples it (SOS first, no EOS)."""
    items = [vocab.sos]
    for element in sample:
        if isinstance(element, tuple):
            m, latent = element
            shape = tuple(latent.shape[:-1])
            items += [*header(vocab, m, shape), Latents(m, latent.reshape(-1, latent.shape[-1]), shape), vocab.eom(m)]
        else:
            items += element.tolist()
    return items


@pytest.mark.parametrize('layout', list(LAYOUTS))
def test_unconditional_items_are_the_training_transform(layout):
    """Guided sampling's unconditional sequence is what condition dropout trains on: of a whole
    sequence, the packed dropped sample; at the moment each modality is denoised (its BOM
    written), a prefix of it."""
    model = tiny_model()
    vocab = model.vocab
    sample = LAYOUTS[layout]()[0]
    items = as_items(sample, vocab)
    dropped = pack([unconditional_sample(model.to_samples([sample])[0][0])], vocab)

    uncond = unconditional_items(items, vocab)
    assert flat_tokens(uncond) == dropped.tokens.tolist()[:-1]                # all but EOS
    got = pack([items_to_sample(uncond, vocab, wrapped = True)], vocab)
    assert torch.equal(got.tokens, dropped.tokens)
    assert all(torch.equal(x, y) for x, y in zip(got.latents, dropped.latents))

    for end, item in enumerate(items):
        if isinstance(item, int) and vocab.is_bom(item):                      # a modality about to be denoised
            prefix = unconditional_items(items[:end + 1], vocab)
            assert flat_tokens(prefix) == dropped.tokens.tolist()[:len(flat_tokens(prefix))] and prefix[-1] == item
            assert all(isinstance(i, Latents) or i >= NUM_TEXT_TOKENS for i in prefix)     # no text conditions it


def test_unconditional_items_of_unfinished_sequences():
    vocab = tiny_model().vocab
    block = Latents(0, torch.randn(3, DIM_LATENTS[0]), (3,))
    items = [vocab.sos, 5, 6, *header(vocab, 0, (3,)), block, vocab.eom(0), 7, 8]
    # text after the last modality is kept, as training keeps a caption
    assert unconditional_items(items, vocab) == [vocab.sos, *header(vocab, 0, (3,)), block, vocab.eom(0), 7, 8]
    # a header being written is the last modality's: the text before it goes
    assert unconditional_items(items + [vocab.meta, vocab.digit0 + 2], vocab) == [vocab.sos, *header(vocab, 0, (3,)), block, vocab.eom(0), vocab.meta, vocab.digit0 + 2]
    # no modality: nothing to drop
    assert unconditional_items([vocab.sos, 5, 6], vocab) == [vocab.sos, 5, 6]


# sampling: guidance

SCRIPT = lambda vocab: [4, vocab.meta, *vocab.encode_shape((2, 3)), vocab.bom(1), None, 9,
                        vocab.meta, *vocab.encode_shape((3,)), vocab.bom(0), None, 2, vocab.eos]


INTERVALS = dict(everywhere = dict(guidance_interval = (0., 1.)), default = dict(), interval = dict(guidance_interval = (0.3, 0.8)),
                 linear = dict(guidance_interval = (0.2, 1.), guidance_schedule = 'linear'))


@pytest.mark.parametrize('prompt', list(PROMPTS))
@pytest.mark.parametrize('guidance', list(INTERVALS))
def test_guided_cached_matches_guided_uncached(model, prompt, guidance):
    script = SCRIPT(model.vocab)
    options = dict(max_length = 64, cfg_scale = 3., modality_steps = 5, **INTERVALS[guidance])
    cached = run(model, [PROMPTS[prompt]], [script], **options)[0]
    uncached = run(model, [PROMPTS[prompt]], [script], use_cache = False, **options)[0]
    assert kinds(cached)[-5:] == ['text', ('modality', 1, (2, 3)), 'text', ('modality', 0, (3,)), 'text']
    assert_same_samples(cached, uncached)

    unguided = run(model, [PROMPTS[prompt]], [script], max_length = 64, modality_steps = 5, cfg_scale = 1.)[0]
    assert not torch.allclose(cached[-2][1], unguided[-2][1], atol = 1e-3)    # guidance changes the modalities


def test_guided_batch_matches_each_prompt_alone(model):
    prompts = list(PROMPTS.values())
    script = SCRIPT(model.vocab)
    batched = run(model, prompts, [script, [], script[1:], script], max_length = 48, cfg_scale = 2.5)
    for index, prompt in enumerate(prompts):
        alone = run(model, [prompt], [[script, [], script[1:], script][index]], seeds = [index], max_length = 48, cfg_scale = 2.5)[0]
        assert_same_samples(batched[index], alone)


def test_cfg_scale_one_equals_the_unguided_path(model):
    prompt = [PROMPTS['mixed']]
    options = SampleOptions(max_length = 40, max_total_length = 40, text_temperature = 1., modality_steps = 3,
                            force_modality_at_start = (1, (2, 2)))          # rows of 40 tokens at most: the caches below
    samples = model.to_samples(prompt)[0]

    def sample_with(backend):
        with torch.no_grad():
            return Sampler(model, options, backend).run(samples, [torch.Generator().manual_seed(0)])[0]

    plain = sample_with(CachedBackend(model, 1, 40))
    # the guided backend at scale 1: w(t) = 1 everywhere, so the unconditional branch never runs
    uncond = Recorder(CachedBackend(model, 1, 40))
    guided = sample_with(GuidedBackend(CachedBackend(model, 1, 40), uncond, Guidance(cfg_scale = 1.), model.vocab))
    assert uncond.calls == []
    assert [i for i in plain if isinstance(i, int)] == [i for i in guided if isinstance(i, int)]
    for x, y in zip([i for i in plain if isinstance(i, Latents)], [i for i in guided if isinstance(i, Latents)]):
        assert torch.equal(x.values, y.values)



def test_the_default_cfg_scale_follows_condition_dropout():
    """Without cfg_scale, a model built with condition dropout (prob_uncond > 0, the default) is
    guided at scale 3; one built without, whose unconditional branch is untrained, is not."""
    def draw(model, **options):
        return model.sample(PROMPTS['mixed'], max_length = 40, force_modality_at_start = 1, seed = 3, **options)

    model = untrained_but_not_trivial()
    assert model.config.prob_uncond == 0.1
    assert_same_samples(draw(model), draw(model, cfg_scale = 3.), atol = 0.)
    assert not torch.allclose(draw(model)[3][1], draw(model, cfg_scale = 1.)[3][1], atol = 1e-3)

    model = untrained_but_not_trivial(prob_uncond = 0.)
    assert_same_samples(draw(model), draw(model, cfg_scale = 1.), atol = 0.)
    assert not torch.allclose(draw(model)[3][1], draw(model, cfg_scale = 3.)[3][1], atol = 1e-3)


def test_cfg_scale_zero_samples_the_unconditional_model(model):
    """At scale 0 the velocity is the unconditional branch's: the modality is the one sampled
    with the prompt's text removed."""
    noise = torch.randn(2, 2, DIM_LATENTS[1])
    options = dict(max_length = 40, force_modality_at_start = (1, (2, 2)), init_modality_noise = noise)
    guided = run(model, [PROMPTS['mixed']], cfg_scale = 0., guidance_interval = (0., 1.), **options)[0]
    text_free = run(model, [[PROMPTS['mixed'][1]]], cfg_scale = 1., **options)[0]
    conditional = run(model, [PROMPTS['mixed']], cfg_scale = 1., **options)[0]
    assert torch.allclose(guided[3][1], text_free[3][1], atol = 1e-5)      # [text?, (0, x), text?, (1, forced), text]
    assert not torch.allclose(guided[3][1], conditional[3][1], atol = 1e-3)


# sampling: guidance in an interval of times, and its schedule

class Recorder:
    """Wraps a backend and records each step's requests and outputs."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def rewind(self, row, num):
        self.backend.rewind(row, num)

    def step(self, requests):
        outputs = self.backend.step(requests)
        self.calls.append((list(requests), list(outputs)))
        return outputs


def test_guidance_weight():
    constant = Guidance(cfg_scale = 3., guidance_interval = (0.25, 0.75))
    assert [constant.weight(t) for t in (0., 0.2, 0.25, 0.5, 0.75, 0.8, 1.)] == [1., 1., 3., 3., 3., 1., 1.]
    linear = Guidance(cfg_scale = 3., guidance_interval = (0.25, 0.75), guidance_schedule = 'linear')
    assert [linear.weight(t) for t in (0.2, 0.25, 0.375, 0.5, 0.75, 0.8)] == [1., 1., 1.5, 2., 3., 1.]
    assert Guidance(cfg_scale = 0.).weight(0.5) == 0. and Guidance().off and not Guidance(cfg_scale = 2.).off


@pytest.mark.parametrize('schedule', ['constant', 'linear'])
@pytest.mark.parametrize('method', ['euler', 'midpoint'])
def test_guided_velocity_inside_the_interval_conditional_alone_outside(model, schedule, method):
    """Each ODE stage of a guided sample: inside the interval, v_uncond + w(t) (v_cond - v_uncond)
    with both branches' own outputs; outside it, the conditional velocity as it is, and no
    unconditional call for it."""
    low, high, scale = 0.3, 0.7, 2.5
    vocab, steps = model.vocab, 8
    cond, uncond = Recorder(CachedBackend(model, 2, 64)), Recorder(CachedBackend(model, 2, 64))
    guidance = Guidance(cfg_scale = scale, guidance_interval = (low, high), guidance_schedule = schedule)
    guided = Recorder(GuidedBackend(cond, uncond, guidance, vocab))
    # max_length = 0: each row denoises the forced modality and stops, whatever the weights would write next
    options = SampleOptions(max_length = 0, modality_steps = steps, ode_method = method, force_modality_at_start = (1, (2, 2)),
                            cfg_scale = scale, guidance_interval = (low, high), guidance_schedule = schedule)
    prompts = model.to_samples([PROMPTS['mixed'], PROMPTS['text']])[0]
    with torch.no_grad():
        Sampler(model, options, guided).run(prompts, [torch.Generator().manual_seed(row) for row in range(2)])

    uncond_velocity = {id(request): output for requests, outputs in uncond.calls for request, output in zip(requests, outputs)
                       if request is not None and not request.keep}
    assert len(cond.calls) == len(guided.calls)                 # the conditional branch runs at every step
    inside = outside = 0
    for (requests, outputs), (_, cond_outputs) in zip(guided.calls, cond.calls):
        for request, output, cond_output in zip(requests, outputs, cond_outputs):
            if request is None or request.keep:
                continue
            t = request.time
            if low <= t <= high and (schedule == 'constant' or t > low):
                weight = scale if schedule == 'constant' else 1. + (scale - 1.) * (t - low) / (high - low)
                assert torch.allclose(output, uncond_velocity[id(request)] + weight * (cond_output - uncond_velocity[id(request)]))
                assert not torch.allclose(output, cond_output, atol = 1e-4)
                inside += 1
            else:
                assert id(request) not in uncond_velocity and output is cond_output
                outside += 1
    stages = 2 * steps * (2 if method == 'midpoint' else 1)
    assert inside + outside == stages and inside > 0 and outside > 0
    assert len(uncond_velocity) == inside


def count_model_calls(model, **options) -> int:
    calls = []
    handle = model.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        # the prompt, then a forced 2 x 2 modality; max_length = 0 ends the sample right after it
        model.sample(PROMPTS['text'], max_length = 0, force_modality_at_start = (1, (2, 2)), modality_steps = 4, ode_method = 'euler',
                     seed = 0, **options)
    finally:
        handle.remove()
    return len(calls)


def test_no_unconditional_model_call_outside_the_interval(model):
    """Counted at the model: the unconditional branch costs one call per stage where w(t) != 1,
    plus one to bring its rows up to date before the first, and nothing else."""
    unguided = count_model_calls(model, cfg_scale = 1.)
    assert count_model_calls(model, cfg_scale = 3., guidance_interval = (0., 1.)) == unguided + 4 + 1       # stages at t = 0, 1/4, 1/2, 3/4
    assert count_model_calls(model, cfg_scale = 3., guidance_interval = (0.5, 1.)) == unguided + 2 + 1
    assert count_model_calls(model, cfg_scale = 3., guidance_interval = (0., 1.), guidance_schedule = 'linear') == unguided + 3 + 1    # w(0) = 1
    assert count_model_calls(model) == unguided + 1 + 1                                      # the default: (0.6, 1), scale 3
    assert count_model_calls(model, cfg_scale = 3., guidance_interval = (0.8, 1.)) == unguided          # no stage inside
    assert count_model_calls(model, cfg_scale = 1., guidance_interval = (0.5, 1.)) == unguided


@pytest.mark.parametrize('options, message', [
    (dict(guidance_interval = (0.8, 0.2)), r'guidance_interval must be two times \(t_lo, t_hi\) with 0 <= t_lo < t_hi <= 1 .*got \(0.8, 0.2\)'),
    (dict(guidance_interval = (0.5, 0.5)), r'guidance_interval must be .* got \(0.5, 0.5\)'),
    (dict(guidance_interval = (-0.1, 1.)), r'guidance_interval must be .* got \(-0.1, 1.0\)'),
    (dict(guidance_interval = 0.5), r'guidance_interval must be .* got 0.5'),
    (dict(guidance_interval = (0., float('nan'))), r'guidance_interval must be .* got \(0.0, nan\)'),
    (dict(guidance_schedule = 'cosine'), r"guidance_schedule must be one of \('constant', 'linear'\), got 'cosine'"),
    (dict(cfg_scale = float('inf')), r'cfg_scale must be a finite number \(1: no guidance\), got inf'),
    (dict(cfg_scale = '3'), r"cfg_scale must be a finite number \(1: no guidance\), got '3'"),
])
def test_guidance_options_are_checked(model, options, message):
    with pytest.raises(ValueError, match = message):
        model.sample(max_length = 16, **options)
