"""The optimised training path against the straightforward one (issue 7).

The slow path swaps in, over the whole model: textbook attention over the dense (N, N) mask
built one query and key at a time (`reference.py`), the textbook rotary formula, the adaptive
norm as x * (1 + scale) + shift with plain per-token tables, SwiGLU by autograd and the U-ViT
skip as a projection of the concatenation. Losses and gradients must agree:

- fp32: loss to 1e-5 relative, every gradient to atol 1e-5 / rtol 1e-3 (summation order differs);
- bf16 autocast against fp32: loss to 2e-2 relative, each gradient with cosine similarity > 0.99.
"""

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import transfusion_pytorch.transformer as transformer_module
from transfusion_pytorch.masks import padded_layout
from transfusion_pytorch.transformer import AdaptiveNorm, Conditioning, swiglu

from conftest import DIM_LATENTS, random_batch, tiny_model
from reference import reference_attention, reference_mask

FP32 = dict(atol = 1e-5, rtol = 1e-3)


def textbook_rotary(t, cos, signed_sin):
    half = t.shape[-1] // 2
    cos, sin = cos[..., :half], signed_sin[..., half:]
    first, second = t.float().chunk(2, dim = -1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim = -1).type_as(t)


def textbook_adaptive_norm(self, x, cond):
    x = self.norm(x)
    if cond is None:
        return x, None
    scale, shift, gate = self.to_modulation(F.silu(cond.span_embed)).chunk(3, dim = -1)
    is_text = (cond.token_row == cond.span_embed.shape[0])[:, None]
    row = cond.token_row.clamp(max = cond.span_embed.shape[0] - 1)
    scale, shift, gate = (torch.where(is_text, text, t[row]) for t, text in ((scale, 0.), (shift, 0.), (gate, 1.)))
    return x * (1. + scale) + shift, gate


def textbook_swiglu(projected):
    x, gate = projected.chunk(2, dim = -1)
    return x * F.silu(gate)


def textbook_skip(proj, x, skip):
    return proj(torch.cat((x, skip), dim = -1))


def slow_path(monkeypatch, packed):
    mask = reference_mask(packed)
    monkeypatch.setattr(transformer_module, 'attend', lambda q, k, v, layout, **kwargs: reference_attention(q, k, v, mask))
    monkeypatch.setattr(transformer_module, 'apply_rotary', textbook_rotary)
    monkeypatch.setattr(transformer_module, 'swiglu', textbook_swiglu)
    monkeypatch.setattr(transformer_module, 'skip_merge', textbook_skip)
    monkeypatch.setattr(AdaptiveNorm, 'forward', textbook_adaptive_norm)      # returns a per-token gate
    monkeypatch.setattr(transformer_module, 'apply_gate', lambda h, gate, cond: h * gate)


def loss_and_grads(model, packed, times, noise, autocast = False):
    model.zero_grad(set_to_none = True)
    with torch.autocast('cpu', dtype = torch.bfloat16, enabled = autocast):
        loss = model.compute_loss(packed, times, noise).total
    loss.backward()
    return loss.detach().float(), {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}


def setup(seed, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault('transformer', dict(dim = 32, depth = 4, dim_head = 8, heads = 4))
    model = tiny_model(**kwargs)
    # open the adaLN-zero gates and the skips, so that every path carries gradient
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    extra = [[torch.randint(0, 32, (9,))], [torch.randint(0, 32, (4,)), (0, torch.randn(3, DIM_LATENTS[0])), torch.randint(0, 32, (2,))]]
    batch = random_batch(random.Random(seed), max_samples = 4) + extra
    packed = model.pack(batch)
    times = torch.rand(packed.num_spans)
    noise = tuple(torch.randn_like(latents) for latents in packed.latents)
    return model, packed, times, noise


@pytest.mark.parametrize('seed', range(4))
def test_fast_path_equals_slow_reference_fp32(seed, monkeypatch):
    model, packed, times, noise = setup(seed)
    fast_loss, fast_grads = loss_and_grads(model, packed, times, noise)

    with monkeypatch.context() as patch:
        slow_path(patch, packed)
        slow_loss, slow_grads = loss_and_grads(model, packed, times, noise)

    torch.testing.assert_close(fast_loss, slow_loss, rtol = 1e-5, atol = 1e-6)
    assert fast_grads.keys() == slow_grads.keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], **FP32, msg = lambda m: f'{name}: {m}')


def test_text_only_rows_fast_path_equals_slow_reference(monkeypatch):
    torch.manual_seed(0)
    model = tiny_model()
    text = torch.randint(0, 32, (3, 12))
    packed = model.pack(text)
    fast_loss, fast_grads = loss_and_grads(model, packed, torch.zeros(0), packed.latents)
    with monkeypatch.context() as patch:
        slow_path(patch, packed)
        slow_loss, slow_grads = loss_and_grads(model, packed, torch.zeros(0), packed.latents)
    torch.testing.assert_close(fast_loss, slow_loss, rtol = 1e-5, atol = 1e-6)
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], **FP32)


@pytest.mark.parametrize('seed', range(2))
def test_bf16_autocast_agrees_with_fp32(seed):
    model, packed, times, noise = setup(seed)
    loss32, grads32 = loss_and_grads(model, packed, times, noise)
    loss16, grads16 = loss_and_grads(model, packed, times, noise, autocast = True)

    torch.testing.assert_close(loss16, loss32, rtol = 2e-2, atol = 1e-3)
    for name in grads32:
        a, b = grads32[name].flatten(), grads16[name].flatten()
        if a.norm() < 1e-6:
            continue
        assert F.cosine_similarity(a, b, dim = 0) > 0.99, name


def test_swiglu_gradients():
    projected = torch.randn(5, 3, 8, dtype = torch.float64, requires_grad = True)
    assert torch.autograd.gradcheck(swiglu, (projected,))
    torch.testing.assert_close(swiglu(projected), textbook_swiglu(projected))


def test_masks_are_made_once_per_batch_and_shared_by_every_layer(monkeypatch):
    """One additive mask per batch (or per sample, when samples are attended one by one), the
    same tensor in every layer's SDPA calls."""
    model, packed, times, noise = setup(1)
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask = None, **kwargs):
        seen.append(attn_mask)
        return sdpa(q, k, v, attn_mask = attn_mask, **kwargs)

    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    model.compute_loss(packed, times, noise)
    depth = model.config.transformer.depth
    per_layer = len(seen) // depth
    assert len(seen) == depth * per_layer and per_layer >= 1
    first = seen[:per_layer]
    assert any(mask is not None for mask in first) and all(mask.dtype == torch.float32 for mask in first if mask is not None)
    for layer in range(depth):
        assert all(mask is expected for mask, expected in zip(seen[layer * per_layer:(layer + 1) * per_layer], first))


def test_additive_mask_equals_bool_mask():
    model, packed, *_ = setup(2)
    layout = padded_layout(packed)
    additive = layout.additive_mask(torch.float32)
    assert torch.equal(additive == 0, layout.mask)
    assert torch.isinf(additive[~layout.mask]).all()


def test_conditioning_is_per_span(monkeypatch):
    """The time MLP and every block's modulation see one row per modality span, not per token."""
    model, packed, times, noise = setup(3)
    rows = []
    for norm in (m for m in model.modules() if isinstance(m, AdaptiveNorm)):
        norm.to_modulation.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    model.compute_loss(packed, times, noise)
    assert rows and all(r == packed.num_spans for r in rows)


# the GPU path, checked on CPU: flex attention runs eagerly (and forward only) here

def test_flex_block_mask_is_built_once_and_shared_by_every_layer(monkeypatch):
    import torch.nn.attention.flex_attention as flex
    import transfusion_pytorch.attention as attention_module

    model, packed, times, noise = setup(0, transformer = dict(dim = 32, depth = 4, dim_head = 8, heads = 4, use_flex_attn = True))
    built, used = [], []
    create = flex.create_block_mask
    monkeypatch.setattr(flex, 'create_block_mask', lambda *args, **kwargs: built.append(create(*args, **kwargs)) or built[-1])
    attend_flex = attention_module._attend_flex
    monkeypatch.setattr(attention_module, '_attend_flex', lambda q, k, v, layout, softcap: used.append(layout.block_mask) or attend_flex(q, k, v, layout, softcap))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        flex_loss = model.compute_loss(packed, times, noise).total
    assert len(built) == 1 and len(used) == 4 and all(mask is built[0] for mask in used)

    with torch.no_grad():
        sdpa_loss = replace_flex(model).compute_loss(packed, times, noise).total
    torch.testing.assert_close(flex_loss, sdpa_loss, atol = 1e-5, rtol = 1e-5)


def replace_flex(model):
    from dataclasses import replace
    model.config = replace(model.config, transformer = replace(model.config.transformer, use_flex_attn = False))
    return model


@pytest.mark.parametrize('use_flex', [False, True])
def test_a_block_traces_without_graph_breaks(use_flex):
    """torch.compile sees each block as one graph (`fullgraph = True` would succeed)."""
    from transfusion_pytorch.masks import build_layout
    from transfusion_pytorch.transformer import Context, time_features

    model, packed, times, noise = setup(0)
    transformer = model.transformer
    cond = Conditioning(transformer.to_time_embed(time_features(times, transformer.config.dim_time)), packed.span)
    ctx = Context(build_layout(packed, use_flex_attn = use_flex), transformer.rotary(packed.position), cond)
    x = torch.randn(packed.num_tokens, transformer.dim)
    torch._dynamo.reset()
    with torch.no_grad() if use_flex else torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        explained = torch._dynamo.explain(transformer.blocks[1])(x, ctx)
    assert explained.graph_break_count == 0, [str(reason.reason) for reason in explained.break_reasons]
    assert explained.graph_count == 1


def test_modulation_keeps_no_per_token_table():
    """adaLN's scale and gate reach the tokens through per-span tables; the backward pass keeps
    the (S + 1, dim) tables, never their (N, dim) per-token copies."""
    from transformer_helpers import saved_storage_bytes
    from transfusion_pytorch.transformer import Conditioning, apply_gate

    torch.manual_seed(0)
    n, dim, spans = 500, 64, 3
    norm = AdaptiveNorm(dim, unit_offset = True)
    with torch.no_grad():
        norm.to_modulation.weight.normal_()
    cond = Conditioning(torch.randn(spans, dim), torch.randint(-1, spans, (n,)))
    x = torch.randn(n, dim, requires_grad = True)
    branch = torch.randn(n, dim, requires_grad = True)

    def fast():
        h, gate = norm(x, cond)
        return apply_gate(branch * h, gate, cond)

    def textbook():
        h, gate = textbook_adaptive_norm(norm, x, cond)
        return branch * h * gate

    per_token, tables = n * dim * 4, 3 * (spans + 1) * dim * 4
    # the textbook keeps (N, dim) copies of 1 + scale and of the gate; the fast path three small tables
    assert saved_storage_bytes(fast) <= saved_storage_bytes(textbook) - 2 * per_token + tables
    assert torch.allclose(fast(), textbook(), atol = 1e-5)
