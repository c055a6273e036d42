"""The adaLN modulation (`transformer.Modulate`): its backward pass sums the tokens' gradients into
the per-span tables with a 0 / 1 matrix product (`row_sums`) rather than a colliding
`index_add_` (issue 21 item 1). Checked against autograd through the plain gather, in float64,
and in float32 and bf16 on a batch with text tokens (the table's last row) between the spans
and trailing padding tokens, as the packed and padded batches have them."""

import pytest
import torch

from transfusion_pytorch.transformer import Conditioning, Modulate, row_sums


def packed_rows() -> tuple[torch.Tensor, int]:
    """(N,) span of each token, -1 for text and padding: text, two spans, text, a span, text,
    then padding; and the number of spans."""
    parts = [(-1, 5), (0, 16), (1, 9), (-1, 3), (2, 24), (-1, 7), (-1, 8)]
    return torch.cat([torch.full((n,), span) for span, n in parts]), 3


def inputs(dtype, dim = 48, with_shift = True):
    torch.manual_seed(0)
    token_span, num_spans = packed_rows()
    cond = Conditioning(torch.zeros(num_spans, dim), token_span)
    x = torch.randn(token_span.shape[0], dim, dtype = dtype)
    scale = 1. + 0.1 * torch.randn(num_spans + 1, dim, dtype = dtype)
    shift = torch.randn(num_spans + 1, dim, dtype = dtype) if with_shift else None
    grad = torch.randn(token_span.shape[0], dim, dtype = dtype)
    return x, scale, shift, cond.token_row, grad


def reference(x, scale, shift, rows, grad):
    """Forward output and gradients of x * scale[rows] + shift[rows] by autograd, in float64."""
    x, scale = x.double().requires_grad_(), scale.double().requires_grad_()
    shift = None if shift is None else shift.double().requires_grad_()
    out = x * scale[rows] + (0. if shift is None else shift[rows])
    grads = torch.autograd.grad(out, [t for t in (x, scale, shift) if t is not None], grad.double())
    return out.detach(), grads


def ours(x, scale, shift, rows, grad):
    x, scale = x.clone().requires_grad_(), scale.clone().requires_grad_()
    shift = None if shift is None else shift.clone().requires_grad_()
    out = Modulate.apply(x, scale, shift, rows)
    grads = torch.autograd.grad(out, [t for t in (x, scale, shift) if t is not None], grad)
    return out.detach(), grads


def test_row_sums_is_index_add():
    torch.manual_seed(0)
    rows = torch.tensor([3, 0, 0, 1, 3, 3, 2, 0])
    values = torch.randn(8, 5, 2, dtype = torch.float64)
    expected = torch.zeros(4, 5, 2, dtype = torch.float64).index_add_(0, rows, values)
    assert torch.allclose(row_sums(values, rows, 4), expected, atol = 1e-12)
    # a row no token looks up (the padded span rows of compiled blocks) sums to zero
    assert torch.equal(row_sums(values, rows, 6)[4:], torch.zeros(2, 5, 2, dtype = torch.float64))


@pytest.mark.parametrize('with_shift', [True, False])
def test_modulate_gradcheck(with_shift):
    x, scale, shift, rows, _ = inputs(torch.float64, dim = 6, with_shift = with_shift)
    args = [x.requires_grad_(), scale.requires_grad_(), None if shift is None else shift.requires_grad_()]
    assert torch.autograd.gradcheck(lambda x, s, *h: Modulate.apply(x, s, h[0] if h else None, rows),
                                    tuple(a for a in args if a is not None))


@pytest.mark.parametrize('dtype, rtol, atol', [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 5e-2)])
@pytest.mark.parametrize('with_shift', [True, False])
def test_modulate_matches_the_gather_and_index_add_reference(dtype, rtol, atol, with_shift):
    args = inputs(dtype, with_shift = with_shift)
    expected_out, expected_grads = reference(*args)
    out, grads = ours(*args)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.double(), expected_out, rtol = rtol, atol = atol)
    for name, got, expected in zip(('x', 'scale', 'shift'), grads, expected_grads):
        # the table rows sum up to 24 tokens: the tolerance grows with the square root of that
        scaled_atol = atol if name == 'x' else atol * 24 ** 0.5
        torch.testing.assert_close(got.double(), expected, rtol = rtol, atol = scaled_atol, msg = lambda m: f'd{name}: {m}')


def test_bf16_table_gradients_no_less_exact_than_index_add():
    """The product accumulates in float32; `index_add_` on bf16 rounds after every token."""
    x, scale, shift, rows, grad = inputs(torch.bfloat16)
    _, (_, expected_scale, _) = reference(x, scale, shift, rows, grad)
    _, (_, got_scale, _) = ours(x, scale, shift, rows, grad)
    old = torch.zeros_like(scale).index_add_(0, rows, grad * x)
    assert (got_scale.double() - expected_scale).abs().max() <= (old.double() - expected_scale).abs().max()
