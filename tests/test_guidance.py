import warnings

import pytest
import torch

import transfusion_pytorch.model as model_module
from transfusion_pytorch.backends import CachedBackend, Latents, items_to_sample
from transfusion_pytorch.generation import SampleOptions, Sampler
from transfusion_pytorch.guidance import GuidedBackend, drop_text_conditions, unconditional_items, unconditional_sample
from transfusion_pytorch.inputs import Text
from transfusion_pytorch.packing import pack

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
    def spy(samples, vocab, wrap = True):
        seen.append(samples)
        return pack(samples, vocab, wrap = wrap)
    monkeypatch.setattr(model_module, 'pack', spy)
    model(batch, **forward_kwargs)
    return seen[0]


def has_text(sample):
    return any(isinstance(segment, Text) for segment in sample)


def test_prob_uncond_one_trains_only_unconditional_sequences(monkeypatch):
    model = tiny_model(prob_uncond = 1.)
    batch = MIXED_BATCH()
    given = model.to_samples(batch)[0]

    samples = packed_samples(monkeypatch, model.train(), batch)
    assert not has_text(samples[0])                                     # the text of a mixed sample is gone,
    assert kinds_of(samples[0]) == kinds_of(given[0])[1::2]             # its modalities stay, in order
    assert samples[1] == given[1] and samples[2] == given[2]            # the others are left alone

    # the sequence packed for the dropped sample: SOS, then each modality with its header and EOM, EOS
    tokens = pack([samples[0]], model.vocab).tokens
    assert (tokens[tokens != 0] >= NUM_TEXT_TOKENS).all()

    assert has_text(packed_samples(monkeypatch, model.eval(), batch)[0])               # not in eval mode
    assert has_text(packed_samples(monkeypatch, model.train(), batch, prob_uncond = 0.)[0])   # the override
    assert not has_text(packed_samples(monkeypatch, tiny_model(prob_uncond = 0.), batch, prob_uncond = 1.)[0])


def kinds_of(sample):
    return ['text' if isinstance(segment, Text) else ('modality', segment.modality_type, segment.shape) for segment in sample]


def test_drop_rate_and_validation():
    model = tiny_model()
    samples = model.to_samples([MIXED_BATCH()[0]] * 2000)[0]
    _, dropped = drop_text_conditions(samples, 0.25, torch.Generator().manual_seed(0))
    assert 0.2 < dropped.float().mean() < 0.3
    with pytest.raises(ValueError):
        tiny_model(prob_uncond = 1.5)


def test_unconditional_items_are_the_training_transform(model):
    """The unconditional sequence that guided sampling caches is what condition dropout trains on."""
    vocab = model.vocab
    block0 = Latents(0, torch.randn(3, DIM_LATENTS[0]), (3,))
    block1 = Latents(1, torch.randn(4, DIM_LATENTS[1]), (2, 2))
    header = lambda m, shape: [vocab.meta, *vocab.encode_shape(shape), vocab.bom(m)]
    items = [vocab.sos, 5, 6, *header(0, (3,)), block0, vocab.eom(0), 7, *header(1, (2, 2)), block1, vocab.eom(1), 8]

    uncond = unconditional_items(items, vocab)
    expected = unconditional_sample(items_to_sample(items, vocab, wrapped = True))
    a, b = pack([items_to_sample(uncond, vocab, wrapped = True)], vocab), pack([expected], vocab)
    assert torch.equal(a.tokens, b.tokens)
    assert all(torch.equal(x, y) for x, y in zip(a.latents, b.latents))

    # a header being written is left out until its BOM; a complete one is kept
    assert unconditional_items(items + [9, vocab.meta, vocab.digit0 + 2], vocab) == uncond
    assert unconditional_items(items + [vocab.meta, vocab.digit0 + 2, vocab.bom(0)], vocab) == uncond + header(0, (2,))


# sampling: guidance

SCRIPT = lambda vocab: [4, vocab.meta, *vocab.encode_shape((2, 3)), vocab.bom(1), None, 9,
                        vocab.meta, *vocab.encode_shape((3,)), vocab.bom(0), None, 2, vocab.eos]


@pytest.mark.parametrize('prompt', list(PROMPTS))
def test_guided_cached_matches_guided_uncached(model, prompt):
    script = SCRIPT(model.vocab)
    cached = run(model, [PROMPTS[prompt]], [script], max_length = 64, cfg_scale = 3.)[0]
    uncached = run(model, [PROMPTS[prompt]], [script], max_length = 64, cfg_scale = 3., use_cache = False)[0]
    assert kinds(cached)[-5:] == ['text', ('modality', 1, (2, 3)), 'text', ('modality', 0, (3,)), 'text']
    assert_same_samples(cached, uncached)

    unguided = run(model, [PROMPTS[prompt]], [script], max_length = 64)[0]
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
    options = SampleOptions(max_length = 40, text_temperature = 1., modality_steps = 3, force_modality_at_start = (1, (2, 2)))
    samples = model.to_samples(prompt)[0]

    def sample_with(backend):
        with torch.no_grad():
            return Sampler(model, options, backend).run(samples, [torch.Generator().manual_seed(0)])[0]

    plain = sample_with(CachedBackend(model, 1, 40))
    # the guided backend at scale 1: the unconditional branch runs, and changes nothing
    guided = sample_with(GuidedBackend(CachedBackend(model, 1, 40), CachedBackend(model, 1, 40), 1., model.vocab))
    assert [i for i in plain if isinstance(i, int)] == [i for i in guided if isinstance(i, int)]
    for x, y in zip([i for i in plain if isinstance(i, Latents)], [i for i in guided if isinstance(i, Latents)]):
        assert torch.allclose(x.values, y.values, atol = 1e-5)

    # and the public default (cfg_scale = 1) skips it: exactly the unguided path
    a = model.sample(PROMPTS['mixed'], max_length = 40, force_modality_at_start = 1, seed = 3)
    b = model.sample(PROMPTS['mixed'], max_length = 40, force_modality_at_start = 1, seed = 3, cfg_scale = 1.)
    assert_same_samples(a, b, atol = 0.)


def test_cfg_scale_zero_samples_the_unconditional_model(model):
    """At scale 0 the velocity is the unconditional branch's: the modality is the one sampled
    with the prompt's text removed."""
    noise = torch.randn(2, 2, DIM_LATENTS[1])
    options = dict(max_length = 40, force_modality_at_start = (1, (2, 2)), init_modality_noise = noise)
    guided = run(model, [PROMPTS['mixed']], cfg_scale = 0., **options)[0]
    text_free = run(model, [[PROMPTS['mixed'][1]]], **options)[0]
    conditional = run(model, [PROMPTS['mixed']], **options)[0]
    assert torch.allclose(guided[3][1], text_free[3][1], atol = 1e-5)      # [text?, (0, x), text?, (1, forced), text]
    assert not torch.allclose(guided[3][1], conditional[3][1], atol = 1e-3)
