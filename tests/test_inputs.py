"""Each input error names the argument, what was expected and what was given."""

import pytest
import torch

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, tiny_model

MODEL = None


def model():
    global MODEL
    MODEL = MODEL or tiny_model()
    return MODEL


def text(n = 3):
    return torch.randint(0, NUM_TEXT_TOKENS, (n,))


CASES = [
    # (id, batch, error type, fragments the message must contain)
    ('latent dim mismatch', [[text(), (0, torch.randn(2, 5))]], ValueError, ['modalities[0][1]', 'latent dim 6', '(2, 5)']),
    ('wrong number of dims', [[text(), (1, torch.randn(3, DIM_LATENTS[1]))]], ValueError, ['modalities[0][1]', 'expects 2 axes', 'got 1']),
    ('modality type out of range', [[text(), (2, torch.randn(2, 6))]], ValueError, ['modalities[0][1]', '[0, 2)', 'got 2']),
    ('negative modality type', [[(-1, torch.randn(2, 6))]], ValueError, ['modalities[0][0]', 'got -1']),
    ('text id too large', [[text(), torch.tensor([1, NUM_TEXT_TOKENS])]], ValueError, ['modalities[0][1]', f'[0, {NUM_TEXT_TOKENS})', f'id {NUM_TEXT_TOKENS}']),
    ('negative text id', [[torch.tensor([-3])]], ValueError, ['modalities[0][0]', 'id -3']),
    ('empty sample', [[text()], []], ValueError, ['modalities[1]', 'empty sample']),
    ('empty batch', [], ValueError, ['modalities', 'at least one sample']),
    ('non-finite modality', [[(0, torch.tensor([[float('nan')] * 6]))]], ValueError, ['modalities[0][0]', 'finite']),
    ('infinite modality', [[text(), (0, torch.full((1, 6), float('inf')))]], ValueError, ['modalities[0][1]', 'finite']),
    ('float text', [[torch.randn(4)]], ValueError, ['modalities[0][0]', 'latent dim 6', 'text must be an integer tensor']),
    ('integer modality in a tuple', [[(0, torch.ones(2, 6, dtype = torch.long))]], TypeError, ['modalities[0][0]', 'float tensor', 'torch.int64']),
    ('2-d text', [[torch.ones(2, 2, dtype = torch.long)]], ValueError, ['modalities[0][0]', '1-d', '(2, 2)']),
    ('bool tensor', [[torch.ones(3, dtype = torch.bool)]], TypeError, ['modalities[0][0]', 'torch.bool']),
    ('not a tensor', [[text(), 'hello']], TypeError, ['modalities[0][1]', 'str']),
    ('sample not a list', [text(), 7], TypeError, ['modalities[1]', 'int']),
    ('bad tuple', [[(0, torch.randn(2, 6), 1)]], TypeError, ['modalities[0][0]', '(modality_type, tensor)']),
    ('float modality type', [[(0.5, torch.randn(2, 6))]], TypeError, ['modalities[0][0]', 'modality type must be an int']),
    ('zero-sized modality', [[(0, torch.randn(0, 6))]], ValueError, ['modalities[0][0]', 'at least one token']),
    ('scalar modality', [[(0, torch.tensor(1.))]], ValueError, ['modalities[0][0]', 'latent dim of size 6', 'scalar']),
    ('complex modality', [[(0, torch.randn(2, 6, dtype = torch.complex64))]], TypeError, ['modalities[0][0]', 'float tensor', 'complex64']),
    ('text id position', [[text(), torch.tensor([1, 2, 99, 3])]], ValueError, ['modalities[0][1]', 'id 99 at position 2']),
    ('batch not a list', 'hello', TypeError, ['`modalities` must be a list of samples', 'str']),
]


@pytest.mark.parametrize('batch, error, fragments', [case[1:] for case in CASES], ids = [case[0] for case in CASES])
def test_bad_list_input_raises(batch, error, fragments):
    with pytest.raises(error) as info:
        model()(batch)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_bad_text_batch():
    with pytest.raises(ValueError, match = r'\[0, 32\)'):
        model()(torch.full((2, 4), NUM_TEXT_TOKENS))
    with pytest.raises(ValueError, match = 'Int\\[b n\\]'):
        model()(torch.ones(2, 3, 4, dtype = torch.long))


def test_bad_modality_batch():
    with pytest.raises(ValueError, match = '`modality_type` must be given'):
        model()(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match = r'`modality_type` must lie in \[0, 2\), got 5'):
        model()(torch.randn(2, 3, 6), modality_type = 5)
    with pytest.raises(ValueError, match = r'modalities\[0\].*latent dim 6'):
        model()(torch.randn(2, 3, 5), modality_type = 0)
    bad = torch.randn(2, 3, 6)
    bad[1, 0, 0] = float('nan')
    with pytest.raises(ValueError, match = r'modalities\[1\].*finite'):
        model()(bad, modality_type = 0)


def test_bad_times():
    batch = [[text(), (0, torch.randn(2, 6)), (0, torch.randn(1, 6))]]
    with pytest.raises(ValueError, match = r'`times` must have shape \(batch, max modalities per sample\) = \(1, >= 2\)'):
        model()(batch, times = torch.tensor([[0.5]]))
    with pytest.raises(ValueError, match = r'`times` must lie in \[0, 1\]'):
        model()(batch, times = torch.tensor([[0.5, 1.5]]))
    for bad in (float('nan'), float('inf'), -float('inf')):
        with pytest.raises(ValueError, match = rf'`times` must lie in \[0, 1\] \(0 is noise, 1 is data\), got {bad} at times\[0, 1\]'):
            model()(batch, times = torch.tensor([[0.5, bad]]))
        with pytest.raises(ValueError, match = r'`times` must lie in \[0, 1\]'):
            model()(batch, num_modalities_to_times_fn = lambda counts: torch.full((1, 2), bad))
    # a time past a sample's modalities is never used, whatever it holds
    assert torch.isfinite(model()(batch, times = torch.tensor([[0.5, 0.2, float('nan')]])))


def test_bad_prompt():
    """`sample(prompt = ...)`: errors name `prompt`, `prompt[j]` or `prompt[i][j]`."""
    cases = [
        ('hello', TypeError, ['`prompt` must be None, a text tensor, a (modality_type, tensor) tuple or a list of them', "str 'hello'"]),
        (['hello'], TypeError, ['`prompt[0]` must be a tensor or a (modality_type, tensor) tuple', 'str']),
        ([[text()], [text(), torch.tensor([NUM_TEXT_TOKENS])]], ValueError, ['`prompt[1][1]`', f'id {NUM_TEXT_TOKENS} (SOS) at position 0']),
        ([[text()], [text(), torch.tensor([999])]], ValueError, ['`prompt[1][1]`', 'ids must lie in [0, vocab size) = [0, 50)', 'id 999 at position 0']),
        (torch.ones(2, 2, dtype = torch.long), ValueError, ['`prompt`', '1-d integer tensor', '(2, 2)']),
        ([(0, torch.randn(2, 5))], ValueError, ['`prompt[0]`', 'latent dim 6', '(2, 5)']),
        ([(3, torch.randn(2, 6))], ValueError, ['`prompt[0]`', '[0, 2)', 'got 3']),
    ]
    for prompt, error, fragments in cases:
        with pytest.raises(error) as info:
            model().sample(prompt, max_length = 16)
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))


def test_empty_prompts_are_allowed():
    for prompt in (None, []):
        assert isinstance(model().sample(prompt, max_length = 4, seed = 0), list)


def test_max_total_length_below_what_a_prompt_asks_for():
    # a prompt longer than max_length is not an error (tests/test_generation_length.py); one that
    # max_total_length cannot hold, with the modality it asks for, is
    with pytest.raises(ValueError, match = r'max_total_length = 10 is less than the 31 tokens that prompt 1 asks for \(SOS, the prompt, '
                                           r'and a modality that it opens or force_modality_at_start asks for\)'):
        model().sample([[text(2)], [text(30)]], max_total_length = 10)
    with pytest.raises(ValueError, match = r'max_total_length = 9 is less than the 10 tokens that prompt 0 asks for'):
        model().sample([text(2)], max_total_length = 9, force_modality_at_start = (0, (3,)))   # SOS, 2, META 3 BOM, 3 latents, EOM


def test_bad_sampling_options():
    cases = [
        (dict(max_length = -1), r'max_length must be an int >= 0 \(the tokens to generate after the prompt\), got -1'),
        (dict(max_total_length = 2.5), r'max_total_length must be None or a positive int \(the tokens of a row, prompt included\), got 2.5'),
        (dict(text_temperature = -1.), r'text_temperature must be a finite number >= 0 \(0 is greedy\), got -1.0'),
        (dict(ode_method = 'rk99'), "ode_method must be one of .* got 'rk99'"),
        (dict(batch_size = 2, generator = [torch.Generator()]), r'expected one generator per prompt \(2\), got 1'),
        (dict(force_modality_at_start = (0, (3,)), init_modality_noise = torch.randn(2, 6)), r'init_modality_noise must hold 3 rows of 6 values'),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match = message):
            model().sample(**{'max_length': 16, **options})

    with pytest.raises(TypeError, match = "sample: unknown key 'temperature'; did you mean 'text_temperature'?"):
        model().sample(max_length = 16, temperature = 0.)
    with pytest.raises(TypeError, match = "generate_text_only: unknown key 'temprature'; did you mean 'temperature'?"):
        model().generate_text_only(torch.zeros(1, 2, dtype = torch.long), 4, temprature = 0.)
    with pytest.raises(TypeError, match = "generate_modality_only: unknown key 'steps'.* modality_steps"):
        model().generate_modality_only(steps = 3)

    no_default = tiny_model(modality_default_shape = None)
    with pytest.raises(ValueError, match = 'modality type 0 has no modality_default_shape'):
        no_default.sample(max_length = 16, force_modality_at_start = 0)
    with pytest.raises(ValueError, match = 'pass fixed_modality_shape'):
        no_default.generate_modality_only(modality_type = 0)


def test_bad_text_only_prompt():
    cases = [
        (torch.zeros(2, 0, dtype = torch.long), 4, ValueError, r'`prompt` must be an Int\[b n\] tensor .* got a torch.int64 tensor of shape \(2, 0\)'),
        (torch.zeros(3, dtype = torch.long), 4, ValueError, r'`prompt` must be an Int\[b n\] tensor .* shape \(3,\)'),
        (torch.full((1, 2), 999), 4, ValueError, r'`prompt`: ids must lie in \[0, vocab size\) = \[0, \d+\) .* values in \[999, 999\]'),
        (torch.full((1, 2), -1), 4, ValueError, r'`prompt`: ids must lie in \[0, vocab size\)'),
        (torch.zeros(1, 2), 4, TypeError, '`prompt` must be an integer tensor'),
        (torch.zeros(1, 2, dtype = torch.long), 4., TypeError, '`seq_len` must be an int, got float 4.0'),
    ]
    for prompt, seq_len, error, message in cases:
        with pytest.raises(error, match = message):
            model().generate_text_only(prompt, seq_len)


def test_bad_generation_choices():
    sample_cases = [
        (dict(batch_size = 0), 'batch_size must be None or a positive int, got 0'),
        (dict(text_top_k = 0), 'text_top_k must be None or a positive int, got 0'),
        (dict(text_min_p = 2.), r'text_min_p must be None or lie in \[0, 1\], got 2.0'),
        (dict(modality_steps = 0), 'modality_steps must be a positive int, got 0'),
        (dict(fixed_modality_shape = (0,)), r'fixed_modality_shape must be a non-empty tuple of positive ints, got \(0,\)'),
        (dict(force_modality_at_start = 5), r'force_modality_at_start: the modality type must be an int in \[0, 2\), got 5'),
        (dict(force_modality_at_start = (1, (3,))), r'force_modality_at_start: the shape: modality type 1 expects 2 axes \(modality_num_dim\), got the shape \(3,\)'),
    ]
    for options, message in sample_cases:
        with pytest.raises(ValueError, match = message):
            model().sample(max_length = 16, **options)

    modality_cases = [
        (dict(batch_size = 0), 'batch_size must be a positive int, got 0'),
        (dict(modality_type = 2), r'modality_type: the modality type must be an int in \[0, 2\), got 2'),
        (dict(fixed_modality_shape = (2, 0)), r'fixed_modality_shape must be a non-empty tuple of positive ints, got \(2, 0\)'),
        (dict(modality_type = 1, fixed_modality_shape = (4,)), r'fixed_modality_shape: modality type 1 expects 2 axes'),
        (dict(ode_method = 'rk99'), "ode_method must be one of .* got 'rk99'"),
        (dict(modality_steps = 0), 'modality_steps must be a positive int, got 0'),
    ]
    for options, message in modality_cases:
        with pytest.raises(ValueError, match = message):
            model().generate_modality_only(**options)


def test_bad_config():
    with pytest.raises(TypeError, match = "unknown key 'dpth'; did you mean 'depth'"):
        tiny_model(transformer = dict(dim = 32, dpth = 2))
    with pytest.raises(ValueError, match = 'dim_latent'):
        tiny_model(dim_latent = (6, 0))
    with pytest.raises(ValueError, match = 'modality_default_shape'):
        tiny_model(modality_default_shape = ((2,),))
    with pytest.raises(ValueError, match = 'modality_num_dim is 3'):
        tiny_model(modality_num_dim = (1, 3))
    with pytest.raises(ValueError, match = 'dim_head must be even'):
        tiny_model(transformer = dict(dim = 32, depth = 1, dim_head = 7))
    with pytest.raises(TypeError, match = "transformer: the key 'depth' is required"):
        tiny_model(transformer = dict(dim = 32))
    with pytest.raises(ValueError, match = r'transformer.dropout must lie in \[0, 1\), got 1.5'):
        tiny_model(transformer = dict(dim = 32, depth = 1, dropout = 1.5))
    with pytest.raises(ValueError, match = 'num_text_tokens must be a positive int, got 0'):
        tiny_model(num_text_tokens = 0)
    with pytest.raises(ValueError, match = 'modality_default_shape of type 0 must have positive sizes'):
        tiny_model(modality_default_shape = ((0,), (2, 2)))


BAD_CONFIGS = [
    # (keywords, error type, the message)
    (dict(flow_loss_weight = -1.), ValueError, 'flow_loss_weight must be a finite number >= 0 (one, or one per modality type), got -1.0'),
    (dict(flow_loss_weight = (1., -2.)), ValueError, 'flow_loss_weight must be a finite number >= 0 (one, or one per modality type), got -2.0'),
    (dict(flow_loss_weight = float('nan')), ValueError, 'flow_loss_weight must be a finite number >= 0 or a tuple of 2 of them'),
    (dict(text_loss_weight = -1.), ValueError, 'text_loss_weight must be a finite number >= 0, got -1.0'),
    (dict(text_loss_weight = '1'), ValueError, "text_loss_weight must be a finite number >= 0, got '1'"),
    (dict(reconstruction_loss_weight = float('inf')), ValueError, 'reconstruction_loss_weight must be a finite number >= 0, got inf'),
    (dict(velocity_consistency_loss_weight = float('nan')), ValueError, 'velocity_consistency_loss_weight must be a finite number >= 0, got nan'),
    (dict(prob_uncond = '0.1'), ValueError, "prob_uncond must lie in [0, 1], got '0.1'"),
    (dict(model_output_clean = 'no'), ValueError, "model_output_clean must be True or False, got 'no'"),
    (dict(fallback_to_default_shape_if_invalid = 1), ValueError, 'fallback_to_default_shape_if_invalid must be True or False, got 1'),
    (dict(num_text_tokens = True), ValueError, 'num_text_tokens must be a positive int, got True'),
    (dict(dim_latent = (6, 2.5)), ValueError, 'dim_latent must be a positive int or a tuple of them, got (6, 2.5)'),
    (dict(modality_num_dim = (1, -1)), ValueError, 'modality_num_dim of type 1 must be an int >= 0 (the number of axes) or None (any), got -1'),
    (dict(modality_default_shape = 4), ValueError, 'modality_default_shape must be a shape (a tuple of ints, e.g. (8, 8)) or None or a tuple of 2 of them'),
    (dict(modality_default_shape = ((2,), 'ab')), ValueError, "modality_default_shape of modality type 1 must be a shape (a tuple of ints, e.g. (8, 8)) or None, got 'ab'"),
    (dict(channel_first_latent = (False, 1)), ValueError, 'channel_first_latent of modality type 1 must be True or False, got 1'),
    (dict(modality_encoder = (None, 'vae')), ValueError, "modality_encoder of modality type 1 must be a module or None, got 'vae'"),
    (dict(transformer = 512), TypeError, "transformer must be a dict of the transformer's options, e.g. dict(dim = 512, depth = 8), got 512"),
    (dict(transformer = dict(dim = 32, depth = 1, dim_time = 7)), ValueError, 'transformer.dim_time must be even (the time features are sine and cosine pairs), got 7'),
    (dict(transformer = dict(dim = 32, depth = 1, rotary_theta = 0)), ValueError, 'transformer.rotary_theta must be a positive number, got 0'),
    (dict(transformer = dict(dim = 32, depth = 1, ff_expansion_factor = float('nan'))), ValueError, 'transformer.ff_expansion_factor must be a positive number, got nan'),
    (dict(transformer = dict(dim = 4, depth = 1, dim_head = 2, heads = 1, ff_expansion_factor = 0.2)), ValueError, 'transformer.ff_expansion_factor 0.2 leaves the feed-forward of dim 4 without a hidden unit'),
    (dict(transformer = dict(dim = 32, depth = 1, unet_skips = 'yes')), ValueError, "transformer.unet_skips must be True or False, got 'yes'"),
    (dict(transformer = dict(dim = 32, depth = 1, use_flex_attn = 1)), ValueError, 'transformer.use_flex_attn must be True, False or None (on CUDA only), got 1'),
    (dict(transformer = dict(dim = 32, depth = 1, attn_dropout = '0.1')), ValueError, "transformer.attn_dropout must lie in [0, 1), got '0.1'"),
]


@pytest.mark.parametrize('kwargs, error, message', BAD_CONFIGS, ids = [str(case[0])[:60] for case in BAD_CONFIGS])
def test_bad_config_values(kwargs, error, message):
    with pytest.raises(error) as info:
        tiny_model(**kwargs)
    assert message in str(info.value), str(info.value)


def test_a_default_shape_given_as_a_list_is_that_shape():
    """`modality_default_shape = [4]` is the shape (4,), as torch takes sizes as lists too."""
    one_type = dict(dim_latent = 6, modality_num_dim = None)
    assert tiny_model(**one_type, modality_default_shape = [4]).config.modality_default_shape == ((4,),)
    assert tiny_model(modality_default_shape = [[3], [2, 2]]).config.modality_default_shape == ((3,), (2, 2))
    assert tiny_model(modality_default_shape = [4]).config.modality_default_shape == ((4,), (4,))
    with pytest.raises(ValueError, match = 'modality_default_shape .* of type 1 has 1 axes but modality_num_dim is 2'):
        tiny_model(modality_default_shape = [4], modality_num_dim = (1, 2))
    model = tiny_model(**one_type, modality_default_shape = [4])
    assert model.sample(max_length = 12, force_modality_at_start = 0, seed = 0)[1][1].shape == (4, 6)
