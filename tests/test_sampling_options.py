"""The options of the generation calls: rows that do not depend on their batch in
`generate_modality_only` with adaptive solvers, and a clear error at the call for each option
given a value it cannot take (naming it, what was expected and what was given)."""

import pytest
import torch

from test_generation import untrained_but_not_trivial

from conftest import DIM_LATENTS

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture
def model():
    torch.manual_seed(0)
    return untrained_but_not_trivial()


# generate_modality_only with an adaptive solver

@pytest.mark.parametrize('use_cache', [False, True])
def test_modality_only_rows_do_not_depend_on_the_batch_with_adaptive_solvers(model, use_cache):
    # dopri5 picks its steps from the error of what it integrates: each row is integrated alone,
    # as sample() does. Without the cache a row is then the same to the bit; the cached path's
    # batched matmuls differ in the last bit with the batch size (1e-7, as for sample(), see
    # test_adaptive_solver_in_sample), which dopri5's many evaluations amplify to 3e-5 here.
    # Shared step control differed by 1e-2.
    atol = 1e-4 if use_cache else 0.
    options = dict(modality_type = 1, fixed_modality_shape = (2, 3), ode_method = 'dopri5', ode_atol = 1e-3, ode_rtol = 1e-3,
                   use_cache = use_cache)
    batch = model.generate_modality_only(batch_size = 3, seed = 5, **options)
    for row in range(3):
        alone = model.generate_modality_only(batch_size = 1, seed = 5 + row, **options)[0]
        torch.testing.assert_close(batch[row], alone, atol = atol, rtol = 0)
        # what sample() draws for the same modality, started alone after SOS and its header
        sample = model.sample(seed = 5 + row, force_modality_at_start = (1, (2, 3)), max_length = 0,
                              **{k: v for k, v in options.items() if k.startswith('ode') or k == 'use_cache'})
        torch.testing.assert_close(alone, sample[1][1], atol = 0., rtol = 0)

    looser = model.generate_modality_only(batch_size = 1, seed = 5, **{**options, 'ode_atol': 1e-1, 'ode_rtol': 1e-1})[0]
    assert not torch.allclose(looser, batch[0], atol = 1e-4)        # the tolerances are used


def test_modality_only_fixed_grid_rows_are_the_rows_of_sample(model):
    batch = model.generate_modality_only(batch_size = 2, seed = 1, modality_type = 0, modality_steps = 3, time_shift = 2.)
    for row in range(2):
        sample = model.sample(seed = 1 + row, force_modality_at_start = 0, max_length = 0, modality_steps = 3, time_shift = 2.)
        torch.testing.assert_close(batch[row], sample[1][1], atol = 1e-6, rtol = 0)


# options given values they cannot take

PROMPT = torch.zeros(1, 2, dtype = torch.long)

SAMPLE_ERRORS = [
    (dict(max_length = 20.), r'max_length must be an int >= 0 \(the tokens to generate after the prompt\), got 20.0'),
    (dict(time_shift = 0), r'time_shift must be a finite number > 0 \(1 is no shift\), got 0'),
    (dict(time_shift = float('inf')), r'time_shift must be a finite number > 0 \(1 is no shift\), got inf'),
    (dict(ode_atol = -1.), r'ode_atol must be a finite number >= 0 \(a tolerance of the adaptive ODE methods\), got -1.0'),
    (dict(ode_rtol = '1e-3'), r"ode_rtol must be a finite number >= 0 .* got '1e-3'"),
    (dict(ode_atol = 0, ode_rtol = 0.), 'ode_atol and ode_rtol cannot both be 0'),
    (dict(text_temperature = 'hot'), r"text_temperature must be a finite number >= 0 \(0 is greedy\), got 'hot'"),
    (dict(text_temperature = float('nan')), r'text_temperature must be a finite number >= 0 \(0 is greedy\), got nan'),
    (dict(text_min_p = float('nan')), r'text_min_p must be None or lie in \[0, 1\], got nan'),
    (dict(cfg_scale = 'strong'), r"cfg_scale must be a finite number \(1: no guidance\), got 'strong'"),
    (dict(cfg_scale = float('nan')), r'cfg_scale must be a finite number \(1: no guidance\), got nan'),
    (dict(init_modality_noise = torch.full((4, 6), float('nan'))), r'init_modality_noise must be finite, got NaN or inf in a torch.float32 tensor of shape \(4, 6\)'),
    (dict(return_latents = 'no'), r"return_latents must be True or False, got 'no'"),
    (dict(use_cache = 'no'), r"use_cache must be True, False or None, got 'no'"),
    (dict(cache_kv = 0), r'cache_kv must be True, False or None, got 0'),
    (dict(seed = 1.5), r'seed must be None or an int, got float 1.5'),
    (dict(seed = '7'), r"seed must be None or an int, got str '7'"),
    (dict(seed = 1, generator = torch.Generator()), r'pass generator or seed, not both: got generator = Generator .* and seed = 1'),
    (dict(generator = 3), r'generator must be None, a torch.Generator or a list of them \(one per prompt\), got int 3'),
    (dict(batch_size = 2, generator = [torch.Generator(), 3]), r"generator: each must be a torch.Generator or None, got \['Generator', 'int'\]"),
]


@pytest.mark.parametrize('options, message', SAMPLE_ERRORS, ids = [str(list(o)) for o, _ in SAMPLE_ERRORS])
def test_bad_sample_options_are_errors_at_the_call(model, options, message):
    with pytest.raises(ValueError, match = message):
        model.sample(**{'max_length': 0, **options})       # no modality is started: checked all the same


TEXT_ONLY_ERRORS = [
    (dict(temperature = -1), r'temperature must be a finite number >= 0 \(0 is greedy\), got -1'),
    (dict(top_k = 0), 'top_k must be None or a positive int, got 0'),
    (dict(min_p = 2.), r'min_p must be None or lie in \[0, 1\], got 2.0'),
    (dict(seq_len = -1), r'`seq_len` must be >= 0 \(the length of the rows, prompt included\), got -1'),
    (dict(seed = 2.), 'seed must be None or an int, got float 2.0'),
    (dict(use_cache = 1), 'use_cache must be True, False or None, got 1'),
]


@pytest.mark.parametrize('options, message', TEXT_ONLY_ERRORS, ids = [str(list(o)) for o, _ in TEXT_ONLY_ERRORS])
def test_bad_text_only_options_are_errors_at_the_call(model, options, message):
    with pytest.raises(ValueError, match = message):
        model.generate_text_only(PROMPT, **{'seq_len': 4, **options})


MODALITY_ONLY_ERRORS = [
    (dict(time_shift = 0), r'time_shift must be a finite number > 0 \(1 is no shift\), got 0'),
    (dict(ode_method = 'dopri5', ode_atol = -1e-3), 'ode_atol must be a finite number >= 0'),
    (dict(return_latents = None), 'return_latents must be True or False, got None'),
    (dict(generator = 'g'), "generator must be None, a torch.Generator or a list of them .* got str 'g'"),
]


@pytest.mark.parametrize('options, message', MODALITY_ONLY_ERRORS, ids = [str(list(o)) for o, _ in MODALITY_ONLY_ERRORS])
def test_bad_modality_only_options_are_errors_at_the_call(model, options, message):
    with pytest.raises(ValueError, match = message):
        model.generate_modality_only(**options)


def test_options_whose_meaning_is_plain_are_accepted(model):
    # (type, None): that type with its default shape; a shape as a list; a seed of 0; negative seeds
    sample = model.sample(force_modality_at_start = (1, None), max_length = 0, seed = 0)
    assert sample[1][0] == 1 and sample[1][1].shape == (2, 2, DIM_LATENTS[1])
    listed = model.sample(force_modality_at_start = 0, fixed_modality_shape = [3], max_length = 0, seed = -4, return_latents = True)
    assert listed[1][1].shape == (3, DIM_LATENTS[0])
    assert model.generate_text_only(PROMPT, 1).shape == (1, 0)      # seq_len below the prompt's length: nothing to add



def test_a_seeded_draw_is_the_generators_draw():
    from transfusion_pytorch.sampling import draw
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for seed in range(20):
        expected = torch.multinomial(probs[None], 1, generator = torch.Generator().manual_seed(seed))[0]
        assert torch.equal(draw(probs, torch.Generator().manual_seed(seed)), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason = 'CUDA probabilities with the CPU generators `seed` makes')
def test_a_seed_draws_the_same_tokens_from_cuda_probabilities():
    """CUDA's multinomial refuses a CPU generator: the draw happens on the generator's device,
    so the tokens equal the CPU's for the same probabilities."""
    from transfusion_pytorch.sampling import sample_token
    logits = torch.randn(4, 50, generator = torch.Generator().manual_seed(0))
    on_cpu = sample_token(logits, generators = [torch.Generator().manual_seed(r) for r in range(4)])
    on_cuda = sample_token(logits.cuda(), generators = [torch.Generator().manual_seed(r) for r in range(4)])
    assert on_cuda.device.type == 'cuda' and torch.equal(on_cuda.cpu(), on_cpu)
