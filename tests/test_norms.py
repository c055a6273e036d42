import pytest
import torch
import torch.nn.functional as F

from transfusion_pytorch.norms import RMSNorm, RMSNormFunction

from transformer_helpers import saved_storage_bytes as saved_bytes


@pytest.mark.parametrize('dtype, atol', [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize('unit_offset', [True, False])
def test_rmsnorm_matches_f_rms_norm_with_less_saved(dtype, atol, unit_offset):
    torch.manual_seed(0)
    norm = RMSNorm(64, unit_offset = unit_offset).to(dtype)
    with torch.no_grad():
        norm.weight.add_(torch.randn(64, dtype = dtype) * 0.1)
    x = torch.randn(50, 4, 64, dtype = dtype, requires_grad = True)
    grad = torch.randn(50, 4, 64, dtype = dtype)

    gain = lambda: norm.weight + 1. if unit_offset else norm.weight
    ours = norm(x)
    reference = F.rms_norm(x, (64,), gain(), None)
    assert torch.allclose(ours, reference, atol = atol)
    for a, b in zip(torch.autograd.grad(ours, (x, norm.weight), grad), torch.autograd.grad(reference, (x, norm.weight), grad)):
        assert torch.allclose(a, b, atol = atol * 10)

    # the input and one value per row, not the normalised input besides
    assert saved_bytes(lambda: norm(x)) < saved_bytes(lambda: F.rms_norm(x, (64,), gain(), None))
    assert saved_bytes(lambda: norm(x)) <= x.numel() * x.element_size() + 64 * x.element_size() + 50 * 4 * x.element_size()


def test_rmsnorm_function_gradcheck():
    x = torch.randn(3, 5, 16, dtype = torch.float64, requires_grad = True)
    gain = torch.randn(16, dtype = torch.float64, requires_grad = True)
    assert torch.autograd.gradcheck(lambda x, g: RMSNormFunction.apply(x, g, 1e-6), (x, gain))


def test_rmsnorm_half_precision_input_computes_in_float32():
    norm = RMSNorm(64)
    x = (torch.randn(8, 64) * 0.01).bfloat16().requires_grad_()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    # the eps of float32 (as F.rms_norm uses for bf16 inputs), not bf16's 0.0078, which would
    # shrink these small rows
    expected = x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim = True) + torch.finfo(torch.float32).eps)
    assert torch.allclose(out.float(), expected, atol = 2e-2)


FUSED_WARNING = 'Cannot dispatch to fused implementation'


def fused_fallback_warnings(fn) -> list[str]:
    """The warnings of `torch.rms_norm` falling back from its fused kernel while `fn` runs. The
    warning is a C++ warn-once: `set_warn_always` repeats it in every test, whatever ran before."""
    import warnings
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings(record = True) as caught:
            warnings.simplefilter('always')
            fn()
    finally:
        torch.set_warn_always(warn_always)
    return [str(w.message) for w in caught if FUSED_WARNING in str(w.message)]


@pytest.mark.parametrize('unit_offset', [True, False])
def test_rmsnorm_under_bf16_autocast_takes_the_fused_kernel(unit_offset):
    """No dtype-mismatch fallback (issue 21 item 3) for a bf16 input and a float32 gain, with and
    without gradients, and the output within bf16's rounding of the float32 reference."""
    torch.manual_seed(0)
    norm = RMSNorm(64, unit_offset = unit_offset)
    with torch.no_grad():
        norm.weight.add_(torch.randn(64) * 0.1)
    x = torch.randn(50, 64)
    gain = norm.weight.detach() + 1. if unit_offset else norm.weight.detach()
    reference = F.rms_norm(x, (64,), gain)

    def run(grad: bool):
        with torch.autocast('cpu', dtype = torch.bfloat16), torch.set_grad_enabled(grad):
            out = norm(x.bfloat16().requires_grad_(grad))
            if grad:
                out.float().square().sum().backward()
        outs.append(out)

    for grad in (False, True):
        outs = []
        assert fused_fallback_warnings(lambda: run(grad)) == []
        assert outs[0].dtype == torch.bfloat16
        # bf16 keeps 8 bits: the input, the gain and the output are each rounded once
        torch.testing.assert_close(outs[0].float(), reference, atol = 0.05, rtol = 0.02)
    assert norm.weight.grad is not None and norm.weight.grad.dtype == torch.float32


def test_model_forward_backward_under_bf16_autocast_emits_no_fallback_warning():
    """The user's report: every eager step under autocast warned from `torch.rms_norm`."""
    from conftest import overfit_batch, tiny_model
    model = tiny_model()

    def step():
        with torch.autocast('cpu', dtype = torch.bfloat16):
            loss = model(overfit_batch())
        loss.backward()
        with torch.no_grad(), torch.autocast('cpu', dtype = torch.bfloat16):
            model(overfit_batch())         # evaluation: the plain F.rms_norm path

    assert fused_fallback_warnings(step) == []
    assert all(p.grad is not None for p in model.transformer.final_norm.parameters())
