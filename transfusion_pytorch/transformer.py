"""The transformer: pre-norm blocks over a flat, packed token sequence.

Choices, with where they come from (each switch lives in `TransformerConfig`):

- RMSNorm with unit-offset gains (Rubin, 2024), SwiGLU feed-forward (Shazeer, 2020), no biases
  in the main projections;
- rotary positions (Su et al., 2021) from per-token position ids: every token of a modality
  span shares one position, as the tokens of a grid have no order among themselves;
- queries and keys RMS-normalised per head (Dehghani et al., 2023), an optional logit
  softcap (Gemma 2), a sigmoid gate per head on the attention output (Qiu et al., 2025),
  optional LASER attention (Duvvuri & Dhillon, 2024) and value residual learning (Zhou et
  al., 2024);
- time conditioning by adaptive norms with adaLN-zero gates (Peebles & Xie, "DiT", 2022):
  each modality span's time t is embedded once per span, turned into (scale, shift, gate)
  once per span and block, and looked up by every token of the span. Text tokens are not
  conditioned (scale 0, shift 0, gate 1);
- U-ViT long skips from the first half of the blocks to the second (Bao et al., 2022);
- optional hyper- and frac-connections for the residual stream (`residual.py`).

The transformer returns hidden states; it computes no loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attend
from .config import TransformerConfig
from .losses import at_least_float32
from .masks import AttentionLayout
from .norms import RMSNorm
from .residual import ResidualMix

LASER_BOUND = 15.   # values are softclamped to (-15, 15) before exp, so exp never overflows


class Rotary(nn.Module):
    """The frequencies are computed where they are used, from the config, and not kept in a
    buffer: a non-persistent buffer is neither saved nor restored, so a model built on the meta
    device (`to_empty`, then `load_state_dict`, as for FSDP and large checkpoints) would hold
    uninitialised memory there. Three small operations per forward pass, once for all layers."""

    def __init__(self, dim_head: int, theta: float):
        super().__init__()
        self.dim_head, self.theta = dim_head, theta

    def inv_freq(self, device: torch.device) -> Tensor:
        """(dim_head / 2,) float32"""
        return self.theta ** -(torch.arange(0, self.dim_head, 2, dtype = torch.float32, device = device) / self.dim_head)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """(N,) positions -> cos and signed sin over the whole head, each (N, 1, dim_head):
        (cos, cos) and (-sin, sin), so that `apply_rotary` is two fused elementwise passes.
        Computed once per forward pass and shared by every layer."""
        angles = positions.float()[:, None] * self.inv_freq(positions.device)[None, :]
        cos, sin = angles.cos(), angles.sin()
        return torch.cat((cos, cos), dim = -1)[:, None], torch.cat((-sin, sin), dim = -1)[:, None]


def apply_rotary(t: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """(N, heads, dim_head): rotates the pairs (first half, second half) of each head,

        (first, second) -> (first cos - second sin, second cos + first sin)
                         = t * (cos, cos) + (second, first) * (-sin, sin)

    written as one multiply and one fused multiply-add (`roll` by half a head swaps the halves).
    Nothing of the size of t is saved for the backward pass (cos and sin are constants)."""
    t32 = at_least_float32(t)
    rotated = torch.addcmul(t32 * cos, t32.roll(t.shape[-1] // 2, dims = -1), signed_sin)
    return rotated if rotated.dtype == t.dtype else rotated.to(t.dtype)


def softclamp(t: Tensor, bound: float) -> Tensor:
    return bound * torch.tanh(t / bound)


def time_features(times: Tensor, dim: int) -> Tensor:
    """(S,) times in [0, 1] -> (S, dim) sinusoidal features, in float32 (float64 for float64 times)."""
    half = dim // 2
    times = at_least_float32(times)
    freqs = torch.exp(-math.log(10000.) * torch.arange(half, device = times.device, dtype = times.dtype) / half)
    angles = times[:, None] * 1000. * freqs[None, :]
    return torch.cat((angles.sin(), angles.cos()), dim = -1)


class Conditioning:
    """Per-span time embeddings and, for every token, the row of its span (S for text tokens)."""

    def __init__(self, span_embed: Tensor, token_span: Tensor):
        self.span_embed = span_embed        # (S, dim)
        self.token_row = torch.where(token_span >= 0, token_span, span_embed.shape[0])  # (N,)

    def table(self, per_span: Tensor, text_value: float) -> Tensor:
        """(S, k) values per span -> (S + 1, k), the last row the value of text tokens."""
        return torch.cat((per_span, per_span.new_full((1, per_span.shape[-1]), text_value)), dim = 0)


class Modulate(torch.autograd.Function):
    """x * scale[rows] (+ shift[rows]) for per-span tables (S + 1, dim), looked up by each token's
    row. Autograd would keep the (N, dim) per-token copy of scale; this keeps x and the small
    tables, and looks scale up again in the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor | None, rows: Tensor) -> Tensor:
        ctx.save_for_backward(x, scale, rows)
        ctx.has_shift = shift is not None
        if shift is None:
            return x * F.embedding(rows, scale)
        return torch.addcmul(F.embedding(rows, shift), x, F.embedding(rows, scale))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, scale, rows = ctx.saved_tensors
        grad_x = grad * F.embedding(rows, scale)
        wide = torch.promote_types(grad.dtype, x.dtype)
        grad_scale = scale.new_zeros(scale.shape, dtype = wide).index_add_(0, rows, (grad * x).to(wide))
        grad_shift = scale.new_zeros(scale.shape, dtype = wide).index_add_(0, rows, grad.to(wide)) if ctx.has_shift else None
        return (grad_x.to(x.dtype), grad_scale.to(scale.dtype),
                None if grad_shift is None else grad_shift.to(scale.dtype), None)


def apply_gate(h: Tensor, gate: Tensor, cond: Conditioning) -> Tensor:
    """h * gate[row of each token], for the (S + 1, dim) gate table of `AdaptiveNorm`."""
    return Modulate.apply(h, gate, None, cond.token_row)


class AdaptiveNorm(nn.Module):
    """RMSNorm, then for conditioned tokens x * (1 + scale) + shift, and a gate for the branch output.

    The modulation is computed per span, `1 +` included, as (S + 1, dim) tables whose last row
    is that of text tokens (1 + scale = 1, shift = 0, gate = 1), and applied per token by
    `Modulate`: one fused multiply-add per token, and the backward pass keeps no per-token
    table at all."""

    def __init__(self, dim: int, unit_offset: bool):
        super().__init__()
        self.norm = RMSNorm(dim, unit_offset = unit_offset)
        self.to_modulation = nn.Linear(dim, dim * 3)
        nn.init.zeros_(self.to_modulation.weight)       # adaLN-zero: conditioned branches start closed
        nn.init.zeros_(self.to_modulation.bias)

    def forward(self, x: Tensor, cond: Conditioning | None) -> tuple[Tensor, Tensor | None]:
        """The normalised, modulated x, and the gate table for the branch output (None: no gate)."""
        x = self.norm(x)
        if cond is None:
            return x, None
        scale, shift, gate = self.to_modulation(F.silu(cond.span_embed)).chunk(3, dim = -1)   # (S, dim) each
        x = Modulate.apply(x, cond.table(1. + scale, 1.), cond.table(shift, 0.), cond.token_row)
        return x, cond.table(gate, 1.)


@dataclass
class Context:
    """What every block of one forward pass shares."""
    layout: AttentionLayout | None
    rotary: tuple[Tensor, Tensor]
    cond: Conditioning | None
    first_values: Tensor | None = None      # (N, heads, dim_head) values of the first layer, for value residuals


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig, is_first: bool):
        super().__init__()
        self.config = config
        self.heads, self.dim_head = config.heads, config.dim_head
        dim_inner = config.heads * config.dim_head
        self.to_qkv = nn.Linear(config.dim, dim_inner * 3, bias = False)
        self.to_out = nn.Linear(dim_inner, config.dim, bias = False)

        self.q_norm = RMSNorm(config.dim_head, config.unit_offset_norms) if config.qk_rmsnorm else None
        self.k_norm = RMSNorm(config.dim_head, config.unit_offset_norms) if config.qk_rmsnorm else None
        self.to_gates = nn.Linear(config.dim, config.heads) if config.attn_gate_values else None
        self.to_value_mix = nn.Linear(config.dim, config.heads) if config.use_value_residual and not is_first else None

    def forward(self, x: Tensor, ctx: Context, cache = None) -> Tensor:
        config = self.config
        q, k, v = self.to_qkv(x).view(x.shape[0], 3, self.heads, self.dim_head).unbind(dim = 1)  # (N, heads, dim_head)

        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, *ctx.rotary), apply_rotary(k, *ctx.rotary)

        if config.use_value_residual:
            if ctx.first_values is None:
                ctx.first_values = v
            else:
                mix = self.to_value_mix(x).sigmoid()[..., None]                              # (N, heads, 1)
                v = v * mix + ctx.first_values * (1. - mix)

        if config.attn_laser:
            # log(softmax(qk) @ exp(v)), with exp(v - bound) in (0, 1]: no overflow, and the
            # result at least exp(-2 bound) > 0, so the log is finite
            v = (softclamp(v, LASER_BOUND) - LASER_BOUND).exp()

        if cache is not None:
            # generation: keys are stored after rotary, and the queries attend to the cached prefix
            out = cache.attend(q, k, v, softcap = config.attn_softcap)
        else:
            dropout = config.attn_dropout if self.training else 0.
            out = attend(q, k, v, ctx.layout, dropout_p = dropout, softcap = config.attn_softcap)

        if config.attn_laser:
            out = out.clamp(min = torch.finfo(out.dtype).tiny).log() + LASER_BOUND

        if self.to_gates is not None:
            out = out * self.to_gates(x).sigmoid()[..., None]

        return self.to_out(out.reshape(x.shape[0], -1))


class FeedForward(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        dim_hidden = int(config.dim * config.ff_expansion_factor * 2 / 3)
        self.proj_in = nn.Linear(config.dim, dim_hidden * 2, bias = False)
        self.proj_out = nn.Linear(dim_hidden, config.dim, bias = False)

    def forward(self, x: Tensor, ctx: Context, cache = None) -> Tensor:
        return self.proj_out(swiglu(self.proj_in(x)))


class SwiGLU(torch.autograd.Function):
    """(..., 2 h) -> (..., h): x * silu(gate) for (x, gate) the halves of the input.

    Autograd would keep the input, silu(gate) and the product; this keeps only the input and
    recomputes silu(gate) in the backward pass (one elementwise pass), so the feed-forward
    block holds one tensor of width 2 h instead of three of widths 2 h, h and h."""

    @staticmethod
    def forward(ctx, projected: Tensor) -> Tensor:
        ctx.save_for_backward(projected)
        return swiglu_values(projected)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, gate = ctx.saved_tensors[0].chunk(2, dim = -1)
        sigmoid = torch.sigmoid(gate)
        silu = gate * sigmoid
        # d silu(g) / dg = sigmoid(g) (1 + g (1 - sigmoid(g)))
        grad_gate = grad * x * sigmoid * (1. + gate * (1. - sigmoid))
        return torch.cat((grad * silu, grad_gate), dim = -1)


def swiglu_values(projected: Tensor) -> Tensor:
    x, gate = projected.chunk(2, dim = -1)
    return x * F.silu(gate)


def swiglu(projected: Tensor) -> Tensor:
    if not torch.is_grad_enabled():         # nothing to save: plain ops, without the autograd.Function's overhead
        return swiglu_values(projected)
    return SwiGLU.apply(projected)


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, index: int):
        super().__init__()
        unit_offset = config.unit_offset_norms
        self.attn_norm, self.attn = AdaptiveNorm(config.dim, unit_offset), Attention(config, is_first = index == 0)
        self.ff_norm, self.ff = AdaptiveNorm(config.dim, unit_offset), FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

        uses_streams = config.num_residual_streams > 1 or config.num_residual_fracs > 1
        self.mixes = nn.ModuleList([
            ResidualMix(config.dim, config.num_residual_streams, config.num_residual_fracs, 2 * index + branch, unit_offset)
            for branch in range(2)
        ]) if uses_streams else None

    def forward(self, x: Tensor, ctx: Context, cache = None) -> Tensor:
        """x: (N, dim), or (N, streams, dim) with hyper-connections."""
        for branch_index, (norm, branch) in enumerate(((self.attn_norm, self.attn), (self.ff_norm, self.ff))):
            if self.mixes is None:
                h = x
            else:
                h, saved = self.mixes[branch_index].read(x)

            h, gate = norm(h, ctx.cond)
            h = branch(h, ctx, cache)
            if self.training and self.dropout.p > 0:
                h = self.dropout(h)
            h = h if gate is None else apply_gate(h, gate, ctx.cond)

            x = x + h if self.mixes is None else self.mixes[branch_index].write(saved, h)
        return x


def skip_merge(proj: nn.Linear, x: Tensor, skip: Tensor) -> Tensor:
    """proj(cat(x, skip)), as two products on the halves of the weight: no concatenated copy."""
    dim = x.shape[-1]
    return F.linear(x, proj.weight[:, :dim]) + F.linear(skip, proj.weight[:, dim:])


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        dim = config.dim

        self.rotary = Rotary(config.dim_head, config.rotary_theta)
        self.to_time_embed = nn.Sequential(nn.Linear(config.dim_time, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([Block(config, index) for index in range(config.depth)])

        # U-ViT: block i of the second half also sees the output of its mirror in the first half
        num_skips = config.depth // 2 if config.unet_skips else 0
        self.skip_projs = nn.ModuleList([nn.Linear(dim * 2, dim, bias = False) for _ in range(num_skips)])
        for proj in self.skip_projs:
            nn.init.zeros_(proj.weight)
            proj.weight.data[:, :dim].copy_(torch.eye(dim))     # starts as the plain residual stream

        self.final_norm = RMSNorm(dim, config.unit_offset_norms)

    @property
    def dim(self) -> int:
        return self.config.dim

    def forward(
        self,
        x: Tensor,                          # (N, dim) embedded tokens
        layout: AttentionLayout | None,
        positions: Tensor,                  # (N,) rotary positions
        span_times: Tensor | None = None,   # (S,) time of each modality span
        token_span: Tensor | None = None,   # (N,) span of each token, -1 for text
        cache = None,                       # a `kv_cache.KVCache` prepared for this step, when generating
    ) -> Tensor:
        cond = None
        if span_times is not None and span_times.numel() > 0:
            features = time_features(span_times, self.config.dim_time)
            span_embed = self.to_time_embed(features.to(self.to_time_embed[0].weight.dtype))
            cond = Conditioning(span_embed, token_span)

        ctx = Context(layout, self.rotary(positions), cond)

        first_mix = self.blocks[0].mixes[0] if self.blocks[0].mixes is not None else None
        if first_mix is not None:
            x = first_mix.expand(x)                                     # (N, streams, dim)

        depth, num_skips = len(self.blocks), len(self.skip_projs)
        skips = []

        for index, block in enumerate(self.blocks):
            if index >= depth - num_skips:
                x = skip_merge(self.skip_projs[index - (depth - num_skips)], x, skips.pop())

            x = block(x, ctx, None if cache is None else cache.layer(index))

            if index < num_skips:
                skips.append(x)

        if first_mix is not None:
            x = first_mix.reduce(x)

        return self.final_norm(x)
