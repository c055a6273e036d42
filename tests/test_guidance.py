import warnings

import pytest
import torch

import transfusion_pytorch.model as model_module
from transfusion_pytorch.backends import CachedBackend, Latents, items_to_sample
from transfusion_pytorch.generation import SampleOptions, Sampler
from transfusion_pytorch.guidance import GuidedBackend, drop_text_conditions, unconditional_items, unconditional_sample
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
    options = SampleOptions(max_length = 40, max_total_length = 40, text_temperature = 1., modality_steps = 3,
                            force_modality_at_start = (1, (2, 2)))          # rows of 40 tokens at most: the caches below
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
