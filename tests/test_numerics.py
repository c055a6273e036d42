"""Numerics: gradients of the flow and text losses through the packed path agree with finite
differences in float64 (gradcheck), and LASER and logit softcapping stay finite, gradients
included, at 1e4-scale inputs."""

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from transfusion_pytorch import Transfusion
from transfusion_pytorch.attention import attend_cached, scaled_dot_product
from transfusion_pytorch.transformer import time_features

NUM_TEXT = 12
DIM_LATENTS = (3, 2)


pytestmark = pytest.mark.usefixtures('one_thread')     # tiny models: one thread is fastest (conftest)


def float64_model(**transformer) -> Transfusion:
    torch.manual_seed(0)
    model = Transfusion(
        num_text_tokens = NUM_TEXT, dim_latent = DIM_LATENTS, modality_default_shape = ((2,), (1, 2)),
        transformer = dict(dim = 16, depth = 2, dim_head = 8, heads = 2, dim_time = 16, **transformer),
    )
    with torch.no_grad():       # open the zero-initialised gates, so every path carries gradient
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.double().eval()


def float64_batch():
    generator = torch.Generator().manual_seed(1)
    latent = lambda *shape: torch.randn(*shape, generator = generator, dtype = torch.float64)
    return [
        [torch.tensor([1, 2]), (0, latent(2, DIM_LATENTS[0])), torch.tensor([3]), (1, latent(1, 2, DIM_LATENTS[1])), torch.tensor([4, 5])],
        [(0, latent(1, DIM_LATENTS[0])), torch.tensor([6])],
    ]


def loss_of_noise(model, which: str):
    """The text or flow loss as a function of the noise of each modality type, packed path throughout."""
    packed = model.pack(float64_batch())
    span_times = torch.tensor([0.3, 0.6, 0.8], dtype = torch.float64)

    def fn(*noise):
        breakdown = model.compute_loss(packed, span_times, noise)
        return breakdown.text if which == 'text' else breakdown.flow[0] + breakdown.flow[1]

    noise = tuple(torch.randn(latents.shape, dtype = torch.float64, requires_grad = True) for latents in packed.latents)
    return fn, noise


@pytest.mark.parametrize('which', ['flow', 'text'])
def test_gradcheck_through_the_packed_path_wrt_noise(which):
    """The text loss depends on the noise through attention (text after a modality sees its noised tokens)."""
    model = float64_model()
    fn, noise = loss_of_noise(model, which)
    assert fn(*noise).dtype == torch.float64
    assert gradcheck(fn, noise, eps = 1e-6, atol = 1e-5, rtol = 1e-4)


@pytest.mark.parametrize('which', ['flow', 'text'])
def test_gradcheck_of_the_public_forward_wrt_weights(which):
    """`model(batch)` itself, as a function of the latent projection and an attention weight."""
    model = float64_model(attn_softcap = 5.)
    batch = float64_batch()
    names = ['latent_to_model.0.weight', 'transformer.blocks.1.attn.to_out.weight']
    weights = tuple(dict(model.named_parameters())[name].detach().clone().requires_grad_() for name in names)
    times = torch.tensor([[0.3, 0.6], [0.8, 0.]])

    def fn(*values):
        torch.manual_seed(0)        # the same noise on every call
        _, breakdown = functional_call(model, dict(zip(names, values)), (batch,), dict(times = times, return_breakdown = True))
        return breakdown.text if which == 'text' else breakdown.flow[0] + breakdown.flow[1]

    assert gradcheck(fn, weights, eps = 1e-6, atol = 1e-5, rtol = 1e-4, fast_mode = True)


def test_time_features_follow_float64_and_keep_float32():
    times = torch.rand(5)
    features = time_features(times, 16)
    assert features.dtype == torch.float32
    features64 = time_features(times.double(), 16)
    assert features64.dtype == torch.float64
    torch.testing.assert_close(features64.float(), features, atol = 1e-4, rtol = 0)
    assert time_features(times.bfloat16(), 16).dtype == torch.float32


# stability at large logits

@pytest.mark.parametrize('scale', [1e2, 1e4])
def test_softcap_stays_finite_with_gradients(scale):
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    q = (q * scale).requires_grad_()
    k = (k * scale).requires_grad_()
    out = scaled_dot_product(q, k, v, is_causal = True, softcap = 5.)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()

    # the cached path (generation) uses the same formula
    mask = torch.ones(1, 1, 6, 6, dtype = torch.bool).tril()
    cached = attend_cached(q.detach(), k.detach(), v, mask, softcap = 5.)
    torch.testing.assert_close(cached, out.detach())


@pytest.mark.parametrize('options', [
    dict(attn_laser = True),
    dict(attn_softcap = 5.),
    dict(attn_laser = True, attn_softcap = 5.),
], ids = ['laser', 'softcap', 'both'])
def test_large_logits_and_values_stay_finite_in_the_model(options):
    """Without qk-norm, 1e4-scale inputs and weights give 1e4-scale (and larger) logits and values."""
    torch.manual_seed(0)
    model = Transfusion(
        num_text_tokens = NUM_TEXT, dim_latent = DIM_LATENTS, modality_default_shape = ((2,), (1, 2)),
        transformer = dict(dim = 16, depth = 2, dim_head = 8, heads = 2, dim_time = 16, qk_rmsnorm = False, **options),
    )
    with torch.no_grad():
        for block in model.transformer.blocks:
            block.attn.to_qkv.weight.mul_(1e2)
        model.latent_to_model[0].weight.mul_(1e2)
    batch = [[torch.tensor([1, 2]), (0, torch.randn(3, DIM_LATENTS[0]) * 1e4), torch.tensor([3])]]
    loss = model(batch, times = torch.tensor([[0.9]]))
    loss.backward()
    assert torch.isfinite(loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
