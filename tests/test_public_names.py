"""Code written for the public package (0.20.0) runs here: its names map onto this package's
machinery, with one meaning each (see docs/differences.md)."""

import pytest
import torch
from torch import tensor

from transfusion_pytorch import LossBreakdown

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, tiny_model
from test_generation import assert_same_samples, kinds, untrained_but_not_trivial

pytestmark = pytest.mark.usefixtures('one_thread')

FAST = dict(modality_steps = 2, max_length = 24)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return untrained_but_not_trivial()


def text(*ids):
    return torch.tensor(ids, dtype = torch.long)


def alternates(sample) -> bool:
    """[text, (m, x), text, ..., text]: text at even places, modalities at odd ones."""
    return len(sample) % 2 == 1 and all(isinstance(part, tuple) == (i % 2 == 1) for i, part in enumerate(sample))


# sample_one, sample_many

def test_sample_many_rows_are_sample_one_per_prompt(model):
    prompts = [[text(1, 2)], None, [tensor(model.som_ids[1])], (0, torch.randn(3, DIM_LATENTS[0])), [text(3), None]]
    for cfg_scale in (1., 3.):
        many = model.sample_many(prompts, seed = 5, cfg_scale = cfg_scale, **FAST)
        assert len(many) == len(prompts)
        for row, prompt in enumerate(prompts):
            one = model.sample_one(prompt, seed = 5 + row, cfg_scale = cfg_scale, **FAST)
            assert_same_samples(many[row], one)
            assert alternates(one)
    assert_same_samples(model.sample_one(prompts[0], seed = 1, **FAST), model.sample(prompts[0], seed = 1, **FAST))
    assert model.sample_many([], **FAST) == []
    assert len(model.sample_many(None, seed = 0, **FAST)) == 1          # None: one empty prompt


def test_the_ema_samples_under_the_public_names(model):
    ema = model.create_ema()
    assert_same_samples(ema.sample_one([text(1)], seed = 0, **FAST), ema.sample([text(1)], seed = 0, **FAST))
    assert_same_samples(ema.sample_many([[text(1)]], seed = 0, **FAST)[0], ema.sample([text(1)], seed = 0, **FAST))


# cache_kv

def test_cache_kv_is_use_cache(model):
    prompt = [text(4, 5), (1, torch.randn(2, 2, DIM_LATENTS[1]))]
    options = dict(text_temperature = 0., force_modality_at_start = 0, seed = 0, **FAST)
    cached = model.sample(prompt, cache_kv = True, **options)
    assert_same_samples(cached, model.sample(prompt, cache_kv = False, **options))
    assert_same_samples(cached, model.sample(prompt, use_cache = True, cache_kv = True, **options), atol = 0.)

    rows = torch.randint(0, NUM_TEXT_TOKENS, (2, 3))
    out = model.generate_text_only(rows, 12, temperature = 0., cache_kv = True)
    assert torch.equal(out, model.generate_text_only(rows, 12, temperature = 0., cache_kv = False))
    images = model.generate_modality_only(modality_type = 1, seed = 0, cache_kv = False)
    assert torch.allclose(images, model.generate_modality_only(modality_type = 1, seed = 0), atol = 1e-5)

    with pytest.raises(ValueError, match = 'use_cache and cache_kv are two names of one switch, got use_cache = True and cache_kv = False'):
        model.sample(use_cache = True, cache_kv = False)


# prompts with structural ids

def test_a_trailing_start_of_modality_id_starts_that_modality(model):
    # the same as asking for it with force_modality_at_start (whose header counts as generated, the
    # prompt's does not: hence one bound on the whole row for both)
    options = dict(seed = 0, modality_steps = 2, max_length = 100, max_total_length = 30)
    for prime in (tensor(model.som_ids[1]), tensor([model.som_ids[1]])):       # a 0-d id, as the public tests write it
        sample = model.sample([prime], **options)
        assert kinds(sample)[:2] == ['text', ('modality', 1, (2, 2))] and len(sample[0]) == 0
        assert_same_samples(sample, model.sample(None, force_modality_at_start = 1, **options), atol = 0.)

    # with a written shape, and after text
    prompt = [text(3, 4), tensor([model.meta_id]), model.char_tokenizer('3,1'), tensor([model.som_ids[1]])]
    sample = model.sample(prompt, **options)
    assert kinds(sample)[:2] == ['text', ('modality', 1, (3, 1))] and sample[0].tolist() == [3, 4]
    assert_same_samples(sample, model.sample([text(3, 4)], force_modality_at_start = (1, (3, 1)), **options), atol = 0.)


def test_a_modality_framed_by_its_ids_is_the_modality(model):
    """META, shape, BOM before a modality and EOM after it, as the public package's tests write a
    prompt, give the sample of the same prompt without them."""
    x0, x1 = torch.randn(4, DIM_LATENTS[0]), torch.randn(3, 3, DIM_LATENTS[1])
    info0, info1 = model.get_modality_info(0), model.get_modality_info(1)
    framed = [
        text(1, 2, 3), tensor([model.meta_id]), model.char_tokenizer('4'), tensor([info0.som_id]),
        (0, x0), tensor([info0.eom_id]), text(5, 6),
        tensor([model.meta_id]), model.char_tokenizer('3,3'), tensor([info1.som_id]),
        (1, x1), tensor([info1.eom_id, 7]),
        tensor([info0.som_id]), (0, x0),                    # BOM alone before a modality: its header too
    ]
    plain = [text(1, 2, 3), (0, x0), text(5, 6), (1, x1), text(7), (0, x0)]
    a, b = model.sample(framed, seed = 0, **FAST), model.sample(plain, seed = 0, **FAST)
    assert_same_samples(a, b, atol = 0.)
    assert kinds(a)[:7] == ['text', ('modality', 0, (4,)), 'text', ('modality', 1, (3, 3)), 'text', ('modality', 0, (4,)), 'text']


@pytest.mark.parametrize('prompt, message', [
    (lambda m: [tensor([m.sos_id, 1])], r'`prompt\[0\]`: the id 32 \(SOS\) at position 0 is a structural id'),
    (lambda m: [text(1), tensor([m.eom_ids[0]])], r'`prompt\[1\]`: the id 47 \(EOM_0\) at position 0'),
    (lambda m: [(0, torch.randn(2, DIM_LATENTS[0])), tensor([m.eom_ids[1]])], r'the id 49 \(EOM_1\)'),
    (lambda m: [tensor([m.meta_id])], r'the id 34 \(META\) at position 0'),
    (lambda m: [model_char(m, '4'), tensor([m.som_ids[0]])], r'the id 39 \(the shape digit 4\) at position 0'),
    (lambda m: [tensor([m.meta_id, *m.char_tokenizer('05').tolist(), m.som_ids[0]])], r'the shape tokens before BOM_0 do not spell a shape'),
    (lambda m: [tensor([m.meta_id]), m.char_tokenizer('3'), tensor([m.som_ids[0]]), (0, torch.randn(2, DIM_LATENTS[0]))],
     r'`prompt\[2\]`: the header before the modality `prompt\[3\]` announces modality type 0 of shape \(3,\), the modality is of type 0 and shape \(2,\)'),
    (lambda m: [tensor([m.som_ids[1]]), (0, torch.randn(2, DIM_LATENTS[0]))], r'announces modality type 1 of shape None'),
    (lambda m: [tensor([m.meta_id, *m.char_tokenizer('3').tolist(), m.som_ids[1]])],
     r'the prompt opens modality type 1 with the shape \(3,\), but that type has 2 axes \(modality_num_dim\)'),
    (lambda m: torch.ones(2, 3, dtype = torch.long), r'text must be a 1-d integer tensor \(in a prompt also a 0-d id or one \(1, n\) row\)'),
])
def test_misplaced_structural_ids_are_errors(model, prompt, message):
    with pytest.raises(ValueError, match = message):
        model.sample(prompt(model), **FAST)


def model_char(model, text):
    return model.char_tokenizer(text)


def test_prompt_opening_errors():
    model = tiny_model(modality_default_shape = None)
    with pytest.raises(ValueError, match = 'the prompt opens modality type 0 without a shape, and that type has no modality_default_shape'):
        model.sample([tensor(model.som_ids[0])], **FAST)
    with pytest.raises(ValueError, match = r"shape tokens can only write the digits 0-9 and ',', got '3x3'"):
        model.char_tokenizer('3x3')
    with pytest.raises(ValueError, match = r'modality_type must be an int in \[0, 2\), got 2'):
        model.get_modality_info(2)


def test_force_modality_at_start_takes_the_place_of_the_modality_the_prompt_opens(model):
    options = dict(seed = 0, force_modality_at_start = 1, **FAST)
    primed = model.sample([text(2), tensor(model.som_ids[0])], **options)
    assert kinds(primed)[:2] == ['text', ('modality', 1, (2, 2))]
    assert_same_samples(primed, model.sample([text(2)], **options), atol = 0.)


def test_a_one_row_prompt_is_its_row(model):
    row = torch.randint(0, NUM_TEXT_TOKENS, (1, 5))
    assert_same_samples(model.sample(prompt = row, seed = 0, **FAST), model.sample(prompt = row[0], seed = 0, **FAST), atol = 0.)


def test_ids_and_modality_info(model):
    vocab = model.vocab
    assert (model.sos_id, model.eos_id, model.meta_id) == (vocab.sos, vocab.eos, vocab.meta)
    assert model.som_ids == [vocab.bom(0), vocab.bom(1)] and model.eom_ids == [vocab.eom(0), vocab.eom(1)]
    assert model.char_tokenizer('12,3').tolist() == vocab.encode_shape((12, 3))
    info = model.get_modality_info(1)
    assert (info.modality_type, info.dim_latent, info.default_shape, info.num_dim) == (1, DIM_LATENTS[1], (2, 2), 2)
    assert (info.som_id, info.eom_id, info.encoder, info.decoder) == (vocab.bom(1), vocab.eom(1), None, None)
    assert model.get_modality_info() == model.get_modality_info(0)


# init_modality_noise as one (n, d) tensor for modalities of any size

def test_init_modality_noise_takes_the_leading_rows_and_columns(model):
    pool = torch.randn(16, 8)
    for m, shape in ((0, (3,)), (1, (2, 2))):
        exact = pool[:3 if m == 0 else 4, :DIM_LATENTS[m]].reshape(*shape, DIM_LATENTS[m])
        options = dict(force_modality_at_start = (m, shape), seed = 0, **FAST)
        a = model.sample(None, init_modality_noise = pool, **options)
        b = model.sample(None, init_modality_noise = exact, **options)
        assert_same_samples(a, b, atol = 0.)
        assert not torch.allclose(a[1][1], model.sample(None, **options)[1][1])
    with pytest.raises(ValueError, match = r'init_modality_noise must hold 4 rows of 4 values for the modality of type 1 and shape \(2, 2\) '
                                           r'\(as \(2, 2, 4\), or as \(n >= 4, d >= 4\) .*\), got a torch.float32 tensor of shape \(3, 8\)'):
        model.sample(None, init_modality_noise = torch.randn(3, 8), force_modality_at_start = 1, **FAST)
    with pytest.raises(ValueError, match = r'init_modality_noise must be a float tensor of shape \(\*shape, dim_latent\) or \(n, d\)'):
        model.sample(None, init_modality_noise = torch.randn(8), force_modality_at_start = 1, **FAST)


# the returned form

def test_samples_alternate_text_and_modalities(model):
    prompts = [None, [(1, torch.randn(1, 2, DIM_LATENTS[1]))], [text(1), (0, torch.randn(2, DIM_LATENTS[0])), (0, torch.randn(1, DIM_LATENTS[0]))]]
    for sample in model.sample(prompts, seed = 0, force_modality_at_start = 0, **FAST):
        assert alternates(sample)
        assert all(part.dtype == torch.long and part.ndim == 1 for part in sample[::2])
        assert torch.isfinite(model([sample]))              # and it trains as it is


# LossBreakdown

def test_loss_breakdown_public_names_are_ours(model):
    batch = [[text(1, 2), (0, torch.randn(3, DIM_LATENTS[0])), text(3)]]
    _, breakdown = model(batch, return_breakdown = True)
    assert isinstance(breakdown, LossBreakdown)
    assert breakdown.velocity is None and breakdown.recon is None           # off, as in the public package

    model = tiny_model(reconstruction_loss_weight = 0.5)
    _, breakdown = model(batch, return_breakdown = True, velocity_consistency_ema_model = model.create_ema())
    assert breakdown.velocity is breakdown.velocity_consistency and len(breakdown.velocity) == 2
    assert breakdown.recon is breakdown.reconstruction and breakdown.recon[0] > 0
