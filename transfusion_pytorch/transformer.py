"""The transformer: pre-norm blocks over a flat, packed token sequence.

Choices, with where they come from (each switch lives in `TransformerConfig`):

- RMSNorm with unit-offset gains (Rubin, 2024), SwiGLU feed-forward (Shazeer, 2020), no biases
  in the main projections by default;
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
- optional hyper- and frac-connections for the residual stream (`residual.py`);
- what pretrained language models need (`language_models.py`), each a generic option:
  grouped-query attention, q / k / v and output biases, plain norms with a given epsilon,
  rotary scaling (`rotary.py`), an explicit SwiGLU width;
- optional separate modality weights (Mixture-of-Transformers, Liang et al., 2024): latent
  rows on their own copies of every block's weights, text rows on the originals, one joint
  attention (`routing.py`); adaLN then conditions the modality path only. The text path can
  be frozen (`freeze_text_weights`, LMFusion).

The transformer returns hidden states; it computes no loss.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
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
from .rotary import Rotary, apply_rotary
from .routing import Routing, route

LASER_BOUND = 15.   # values are softclamped to (-15, 15) before exp, so exp never overflows


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

    def rows(self, start: int) -> Conditioning:
        """The conditioning of the rows from `start` on (the modality rows, in routed order)."""
        part = Conditioning.__new__(Conditioning)
        part.span_embed, part.token_row = self.span_embed, self.token_row[start:]
        return part

    def table(self, per_span: Tensor, text_value: float) -> Tensor:
        """(S, k) values per span -> (S + 1, k), the last row the value of text tokens."""
        return torch.cat((per_span, per_span.new_full((1, per_span.shape[-1]), text_value)), dim = 0)


def row_sums(values: Tensor, rows: Tensor, num_rows: int) -> Tensor:
    """(N, ...) values, (N,) row of each -> (num_rows, ...) the sum of each row's values: what
    `zeros(num_rows, ...).index_add_(0, rows, values)` gives, as one product of a (num_rows, N)
    0 / 1 matrix with the (N, ...) values.

    The tables have S + 1 rows (one per span, one for text) against N tokens, so an `index_add_`
    makes thousands of atomic adds collide on each row (on CUDA its `indexFuncLargeIndex` kernel
    took 10% of the image-text step, issue 21). The product is a reduction the matmul kernels do
    without atomics: 2 (S + 1) N dim FLOPs, under a GFLOP for 20 spans in a 16k-token batch, with
    float32 accumulation for bf16 values and a fixed summation order (deterministic). No shape
    depends on the data, so it compiles and does not wait on the host."""
    one_hot = (torch.arange(num_rows, device = rows.device)[:, None] == rows[None, :]).to(values.dtype)     # (num_rows, N)
    return (one_hot @ values.reshape(values.shape[0], -1)).view(num_rows, *values.shape[1:])


class Modulate(torch.autograd.Function):
    """x * scale[rows] (+ shift[rows]) for per-span tables (S + 1, dim), looked up by each token's
    row. Autograd would keep the (N, dim) per-token copy of scale; this keeps x and the small
    tables, and looks scale up again in the backward pass, where the tables' gradients are sums
    over each row's tokens (`row_sums`)."""

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
        grad_scale = row_sums((grad * x).to(wide), rows, scale.shape[0])
        grad_shift = row_sums(grad.to(wide), rows, scale.shape[0]) if ctx.has_shift else None
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
    table at all. With `conditioned = False` (the text path of separate modality weights) it
    is the plain norm."""

    def __init__(self, dim: int, unit_offset: bool, eps: float | None = None, conditioned: bool = True):
        super().__init__()
        self.norm = RMSNorm(dim, unit_offset = unit_offset, eps = eps)
        self.to_modulation = nn.Linear(dim, dim * 3) if conditioned else None
        if conditioned:
            nn.init.zeros_(self.to_modulation.weight)       # adaLN-zero: conditioned branches start closed
            nn.init.zeros_(self.to_modulation.bias)

    def forward(self, x: Tensor, cond: Conditioning | None) -> tuple[Tensor, Tensor | None]:
        """The normalised, modulated x, and the gate table for the branch output (None: no gate)."""
        x = self.norm(x)
        if cond is None or self.to_modulation is None:
            return x, None
        scale, shift, gate = self.to_modulation(F.silu(cond.span_embed)).chunk(3, dim = -1)   # (S, dim) each
        x = Modulate.apply(x, cond.table(1. + scale, 1.), cond.table(shift, 0.), cond.token_row)
        return x, cond.table(gate, 1.)


@dataclass
class Context:
    """What every block of one forward pass shares."""
    layout: AttentionLayout | None
    rotary: tuple[Tensor, Tensor]
    cond: Conditioning | None               # over the rows in routed order
    first_values: Tensor | None = None      # (N, heads, dim_head) values of the first layer, for value residuals
    routing: Routing | None = None          # text and modality rows on their own weights; None: shared weights


def attention_weights(config: TransformerConfig) -> tuple[nn.Module, nn.Module | None, nn.Module | None, nn.Module]:
    """The query / key / value projection, the per-head query and key norms and the output projection."""
    dim_inner = config.heads * config.dim_head
    to_qkv = nn.Linear(config.dim, (config.heads + 2 * config.num_kv_heads) * config.dim_head, bias = config.attn_qkv_bias)
    to_out = nn.Linear(dim_inner, config.dim, bias = config.attn_out_bias)
    norms = [RMSNorm(config.dim_head, config.unit_offset_norms, config.norm_eps) if config.qk_rmsnorm else None for _ in range(2)]
    return to_qkv, *norms, to_out


class Attention(nn.Module):
    """Multi-head attention with `kv_heads` key / value heads shared by groups of query heads
    (grouped-query attention, Ainslie et al., 2023, https://arxiv.org/abs/2305.13245): query
    head i reads key / value head i // (heads / kv_heads), as in the Llama and Qwen checkpoints."""

    def __init__(self, config: TransformerConfig, is_first: bool):
        super().__init__()
        self.config = config
        self.heads, self.kv_heads, self.dim_head = config.heads, config.num_kv_heads, config.dim_head
        self.to_qkv, self.q_norm, self.k_norm, self.to_out = attention_weights(config)
        if config.separate_modality_weights:
            self.modality_to_qkv, self.modality_q_norm, self.modality_k_norm, self.modality_to_out = attention_weights(config)

        self.to_gates = nn.Linear(config.dim, config.heads) if config.attn_gate_values else None
        self.to_value_mix = nn.Linear(config.dim, config.heads) if config.use_value_residual and not is_first else None

    def project(self, x: Tensor, to_qkv: nn.Linear, q_norm: nn.Module | None, k_norm: nn.Module | None) -> tuple[Tensor, Tensor, Tensor]:
        """(n, dim) -> q (n, heads, dim_head), k and v (n, kv_heads, dim_head)."""
        q, k, v = to_qkv(x).view(x.shape[0], -1, self.dim_head).split((self.heads, self.kv_heads, self.kv_heads), dim = 1)
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return q, k, v

    def text_projection(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.project(x, self.to_qkv, self.q_norm, self.k_norm)

    def modality_projection(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.project(x, self.modality_to_qkv, self.modality_q_norm, self.modality_k_norm)

    def forward(self, x: Tensor, ctx: Context, cache = None) -> Tensor:
        config, routing = self.config, ctx.routing
        q, k, v = route(routing, x, self.text_projection, self.modality_projection)
        if routing is not None:
            q, k, v = (routing.to_sequence(t) for t in (q, k, v))           # attention sees the sequence's order
        q, k = apply_rotary(q, *ctx.rotary), apply_rotary(k, *ctx.rotary)

        if config.use_value_residual:
            # by the block, not by whether first_values is set: activation checkpointing runs
            # the first block again in the backward pass, after the others have read them
            if self.to_value_mix is None:
                ctx.first_values = v
            else:
                mix = self.to_value_mix(x).sigmoid()[..., None]                              # (N, heads, 1)
                mix = mix if routing is None else routing.to_sequence(mix)
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

        if routing is not None:
            out = routing.to_routed(out)
        if self.to_gates is not None:
            out = out * self.to_gates(x).sigmoid()[..., None]

        return route(routing, out.reshape(x.shape[0], -1), self.to_out, getattr(self, 'modality_to_out', None))


class FeedForward(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        # proj_in's output is (value, gate): x * silu(gate), HF's up_proj(x) * silu(gate_proj(x))
        self.proj_in = nn.Linear(config.dim, config.dim_hidden * 2, bias = False)
        self.proj_out = nn.Linear(config.dim_hidden, config.dim, bias = False)

    def forward(self, x: Tensor) -> Tensor:
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


# each weighted module of the text (or shared) path -> its copy on the modality path, by name
MODALITY_COPIES = {
    'attn_norm.norm': 'modality_attn_norm.norm', 'attn.to_qkv': 'attn.modality_to_qkv', 'attn.q_norm': 'attn.modality_q_norm',
    'attn.k_norm': 'attn.modality_k_norm', 'attn.to_out': 'attn.modality_to_out', 'ff_norm.norm': 'modality_ff_norm.norm',
    'ff': 'modality_ff',
}


def submodule(module: nn.Module, name: str) -> nn.Module | None:
    """The submodule at a dotted name; None where the path ends in a module that is off."""
    for part in name.split('.'):
        module = getattr(module, part, None)
    return module


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, index: int):
        super().__init__()
        separate = config.separate_modality_weights

        def norm(conditioned: bool) -> AdaptiveNorm:
            return AdaptiveNorm(config.dim, config.unit_offset_norms, config.norm_eps, conditioned)

        # with separate modality weights the text path is not conditioned: adaLN is the modality path's
        self.attn_norm, self.attn = norm(not separate), Attention(config, is_first = index == 0)
        self.ff_norm, self.ff = norm(not separate), FeedForward(config)
        if separate:
            self.modality_attn_norm, self.modality_ff_norm, self.modality_ff = norm(True), norm(True), FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

        uses_streams = config.num_residual_streams > 1 or config.num_residual_fracs > 1
        self.mixes = nn.ModuleList([
            ResidualMix(config.dim, config.num_residual_streams, config.num_residual_fracs, 2 * index + branch, config.unit_offset_norms)
            for branch in range(2)
        ]) if uses_streams else None

    def normalize(self, branch_index: int, h: Tensor, ctx: Context) -> tuple[Tensor, Tensor | None]:
        norm = (self.attn_norm, self.ff_norm)[branch_index]
        routing = ctx.routing
        if routing is None:
            return norm(h, ctx.cond)
        modality_norm = (self.modality_attn_norm, self.modality_ff_norm)[branch_index]
        if routing.num_text == 0:
            return modality_norm(h, ctx.cond)
        text, _ = norm(h[:routing.num_text], None)
        if routing.num_text == routing.num_rows:
            return text, None
        modality, gate = modality_norm(h[routing.num_text:], None if ctx.cond is None else ctx.cond.rows(routing.num_text))
        return torch.cat((text, modality)), gate

    def forward(self, x: Tensor, ctx: Context, cache = None) -> Tensor:
        """x: (N, dim), or (N, streams, dim) with hyper-connections; rows in routed order."""
        x = self.residual(0, x, ctx, lambda h: self.attn(h, ctx, cache))
        return self.residual(1, x, ctx, lambda h: route(ctx.routing, h, self.ff, getattr(self, 'modality_ff', None)))

    def residual(self, branch_index: int, x: Tensor, ctx: Context, branch) -> Tensor:
        if self.mixes is None:
            h = x
        else:
            h, saved = self.mixes[branch_index].read(x)

        h, gate = self.normalize(branch_index, h, ctx)
        h = branch(h)
        if self.training and self.dropout.p > 0:
            h = self.dropout(h)
        h = h if gate is None else apply_gate(h, gate, ctx.cond)

        return x + h if self.mixes is None else self.mixes[branch_index].write(saved, h)


def skip_merge(proj: nn.Linear, x: Tensor, skip: Tensor) -> Tensor:
    """proj(cat(x, skip)), as two products on the halves of the weight: no concatenated copy."""
    dim = x.shape[-1]
    return F.linear(x, proj.weight[:, :dim]) + F.linear(skip, proj.weight[:, dim:])


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        dim = config.dim

        self.rotary = Rotary(config.dim_head, config.rotary_theta, config.rotary_scaling)
        self.to_time_embed = nn.Sequential(nn.Linear(config.dim_time, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList([Block(config, index) for index in range(config.depth)])

        # U-ViT: block i of the second half also sees the output of its mirror in the first half
        num_skips = config.depth // 2 if config.unet_skips else 0
        self.skip_projs = nn.ModuleList([nn.Linear(dim * 2, dim, bias = False) for _ in range(num_skips)])
        for proj in self.skip_projs:
            nn.init.zeros_(proj.weight)
            proj.weight.data[:, :dim].copy_(torch.eye(dim))     # starts as the plain residual stream

        self.final_norm = RMSNorm(dim, config.unit_offset_norms, config.norm_eps)
        if config.separate_modality_weights:
            self.modality_final_norm = RMSNorm(dim, config.unit_offset_norms, config.norm_eps)

        self.copy_text_weights_to_modality()
        if config.freeze_text_weights:
            for module in self.text_modules():
                module.requires_grad_(False)

    def text_and_modality_modules(self) -> list[tuple[nn.Module, nn.Module | None]]:
        """Each weighted module of the text (or shared) path, with its modality copy (None: shared):
        the attention projections, q / k norms, feed-forward and norms of every block, and the final norm."""
        pairs = [(submodule(block, text), submodule(block, modality)) for block in self.blocks for text, modality in MODALITY_COPIES.items()]
        pairs.append((self.final_norm, getattr(self, 'modality_final_norm', None)))
        return [(text, modality) for text, modality in pairs if text is not None]

    def text_modules(self) -> list[nn.Module]:
        """The modules that `freeze_text_weights` freezes: the text path, as a language model has it."""
        return [text for text, _ in self.text_and_modality_modules()]

    @torch.no_grad()
    def copy_text_weights_to_modality(self):
        """Sets each modality copy to its text module's weights: the starting point of separate
        modality weights, called on construction and after loading a language model's weights."""
        for text, modality in self.text_and_modality_modules():
            if modality is not None:
                modality.load_state_dict(text.state_dict())

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
        num_latent: int | None = None,      # how many tokens are in a span, when known on the host (spares routing a wait on the device)
    ) -> Tensor:
        num_tokens = x.shape[0]
        padded = layout is not None and layout.num_tokens > num_tokens
        if padded:
            x, positions, span_times, token_span = pad_to_layout(layout.num_tokens, x, positions, span_times, token_span)

        routing = None
        if self.config.separate_modality_weights and token_span is not None:
            routing = Routing(token_span >= 0, num_latent)
            x, token_span = routing.to_routed(x), routing.to_routed(token_span)

        cond = None
        if span_times is not None and span_times.numel() > 0:
            features = time_features(span_times, self.config.dim_time)
            span_embed = self.to_time_embed(features.to(self.to_time_embed[0].weight.dtype))
            if padded:
                torch._dynamo.maybe_mark_dynamic(span_embed, 0)     # one compiled graph for any number of spans
            cond = Conditioning(span_embed, token_span)

        ctx = Context(layout, self.rotary(positions), cond, routing = routing)

        first_mix = self.blocks[0].mixes[0] if self.blocks[0].mixes is not None else None
        if first_mix is not None:
            x = first_mix.expand(x)                                     # (N, streams, dim)

        depth, num_skips = len(self.blocks), len(self.skip_projs)
        skips = []

        # generation changes shapes at every step: there, blocks compiled for training run eagerly
        # (unless the step itself is being compiled, `static_decode.py`)
        with nullcontext() if cache is None or torch.compiler.is_compiling() else torch.compiler.set_stance('force_eager'):
            for index, block in enumerate(self.blocks):
                if index >= depth - num_skips:
                    x = skip_merge(self.skip_projs[index - (depth - num_skips)], x, skips.pop())

                x = block(x, ctx, None if cache is None else cache.layer(index))

                if index < num_skips:
                    skips.append(x)

        if first_mix is not None:
            x = first_mix.reduce(x)

        x = route(routing, x, self.final_norm, getattr(self, 'modality_final_norm', None))
        x = x if routing is None else routing.to_sequence(x)
        return x[:num_tokens]


SPAN_MULTIPLE = 8


def pad_to_layout(length: int, x: Tensor, positions: Tensor, span_times: Tensor | None, token_span: Tensor | None):
    """The inputs of a padded layout (compiled blocks, see `masks.py`), padded to its `length`:
    padding tokens are zeros at position 0 outside any span (conditioned as text, and on the
    text weights), and the span times are padded with zeros to a multiple of SPAN_MULTIPLE rows,
    which no token looks up. So batches of changing length and number of spans reach the blocks
    with few shapes."""
    padding = length - x.shape[0]
    x = F.pad(x, (0, 0, 0, padding))
    positions = F.pad(positions, (0, padding))
    if token_span is not None:
        token_span = F.pad(token_span, (0, padding), value = -1)
    if span_times is not None and span_times.numel() > 0:
        span_times = F.pad(span_times, (0, -span_times.shape[0] % SPAN_MULTIPLE))
    return x, positions, span_times, token_span
