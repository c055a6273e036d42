import copy
import random

import pytest
import torch
from torch import nn

from transfusion_pytorch import Transfusion
from transfusion_pytorch.flow import interpolate

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, OVERFIT_TRANSFORMER, overfit, random_batch, tiny_model


def fixed_noise_and_times(model, batch, noise_per_sample, times_per_sample):
    """Packs `batch` and lays out per-sample noise and times in the batch's flat order."""
    packed = model.pack(batch)
    noise = tuple(
        torch.cat([noise_per_sample[doc][m] for doc in range(len(batch))]) if packed.latents[m].numel() > 0 else packed.latents[m]
        for m in range(len(DIM_LATENTS))
    )
    most = max(1, max(len(t) for t in times_per_sample))
    times = torch.zeros(len(batch), most)
    for doc, t in enumerate(times_per_sample):
        times[doc, :len(t)] = torch.tensor(t)
    return packed, model.span_times(packed, times = times), noise


def per_sample_noise(sample):
    noise = [[], []]
    for element in sample:
        if isinstance(element, tuple):
            m, latent = element
            noise[m].append(torch.randn(latent[..., 0].numel(), DIM_LATENTS[m]))
    return [torch.cat(n) if n else torch.zeros(0, DIM_LATENTS[m]) for m, n in enumerate(noise)]


def num_modalities(sample):
    return sum(isinstance(element, tuple) for element in sample)


@pytest.mark.parametrize('seed', range(6))
def test_no_leakage_across_samples(seed):
    """Each sample's loss is the same inside a batch as alone, whatever the other samples are."""
    rng = random.Random(seed)
    batch = random_batch(rng, max_samples = 3) + random_batch(rng, max_samples = 2)
    model = tiny_model().eval()

    noise = [per_sample_noise(sample) for sample in batch]
    times = [[rng.random() for _ in range(num_modalities(sample))] for sample in batch]

    together = model.compute_loss(*fixed_noise_and_times(model, batch, noise, times))

    for doc, sample in enumerate(batch):
        alone = model.compute_loss(*fixed_noise_and_times(model, [sample], [noise[doc]], [times[doc]]))
        torch.testing.assert_close(together.per_sample_text[doc], alone.per_sample_text[0], atol = 1e-5, rtol = 1e-5)
        torch.testing.assert_close(together.per_sample_flow[doc], alone.per_sample_flow[0], atol = 1e-5, rtol = 1e-5, equal_nan = True)


def test_changing_one_sample_leaves_the_others_alone():
    rng = random.Random(1)
    batch = [random_batch(rng, 1)[0] for _ in range(3)]
    model = tiny_model().eval()
    noise = [per_sample_noise(sample) for sample in batch]
    times = [[0.5] * num_modalities(sample) for sample in batch]

    before = model.compute_loss(*fixed_noise_and_times(model, batch, noise, times))
    batch[1] = [torch.randint(0, NUM_TEXT_TOKENS, (7,))]
    noise[1], times[1] = per_sample_noise(batch[1]), []
    after = model.compute_loss(*fixed_noise_and_times(model, batch, noise, times))

    for doc in (0, 2):
        torch.testing.assert_close(before.per_sample_text[doc], after.per_sample_text[doc], atol = 1e-5, rtol = 1e-5)
        torch.testing.assert_close(before.per_sample_flow[doc], after.per_sample_flow[doc], atol = 1e-5, rtol = 1e-5, equal_nan = True)
    assert not torch.allclose(before.per_sample_text[1], after.per_sample_text[1])


def test_each_modality_is_noised_at_its_own_time():
    model = tiny_model().eval()
    first, second = torch.randn(3, DIM_LATENTS[0]), torch.randn(2, DIM_LATENTS[0])
    batch = [[torch.tensor([1, 2]), (0, first), torch.tensor([3]), (0, second)]]

    seen = {}
    original_embed = model.embed
    def recording_embed(packed, noised):
        seen['noised'] = noised
        return original_embed(packed, noised)
    model.embed = recording_embed

    noise = per_sample_noise(batch[0])
    packed, span_times, noise = fixed_noise_and_times(model, batch, [noise], [[0.2, 0.9]])
    model.compute_loss(packed, span_times, noise)

    noised = seen['noised'][0]
    torch.testing.assert_close(noised[:3], interpolate(noise[0][:3], first, torch.tensor(0.2)))
    torch.testing.assert_close(noised[3:], interpolate(noise[0][3:], second, torch.tensor(0.9)))


def test_default_times_differ_per_modality_instance():
    model = tiny_model()
    batch = [[(0, torch.randn(2, DIM_LATENTS[0])), (0, torch.randn(2, DIM_LATENTS[0])), (1, torch.randn(1, 1, DIM_LATENTS[1]))]] * 2
    span_times = model.span_times(model.pack(batch))
    assert span_times.shape == (6,)
    assert len(set(span_times.tolist())) == 6
    assert ((span_times >= 0) & (span_times <= 1)).all()


def test_num_modalities_to_times_fn_sets_the_times():
    model = tiny_model()
    batch = [[(0, torch.randn(2, DIM_LATENTS[0])), torch.tensor([1]), (1, torch.randn(1, 2, DIM_LATENTS[1]))], [(0, torch.randn(1, DIM_LATENTS[0]))]]
    seen = {}
    def times_fn(num_modalities):
        seen['num'] = num_modalities.tolist()
        return torch.tensor([[0.1, 0.2], [0.3, 0.0]])
    span_times = model.span_times(model.pack(batch), num_modalities_to_times_fn = times_fn)
    assert seen['num'] == [2, 1]
    torch.testing.assert_close(span_times, torch.tensor([0.1, 0.2, 0.3]))

    loss_a = model(batch, num_modalities_to_times_fn = lambda n: torch.full((2, 2), 0.99))
    loss_b = model(batch, num_modalities_to_times_fn = lambda n: torch.full((2, 2), 0.01))
    assert loss_a.item() != loss_b.item()


def test_return_breakdown():
    model = tiny_model()
    batch = random_batch(random.Random(2))
    loss, breakdown = model(batch, return_breakdown = True)
    assert loss is breakdown.total
    expected = breakdown.text + sum(breakdown.flow)
    torch.testing.assert_close(loss, expected)
    assert len(breakdown.flow) == len(DIM_LATENTS)


def test_loss_weights_are_applied():
    batch = [[torch.tensor([1, 2]), (0, torch.randn(2, DIM_LATENTS[0])), (1, torch.randn(1, 2, DIM_LATENTS[1]))]]
    model = tiny_model(text_loss_weight = 0.5, flow_loss_weight = (2., 3.))
    loss, breakdown = model(batch, return_breakdown = True)
    torch.testing.assert_close(loss, 0.5 * breakdown.text + 2. * breakdown.flow[0] + 3. * breakdown.flow[1])


def assert_finite_grads_on_touched_params(model, untouched = ()):
    """Every transformer parameter but the `untouched` ones has a finite gradient, and no
    parameter anywhere has a non-finite one."""
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
    for name, param in model.transformer.named_parameters():
        if not any(part in name for part in untouched):
            assert param.grad is not None, name


def test_text_only_pretraining():
    model = tiny_model()
    text = torch.randint(0, NUM_TEXT_TOKENS, (3, 20))
    loss, breakdown = model(text, return_breakdown = True)
    loss.backward()
    assert all(f.item() == 0 for f in breakdown.flow)
    assert breakdown.text > 0
    assert_finite_grads_on_touched_params(model, untouched = ('to_time_embed', 'to_modulation'))


def test_text_only_matches_a_plain_causal_lm_loss():
    """Raw text rows: every token predicts the next, nothing else is added."""
    model = tiny_model().eval()
    text = torch.randint(0, NUM_TEXT_TOKENS, (2, 9))
    packed = model.pack(text)
    hidden = model.hidden_states(packed, tuple(l for l in packed.latents), torch.zeros(0))
    logits = model.to_logits(hidden).view(2, 9, -1)
    expected = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), text[:, 1:].reshape(-1))
    torch.testing.assert_close(model(text), expected)


def test_modality_only_pretraining():
    model = tiny_model()
    images = torch.randn(4, 2, 3, DIM_LATENTS[1])
    loss, breakdown = model(images, modality_type = 1, return_breakdown = True)
    loss.backward()
    assert breakdown.flow[1] > 0 and breakdown.flow[0] == 0
    assert model.latent_to_model[1].weight.grad.abs().sum() > 0
    assert_finite_grads_on_touched_params(model)


def test_inputs_are_not_mutated():
    model = tiny_model(channel_first_latent = (False, True))
    batch = [[torch.tensor([1, 2]), (0, torch.randn(2, DIM_LATENTS[0])), (1, torch.randn(DIM_LATENTS[1], 2, 2))], [torch.tensor([5])]]
    snapshot = copy.deepcopy(batch)
    model(batch).backward()
    assert len(batch) == len(snapshot)
    for sample, original in zip(batch, snapshot):
        assert len(sample) == len(original)
        for a, b in zip(sample, original):
            a, b = (a[1], b[1]) if isinstance(a, tuple) else (a, b)
            assert torch.equal(a, b) and a.shape == b.shape


def test_channel_first_latents_equal_channel_last():
    torch.manual_seed(1)
    last = tiny_model()
    torch.manual_seed(1)
    first = tiny_model(channel_first_latent = True)
    image = torch.randn(2, 3, DIM_LATENTS[1])
    batch_last = [[torch.tensor([1]), (1, image)]]
    batch_first = [[torch.tensor([1]), (1, image.permute(2, 0, 1))]]
    times = torch.tensor([[0.3]])
    torch.manual_seed(2)
    a = last(batch_last, times = times)
    torch.manual_seed(2)
    b = first(batch_first, times = times)
    torch.testing.assert_close(a, b)


def test_encoder_runs_without_gradient_before_noising():
    encoder = nn.Conv2d(3, DIM_LATENTS[1], 3, padding = 1)
    model = tiny_model(channel_first_latent = (False, True), modality_encoder = (None, encoder))
    batch = [[torch.tensor([1, 2]), (1, torch.randn(3, 4, 5))]]
    packed = model.pack(batch)
    assert packed.latents[1].shape == (20, DIM_LATENTS[1])
    with torch.no_grad():
        expected = encoder(batch[0][1][1][None])[0].permute(1, 2, 0).reshape(20, -1)
    torch.testing.assert_close(packed.latents[1], expected)
    model(batch).backward()
    assert encoder.weight.grad is None


def test_zero_dim_modalities():
    model = tiny_model(modality_default_shape = ((), (2, 2)))
    batch = [[torch.tensor([1]), (0, torch.randn(DIM_LATENTS[0])), (0, torch.randn(DIM_LATENTS[0]))]]
    packed = model.pack(batch)
    assert packed.span_length.tolist() == [1, 1]
    assert packed.tokens.tolist()[2:4] == [model.vocab.meta, model.vocab.bom(0)]   # the empty shape writes no digits
    loss = model(batch)
    loss.backward()
    assert torch.isfinite(loss)


def test_overfits_a_tiny_fixed_mixed_batch():
    # uniform times: with min_time_before_text, the modalities of this batch that text follows are
    # drawn from [0.5, 1], where the velocity target (x1 - noise) recovers the fresh noise from x_t
    # only through a factor 1 / (1 - t), slower to fit than 300 steps allow
    torch.manual_seed(0)
    first, last = overfit(tiny_model(transformer = OVERFIT_TRANSFORMER, min_time_before_text = 0.))
    assert last < first / 10, (first, last)


def test_text_logits_match_the_loss_and_a_causal_prefix(one_thread):
    """`model(text, return_loss = False)`: (b, n, vocab) logits whose cross-entropy against the
    next tokens is the training loss, a prefix's logits equal the full rows' (causal), and a
    non-contiguous slice of a batch gives the rows' own logits."""
    model = tiny_model().eval()
    text = torch.randint(0, NUM_TEXT_TOKENS, (3, 10))

    logits = model(text, return_loss = False)
    assert logits.shape == (3, 10, model.vocab.size)

    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), text[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, model(text), rtol = 1e-5, atol = 1e-6)

    torch.testing.assert_close(model(text[:, :4], return_loss = False), logits[:, :4], rtol = 1e-5, atol = 1e-5)
    strided = text[::2, :]                                  # rows 0 and 2: a non-contiguous slice
    assert not strided.is_contiguous()
    torch.testing.assert_close(model(strided, return_loss = False), logits[::2], rtol = 1e-5, atol = 1e-5)
    assert model(text[:, :1], return_loss = False).shape == (3, 1, model.vocab.size)

    with pytest.raises(ValueError, match = 'return_loss = False takes Int'):
        model(torch.randn(2, 4, DIM_LATENTS[0]), return_loss = False)


def test_latents_of_any_dtype_are_float32_per_sample():
    """A float64 sample next to a float16 one: each is packed in float32 (the model's rule), so
    neither is rounded to the other's dtype and each loss is the one it has alone."""
    model = tiny_model().eval()
    x64 = torch.randn(3, DIM_LATENTS[0], dtype = torch.float64) * (1 + 1e-4)      # values float16 cannot hold
    x16 = torch.randn(2, DIM_LATENTS[0]).half()
    samples = [[torch.tensor([1, 2]), (0, x64)], [torch.tensor([3]), (0, x16)]]

    for batch in (samples, samples[::-1]):
        packed = model.pack(batch)
        assert packed.latents[0].dtype == torch.float32
        rows = dict(zip((id(sample) for sample in batch), packed.latents[0].split([s[1][1].shape[0] for s in batch])))
        assert torch.equal(rows[id(samples[0])], x64.float()) and torch.equal(rows[id(samples[1])], x16.float())

        noise = [per_sample_noise(sample) for sample in batch]
        together = model.compute_loss(*fixed_noise_and_times(model, batch, noise, [[0.4]] * 2))
        for doc, sample in enumerate(batch):
            alone = model.compute_loss(*fixed_noise_and_times(model, [sample], [noise[doc]], [[0.4]]))
            assert torch.equal(together.per_sample_flow[doc], alone.per_sample_flow[0])

    # a float64 model keeps float64 (gradcheck runs through it)
    assert model.double().pack(samples).latents[0].dtype == torch.float64


@pytest.mark.parametrize('transformer', [dict(), dict(num_residual_streams = 2, num_residual_fracs = 2, use_value_residual = True)])
def test_a_model_built_on_the_meta_device_and_loaded_is_the_same_model(transformer):
    """`with torch.device('meta')`, `to_empty`, `load_state_dict`: the way FSDP and large
    checkpoints build models. Nothing may be left uninitialised (rotary frequencies included)."""
    options = dict(transformer = dict(dim = 32, depth = 2, dim_head = 8, heads = 2, **transformer))
    reference = tiny_model(**options).eval()
    with torch.device('meta'):
        model = tiny_model(**options)
    model.to_empty(device = 'cpu')
    model.load_state_dict(reference.state_dict())
    model.eval()

    batch = [[torch.tensor([1, 2, 3]), (0, torch.randn(3, DIM_LATENTS[0])), (1, torch.randn(2, 2, DIM_LATENTS[1])), torch.tensor([4, 5])]]
    noise = [per_sample_noise(sample) for sample in batch]
    expected = reference.compute_loss(*fixed_noise_and_times(reference, batch, noise, [[0.3, 0.7]]))
    got = model.compute_loss(*fixed_noise_and_times(model, batch, noise, [[0.3, 0.7]]))
    assert torch.equal(expected.total, got.total)
    assert not any(buffer.is_meta for buffer in model.buffers())
    text = torch.randint(0, NUM_TEXT_TOKENS, (1, 4))
    assert torch.equal(reference.generate_text_only(text, 8, seed = 0), model.generate_text_only(text, 8, seed = 0))


def batchnorm_encoder():
    """A raw (3, h, w) image -> (DIM_LATENTS[1], h, w) latents, with BatchNorm running statistics."""
    encoder = nn.Sequential(nn.Conv2d(3, DIM_LATENTS[1], 1), nn.BatchNorm2d(DIM_LATENTS[1]))
    with torch.no_grad():
        encoder[1].running_mean.uniform_(-1, 1)
        encoder[1].running_var.uniform_(0.5, 2)
    return encoder.eval().requires_grad_(False)


def test_encoders_stay_in_eval_mode_and_frozen_whatever_the_model_mode():
    encoder = batchnorm_encoder()
    before = copy.deepcopy(encoder.state_dict())
    model = tiny_model(channel_first_latent = (False, True), modality_encoder = (None, encoder))
    batch = [[torch.tensor([1, 2]), (1, torch.randn(3, 2, 2) * 5 + 3)]]

    for mode in (True, False, True):
        model.train(mode)
        assert model.training == mode and not encoder.training
        model(batch).backward()

    assert all(torch.equal(before[key], value) for key, value in encoder.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())


def test_a_modality_that_text_follows_is_noised_at_most_half_way(one_thread):
    """Transfusion's captioning rule: a modality followed by text (a caption after an image)
    draws its time from [min_time_before_text, 1], the others from [0, 1]; given times are
    used as they are. (Uniform times here; the rule maps any distribution the same way, see
    the test below.)"""
    model = tiny_model(time_distribution = 'uniform')
    text = lambda n: torch.randint(0, NUM_TEXT_TOKENS, (n,))
    image = lambda: (0, torch.randn(2, DIM_LATENTS[0]))
    batch = [
        [text(3), image()],                             # text -> image: not before text
        [image(), text(2)],                             # image -> caption
        [text(2), image(), text(2), image(), image(), text(1)],
        [image(), torch.zeros(0, dtype = torch.long)],  # an empty text run is no caption
    ]
    packed = model.pack(batch)
    assert packed.span_before_text.tolist() == [False, True, True, False, True, False]

    torch.manual_seed(0)
    draws = torch.stack([model.span_times(packed) for _ in range(2000)])                # (draws, S)
    before = packed.span_before_text
    assert draws[:, before].min() >= 0.5 and draws[:, before].max() <= 1.
    assert draws[:, ~before].min() < 0.05 and draws[:, before].min() < 0.55              # both ranges are covered
    assert abs(draws[:, before].mean().item() - 0.75) < 0.02 and abs(draws[:, ~before].mean().item() - 0.5) < 0.03

    uniform = tiny_model(min_time_before_text = 0., time_distribution = 'uniform')
    torch.manual_seed(1)
    limited = model.span_times(packed)
    torch.manual_seed(1)
    plain = uniform.span_times(packed)
    torch.testing.assert_close(limited, torch.where(before, 0.5 + 0.5 * plain, plain))  # the same draw, mapped

    times = torch.zeros(len(batch), 3)
    assert (model.span_times(packed, times = times) == 0).all()                        # given times are kept

    for bad in (1., -0.1, float('nan'), '0.5'):
        with pytest.raises(ValueError, match = r'min_time_before_text must lie in \[0, 1\)'):
            tiny_model(min_time_before_text = bad)


def test_training_times_follow_the_time_distribution(one_thread, tmp_path):
    """Times drawn when none are given: logit-normal by default, t = sigmoid(mean + std * n)
    (Esser et al., 2024), or uniform; the captioning rule maps either onto
    [min_time_before_text, 1]; the choice is checked, saved and loaded."""
    text = lambda n: torch.randint(0, NUM_TEXT_TOKENS, (n,))
    image = lambda: (0, torch.randn(2, DIM_LATENTS[0]))
    batch = [[text(3), image()], [text(2), image(), image()], [image(), text(2)]]

    def draws(model, n = 4000):
        packed = model.pack(batch)
        torch.manual_seed(0)
        return torch.stack([model.span_times(packed) for _ in range(n)]), packed.span_before_text

    assert tiny_model().config.time_distribution == 'logit_normal'
    times, before = draws(tiny_model(time_logit_mean = 0.5, time_logit_std = 0.8))
    logits = torch.logit(times[:, ~before].flatten().double())
    assert abs(logits.mean().item() - 0.5) < 0.03 and abs(logits.std().item() - 0.8) < 0.03
    mapped = times[:, before].flatten().double()                # (t - 0.5) / 0.5 is the logit-normal draw
    assert mapped.min() >= 0.5 and abs(torch.logit((mapped - 0.5) / 0.5).mean().item() - 0.5) < 0.05

    uniform, before = draws(tiny_model(time_distribution = 'uniform'))
    flat = uniform[:, ~before].flatten()
    for q in (0.1, 0.5, 0.9):                                   # the uniform CDF, where logit-normal(0, 1) is far off
        assert abs((flat < q).double().mean().item() - q) < 0.02
    default, _ = draws(tiny_model())
    assert (default[:, ~before].flatten() < 0.1).double().mean().item() < 0.03     # logit-normal(0, 1): P(t < 0.1) = 0.014

    model = tiny_model(time_distribution = 'uniform', time_logit_std = 2.)
    model.save_pretrained(tmp_path / 'saved')
    loaded = type(model).from_pretrained(tmp_path / 'saved')
    assert (loaded.config.time_distribution, loaded.config.time_logit_std) == ('uniform', 2.)

    for kwargs, message in [
        (dict(time_distribution = 'cosine'), r"time_distribution must be one of \('logit_normal', 'uniform'\), got 'cosine'"),
        (dict(time_logit_std = 0.), 'time_logit_std must be a finite number > 0, got 0.0'),
        (dict(time_logit_mean = float('nan')), 'time_logit_mean must be a finite number, got nan'),
        (dict(time_logit_mean = '1'), "time_logit_mean must be a finite number, got '1'"),
    ]:
        with pytest.raises(ValueError, match = message):
            tiny_model(**kwargs)
