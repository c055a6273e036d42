"""RMSNorm with an optional unit offset: the stored gain g is used as (g + 1) and starts at 0,
so weight decay pulls a norm towards the identity rather than towards zero (Rubin, 2024,
"Exploring weight decay in layer normalization").

On CPU, `F.rms_norm` is a composite whose autograd keeps the normalised input besides the input
itself, one more activation of the full width per norm (about 190 MB of a 41M-parameter model's
1.7 GB of saved activations on the benchmark's multimodal batch). There, training goes through
`RMSNormFunction`, the same forward in float32 or wider, which keeps only the input and the
per-row inverse RMS and recomputes the rest in the backward pass. Elsewhere (CUDA's fused kernel
keeps no more than that) and without gradients, `F.rms_norm` runs as it is.

Under autocast the input arrives in bf16 while the gain is a float32 parameter. `torch.rms_norm`
takes its fused kernel only when the two dtypes agree, and otherwise warns and falls back to the
unfused composite, so the gain is cast to the input's dtype first, as autocast casts the weights
of a linear layer. The fused kernel still accumulates in float32. (Hugging Face's
`LlamaRMSNorm` normalises in float32 and multiplies by the gain after casting back; in a float32
model, where `from_language_model` must match its logits, nothing is cast.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import at_least_float32


class RMSNormFunction(torch.autograd.Function):
    """x / rms(x) * gain over the last axis; computed in float32 (or float64), returned in x's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, gain: Tensor, eps: float) -> Tensor:
        x32 = at_least_float32(x)
        rstd = torch.rsqrt(x32.square().mean(dim = -1, keepdim = True) + eps)
        ctx.save_for_backward(x, gain, rstd)
        return (x32 * rstd * gain).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, gain, rstd = ctx.saved_tensors
        normed = at_least_float32(x) * rstd
        grad = at_least_float32(grad)
        grad_gain = (grad * normed).reshape(-1, normed.shape[-1]).sum(dim = 0)
        scaled = grad * gain
        # d/dx of x * rstd(x): rstd (g - normed mean(g normed)), for g the gradient at normed
        grad_x = rstd * (scaled - normed * (scaled * normed).mean(dim = -1, keepdim = True))
        return grad_x.to(x.dtype), grad_gain.to(gain.dtype), None


class RMSNorm(nn.RMSNorm):
    def __init__(self, dim: int, unit_offset: bool = True, eps: float | None = None):
        super().__init__(dim, eps = eps)
        self.unit_offset = unit_offset
        if unit_offset:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        gain = self.weight + 1. if self.unit_offset else self.weight
        if x.device.type == 'cpu' and torch.is_grad_enabled() and (x.requires_grad or gain.requires_grad):
            # F.rms_norm's default eps: that of float32 for half precision inputs
            eps = self.eps if self.eps is not None else torch.finfo(at_least_float32(x).dtype).eps
            return RMSNormFunction.apply(x, gain, eps)
        # the fused kernel needs the gain in the input's dtype (bf16 under autocast); see the module docstring
        return F.rms_norm(x, self.normalized_shape, gain.to(x.dtype), self.eps)
