"""The architecture and objective options: each is wired in (it changes the output or the
loss), keeps gradients finite, still lets a small model learn, and keeps cached generation
equal to the uncached reference."""

import math

import pytest
import torch
from torch import nn

from transfusion_pytorch.attention import scaled_dot_product
from transfusion_pytorch.norms import RMSNorm
from transfusion_pytorch.transformer import LASER_BOUND

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, OVERFIT_TRANSFORMER, overfit, overfit_batch, tiny_model
from test_generation import assert_same_samples, run, untrained_but_not_trivial
from test_model import fixed_noise_and_times, per_sample_noise

TRANSFORMER = dict(dim = 32, depth = 2, dim_head = 8, heads = 2)

TRANSFORMER_OPTIONS = dict(
    unit_offset_norms_off = dict(unit_offset_norms = False),
    qk_rmsnorm_off = dict(qk_rmsnorm = False),
    attn_gate_values_off = dict(attn_gate_values = False),
    unet_skips_off = dict(unet_skips = False),
    softcap = dict(attn_softcap = 5.),
    laser = dict(attn_laser = True),
    value_residual = dict(use_value_residual = True),
    hyper_connections = dict(num_residual_streams = 3),
    frac_connections = dict(num_residual_fracs = 4),
    hyper_and_frac = dict(num_residual_streams = 2, num_residual_fracs = 2),
    dropout = dict(dropout = 0.1, attn_dropout = 0.1),
    wider_ff_and_heads = dict(ff_expansion_factor = 2., dim_head = 16, heads = 4),
)

_batch_generator = torch.Generator().manual_seed(0)       # the same batch whichever tests ran before this module was imported
BATCH = [
    [torch.tensor([1, 2, 3]), (0, torch.randn(3, DIM_LATENTS[0], generator = _batch_generator)), torch.tensor([4]),
     (1, torch.randn(2, 2, DIM_LATENTS[1], generator = _batch_generator))],
    [(1, torch.randn(1, 3, DIM_LATENTS[1], generator = _batch_generator)), torch.tensor([5, 6])],
]


def perturb(model):
    """Moves zero-initialised parameters off zero, so every path matters."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def fixed_loss(model, batch = BATCH, seed = 0):
    torch.manual_seed(seed)
    noise = [per_sample_noise(sample) for sample in batch]
    times = [[0.3 + 0.2 * i for i in range(sum(isinstance(e, tuple) for e in sample))] for sample in batch]
    return model.compute_loss(*fixed_noise_and_times(model, batch, noise, times))


def copy_shared_weights(source, target, perturb_others = False):
    """Loads into `target` every parameter of `source` with the same name and shape; with
    `perturb_others`, moves the others (the option's own) off their starting values."""
    target_state = target.state_dict()
    shared = {k: v for k, v in source.state_dict().items() if k in target_state and target_state[k].shape == v.shape}
    target.load_state_dict(shared, strict = False)
    if perturb_others:
        with torch.no_grad():
            for name, parameter in target.named_parameters():
                if name not in shared:
                    parameter.add_(torch.randn_like(parameter) * 0.1)
    return target


# transformer options

@pytest.mark.parametrize('name', list(TRANSFORMER_OPTIONS))
def test_transformer_option_is_wired_in_with_finite_gradients(name):
    torch.manual_seed(0)
    baseline = perturb(tiny_model(transformer = TRANSFORMER)).eval()
    option = copy_shared_weights(baseline, tiny_model(transformer = {**TRANSFORMER, **TRANSFORMER_OPTIONS[name]}), perturb_others = True)
    option.train(name == 'dropout')

    base_loss, option_loss = fixed_loss(baseline).total, fixed_loss(option).total
    assert not torch.allclose(base_loss, option_loss), name

    option_loss.backward()
    for param_name, param in option.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), param_name
    assert all(p.grad is not None for p in option.transformer.blocks.parameters())


@pytest.mark.parametrize('name', ['softcap', 'laser', 'value_residual', 'hyper_and_frac', 'frac_connections'])
def test_small_model_with_option_still_learns(name):
    torch.manual_seed(0)
    model = tiny_model(transformer = {**OVERFIT_TRANSFORMER, **TRANSFORMER_OPTIONS[name]}, min_time_before_text = 0.)
    first, last = overfit(model)
    assert last < first / 10, (name, first, last)


def test_unit_offset_norm_stores_gain_minus_one():
    x = torch.randn(5, 8)
    offset, plain = RMSNorm(8, unit_offset = True), RMSNorm(8, unit_offset = False)
    assert (offset.weight == 0).all() and (plain.weight == 1).all()
    torch.testing.assert_close(offset(x), plain(x))
    with torch.no_grad():
        offset.weight.fill_(0.5)
        plain.weight.fill_(1.5)
    torch.testing.assert_close(offset(x), plain(x))


def test_softcap_matches_the_formula_and_stays_finite():
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    q = q * 1e4                                                     # huge logits
    out = scaled_dot_product(q, k, v, is_causal = True, softcap = 5.)
    scores = 5. * torch.tanh((q @ k.transpose(-1, -2)) / math.sqrt(8) / 5.)
    scores = scores.masked_fill(~torch.ones(4, 4, dtype = torch.bool).tril(), float('-inf'))
    torch.testing.assert_close(out, scores.softmax(-1) @ v)
    assert torch.isfinite(out).all()


def test_laser_is_log_of_attention_over_exp_values_and_stable():
    torch.manual_seed(0)
    model = perturb(tiny_model(transformer = {**TRANSFORMER, 'attn_laser': True})).eval()
    attention = model.transformer.blocks[0].attn

    # capture q, k, v by recomputing them the way the module does, then compare with the formula
    seen = {}
    original = scaled_dot_product
    import transfusion_pytorch.attention as attention_module
    def spy(q, k, v, **kwargs):
        seen['args'] = (q, k, v, kwargs)
        seen['out'] = original(q, k, v, **kwargs)
        return seen['out']
    attention_module.scaled_dot_product, saved = spy, attention_module.scaled_dot_product
    try:
        fixed_loss(model)
    finally:
        attention_module.scaled_dot_product = saved

    q, k, exp_v, kwargs = seen['args']
    assert (exp_v > 0).all() and (exp_v <= 1).all()          # exp(softclamp(v) - bound)
    v = torch.log(exp_v) + LASER_BOUND
    weights = original(q, k, torch.eye(k.shape[-2]).expand(*k.shape[:2], -1, -1).to(q), **kwargs)
    expected = torch.log(weights @ torch.exp(v - LASER_BOUND)) + LASER_BOUND
    torch.testing.assert_close(torch.log(seen['out'].clamp(min = torch.finfo(q.dtype).tiny)) + LASER_BOUND, expected, atol = 1e-4, rtol = 1e-4)

    # 1e4-scale inputs stay finite
    big = [[torch.tensor([1, 2]), (0, torch.randn(3, DIM_LATENTS[0]) * 1e4)]]
    with torch.no_grad():
        attention.to_qkv.weight.mul_(1e3)
    loss = model(big)
    assert torch.isfinite(loss)


def test_value_residual_with_mix_one_is_plain_attention():
    torch.manual_seed(0)
    plain = perturb(tiny_model(transformer = TRANSFORMER)).eval()
    mixed = copy_shared_weights(plain, tiny_model(transformer = {**TRANSFORMER, 'use_value_residual': True})).eval()
    with torch.no_grad():
        for block in mixed.transformer.blocks[1:]:
            block.attn.to_value_mix.weight.zero_()
            block.attn.to_value_mix.bias.fill_(50.)     # sigmoid = 1: keep the layer's own values
    torch.testing.assert_close(fixed_loss(plain).total, fixed_loss(mixed).total)
    with torch.no_grad():
        for block in mixed.transformer.blocks[1:]:
            block.attn.to_value_mix.bias.fill_(-50.)    # take the first layer's values
    assert not torch.allclose(fixed_loss(plain).total, fixed_loss(mixed).total)


def test_gate_fully_open_is_ungated_attention():
    torch.manual_seed(0)
    ungated = perturb(tiny_model(transformer = {**TRANSFORMER, 'attn_gate_values': False})).eval()
    gated = copy_shared_weights(ungated, tiny_model(transformer = TRANSFORMER)).eval()
    with torch.no_grad():
        for block in gated.transformer.blocks:
            block.attn.to_gates.weight.zero_()
            block.attn.to_gates.bias.fill_(50.)
    torch.testing.assert_close(fixed_loss(ungated).total, fixed_loss(gated).total)


def test_one_stream_one_frac_is_a_plain_residual():
    from transfusion_pytorch.residual import ResidualMix
    mix = ResidualMix(8, num_streams = 1, num_fracs = 1, layer_index = 3)
    x, y = torch.randn(5, 1, 8), torch.randn(5, 8)
    branch_input, saved = mix.read(x)
    torch.testing.assert_close(branch_input, x[:, 0])
    torch.testing.assert_close(mix.write(saved, y), x + y[:, None])


def test_frac_connections_at_init_are_a_plain_residual():
    from transfusion_pytorch.residual import ResidualMix
    mix = ResidualMix(8, num_streams = 1, num_fracs = 4, layer_index = 0)
    x, y = torch.randn(5, 1, 8), torch.randn(5, 8)
    branch_input, saved = mix.read(x)
    torch.testing.assert_close(branch_input, x[:, 0])
    torch.testing.assert_close(mix.write(saved, y), x + y[:, None])


def test_hyper_connections_read_their_stream_and_write_to_all():
    from transfusion_pytorch.residual import ResidualMix
    mix = ResidualMix(8, num_streams = 3, num_fracs = 1, layer_index = 4)
    state, y = torch.randn(5, 3, 8), torch.randn(5, 8)
    branch_input, saved = mix.read(state)
    torch.testing.assert_close(branch_input, state[:, 4 % 3])
    torch.testing.assert_close(mix.write(saved, y), state + y[:, None])
    with torch.no_grad():
        mix.to_dynamic.weight.normal_()
    assert not torch.allclose(mix.read(state)[0], state[:, 1])     # the dynamic weights are wired in


# modality options

def test_x_prediction_converts_the_output_to_a_velocity():
    torch.manual_seed(0)
    velocity_model = perturb(tiny_model(transformer = TRANSFORMER)).eval()
    clean_model = copy_shared_weights(velocity_model, tiny_model(transformer = TRANSFORMER, model_output_clean = True)).eval()

    packed, span_times, noise = fixed_noise_and_times(velocity_model, BATCH, [per_sample_noise(s) for s in BATCH], [[0.3, 0.6], [0.8]])
    v_output = velocity_model.predict(packed, span_times, noise)
    x_output = clean_model.predict(packed, span_times, noise)

    for m in range(len(DIM_LATENTS)):
        output = velocity_model.model_to_velocity[m](v_output.hidden[packed.latent_index[m]])   # same weights: same raw output
        t = x_output.row_times[m]
        expected = (output - x_output.noised[m]) / (1 - t).clamp(min = 0.05)
        torch.testing.assert_close(x_output.velocities[m], expected, atol = 1e-5, rtol = 1e-5)

    first, last = overfit(tiny_model(transformer = OVERFIT_TRANSFORMER, model_output_clean = True, min_time_before_text = 0.))
    assert last < first / 10, (first, last)


def test_velocity_consistency_loss_has_a_gradient_that_reaches_the_model():
    torch.manual_seed(0)
    model = perturb(tiny_model(transformer = TRANSFORMER))
    ema = model.create_ema()
    with torch.no_grad():
        for p in ema.ema_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)       # an EMA that lags behind the model

    loss, breakdown = model(BATCH, velocity_consistency_ema_model = ema, return_breakdown = True)
    assert len(breakdown.velocity_consistency) == len(DIM_LATENTS)
    consistency = sum(breakdown.velocity_consistency)
    assert consistency > 0

    grads = torch.autograd.grad(consistency, list(model.transformer.parameters()), allow_unused = True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    assert all(p.grad is None for p in ema.parameters())

    without = model(BATCH, return_breakdown = True)[1]
    assert without.velocity_consistency == ()


def test_velocity_consistency_target_is_the_ema_velocity_a_moment_later():
    torch.manual_seed(0)
    model = perturb(tiny_model(transformer = TRANSFORMER)).eval()
    ema = model.create_ema()
    packed, span_times, noise = fixed_noise_and_times(model, BATCH, [per_sample_noise(s) for s in BATCH], [[0.3, 0.6], [0.8]])
    breakdown = model.compute_loss(packed, span_times, noise, ema_model = ema, delta_time = 0.1)
    ours = model.predict(packed, span_times, noise).velocities
    later = model.predict(packed, span_times + 0.1, noise).velocities
    for m in range(len(DIM_LATENTS)):
        torch.testing.assert_close(breakdown.velocity_consistency[m], (ours[m] - later[m]).pow(2).mean())


def test_reconstruction_loss_reaches_the_transformer():
    torch.manual_seed(0)
    encoder = nn.Conv2d(3, DIM_LATENTS[1], 1)
    decoder = nn.Conv2d(DIM_LATENTS[1], 3, 1)
    model = perturb(tiny_model(
        transformer = TRANSFORMER, channel_first_latent = (False, True),
        modality_encoder = (None, encoder), modality_decoder = (None, decoder), reconstruction_loss_weight = 0.5,
    ))
    images = [torch.randn(3, 2, 2), torch.randn(3, 1, 3)]
    batch = [[torch.tensor([1]), (1, images[0]), (0, torch.randn(2, DIM_LATENTS[0]))], [(1, images[1])]]

    loss, breakdown = model(batch, return_breakdown = True, times = torch.tensor([[0.5, 0.5], [0.7, 0.]]))
    reconstruction = breakdown.reconstruction
    assert reconstruction[1] > 0
    torch.testing.assert_close(loss, breakdown.text + sum(breakdown.flow) + 0.5 * sum(reconstruction))

    grads = torch.autograd.grad(reconstruction[1], list(model.transformer.parameters()), allow_unused = True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0

    # against the images as given: a perfect prediction of the clean latent would leave only the codec's error
    packed = model.pack(batch)
    with torch.no_grad():
        clean = packed.latents[1][:4].reshape(2, 2, -1)
        expected = nn.functional.mse_loss(decoder(clean.permute(2, 0, 1)[None])[0], images[0])
        assert torch.isclose(model.decode_latent(1, clean), decoder(clean.permute(2, 0, 1)[None])[0]).all()
    assert expected > 0


def make_pre_post(dim = 32):
    down = nn.Conv2d(DIM_LATENTS[1], dim, kernel_size = 2, stride = 2)
    up = nn.ConvTranspose2d(dim, DIM_LATENTS[1], kernel_size = 2, stride = 2)
    return (None, (down, up))


@pytest.mark.parametrize('shape', [(2, 2), (4, 2), (2, 6), (6, 4)])
def test_pre_post_enc_dec_round_trips_shapes(shape):
    model = tiny_model(transformer = TRANSFORMER, channel_first_latent = (False, True), pre_post_transformer_enc_dec = make_pre_post())
    image = torch.randn(DIM_LATENTS[1], *shape)
    packed = model.pack([[torch.tensor([1]), (1, image)]])
    token_shape = (shape[0] // 2, shape[1] // 2)
    assert packed.span_records[0].shape == shape and packed.span_records[0].token_shape == token_shape
    assert packed.span_length.tolist() == [math.prod(token_shape)]
    assert packed.latents[1].shape == (math.prod(shape), DIM_LATENTS[1])          # the flow runs on the full latent

    prediction = model.predict(packed, torch.tensor([0.5]), tuple(torch.randn_like(latents) for latents in packed.latents))
    assert prediction.velocities[1].shape == packed.latents[1].shape


def test_pre_post_enc_dec_trains_and_rejects_what_it_cannot_restore():
    torch.manual_seed(0)
    model = tiny_model(transformer = dict(dim = 64, depth = 2, dim_head = 16, heads = 4), channel_first_latent = (False, True),
                       pre_post_transformer_enc_dec = make_pre_post(64))
    batch = [[torch.tensor([1, 2]), (1, torch.randn(DIM_LATENTS[1], 4, 2))], [(1, torch.randn(DIM_LATENTS[1], 2, 6)), torch.tensor([3])]]
    loss = model(batch)
    loss.backward()
    assert model.pre_post[1].encoder.weight.grad.abs().sum() > 0
    assert model.pre_post[1].decoder.weight.grad.abs().sum() > 0

    optimizer = torch.optim.AdamW(model.parameters(), lr = 3e-3)
    losses = []
    for _ in range(150):
        loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < losses[0] / 5

    with pytest.raises(ValueError, match = 'must restore the latent shape'):
        model([[(1, torch.randn(DIM_LATENTS[1], 3, 3))]])


def test_pre_post_needs_pairs():
    with pytest.raises(ValueError, match = 'pre_post_transformer_enc_dec'):
        tiny_model(pre_post_transformer_enc_dec = (nn.Identity(),))


# generation stays exact with the options on

ALL_ON = dict(attn_softcap = 5., attn_laser = True, use_value_residual = True, num_residual_streams = 2, num_residual_fracs = 2)


@pytest.mark.parametrize('variant', ['transformer_options', 'x_prediction', 'pre_post'])
def test_cached_matches_uncached_with_options(variant):
    torch.manual_seed(0)
    kwargs = dict(transformer = {**TRANSFORMER, **ALL_ON})
    if variant == 'x_prediction':
        kwargs['model_output_clean'] = True
    if variant == 'pre_post':
        kwargs.update(channel_first_latent = (False, True), pre_post_transformer_enc_dec = make_pre_post())
    model = untrained_but_not_trivial(**kwargs)

    vocab = model.vocab
    prompt = [torch.randint(0, NUM_TEXT_TOKENS, (3,)), (0, torch.randn(3, DIM_LATENTS[0])), torch.randint(0, NUM_TEXT_TOKENS, (2,))]
    script = [4, vocab.meta, *vocab.encode_shape((2, 4)), vocab.bom(1), None, 9,
              vocab.meta, *vocab.encode_shape((3,)), vocab.bom(0), None, 2, vocab.eos]
    cached = run(model, [prompt], [script], max_length = 64)[0]
    uncached = run(model, [prompt], [script], max_length = 64, use_cache = False)[0]
    assert_same_samples(cached, uncached)


def test_small_model_learns_with_reconstruction_and_velocity_consistency():
    torch.manual_seed(0)
    model = tiny_model(transformer = OVERFIT_TRANSFORMER, reconstruction_loss_weight = 0.5, velocity_consistency_loss_weight = 0.1,
                       min_time_before_text = 0.)
    ema = model.create_ema(beta = 0.9)
    batch = overfit_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr = 3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 300)
    losses = []
    for _ in range(300):
        loss, breakdown = model(batch, velocity_consistency_ema_model = ema, return_breakdown = True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        ema.update()
        losses.append(loss.item())
    assert len(breakdown.reconstruction) == len(breakdown.velocity_consistency) == len(DIM_LATENTS)
    assert sum(losses[-20:]) / 20 < losses[0] / 10, (losses[0], sum(losses[-20:]) / 20)


def test_the_ema_samples_like_the_model():
    torch.manual_seed(0)
    model = perturb(tiny_model(transformer = TRANSFORMER)).eval()
    ema = model.create_ema()
    ema.update()                          # the first update copies the weights
    options = dict(max_length = 24, text_temperature = 0., modality_steps = 2, force_modality_at_start = (1, (2, 2)), seed = 0)
    assert_same_samples(model.sample(**options), ema.sample(**options))
