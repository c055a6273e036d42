"""The training half of `benchmarks/gpu.py`: the image-text and Llama-shaped models on packed
image-caption batches, the checks of the compiled GPU path against the eager one, and the
measurement of one (model, checkpointing mode): tokens/s, MFU, peak memory, and optionally the
profile of the measured step (`gpu_profile.py`).

Two models, each on image-caption batches of about `tokens` packed tokens (captions with
32 x 32 x 16 image latents, a fifth of them image first, and text-only rows):

- `image_text`: the model of the image-text job (`transfusion train --job image_text`,
  `jobs.image_text.build_model`) at width 1024, depth 16, for a 50k-token vocabulary and a VAE
  of 16 latent channels;
- `llama`: a model started from a Llama-shaped language model (Llama 3.2 1B: width 2048, 16
  blocks, 32 query and 8 key-value heads, SwiGLU 8192, a 128k vocabulary, rotary theta 5e5)
  with `Transfusion.from_language_model`; the language model has random weights (nothing is
  downloaded), written in the Hugging Face layout to a temporary folder first.

The checks (each recorded in CHECKS; a failed one makes gpu.py exit non-zero):

1. flex attention, compiled, with the padded block mask the model builds, against SDPA on each
   sample of a mixed packed batch: the output and the gradients of q, k and v (on CPU the
   forward only: PyTorch has no flex backward there);
2. a block traces to one graph without a break (`torch._dynamo.explain`);
3. the compiled model builds one block mask (attention layout) per forward pass, which every
   block shares;
4. the compiled, padded model against the eager, unpadded one with SDPA attention, under bf16
   autocast: loss to 2e-2 relative, gradient norm to 5e-2 relative, each gradient with cosine
   similarity > 0.98 (on CUDA this is also flex attention's backward pass against SDPA's);
5. batches of other lengths and numbers of spans compile no new graph;
6. every measured step's loss is finite.

A measurement: the median step time (forward + backward + fused AdamW, fresh noise and times
each step; the batch is packed once, as a data loader would ahead of time), packed tokens/s,
MFU and the peak memory allocated. MFU = model FLOPs (`train.per_token_flops`: 6 x per-token
parameters x packed tokens + causal attention over the sum of squared sample lengths; the
recomputation of checkpointing and the padding are not counted) / step time / the measured bf16
matmul rate.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_profile                                  # noqa: E402
from gpu_common import gib, peak_memory_gib, reset_peak_memory, sync   # noqa: E402
from train import per_token_flops                  # noqa: E402

from transfusion_pytorch import Transfusion        # noqa: E402
import transfusion_pytorch.masks as masks          # noqa: E402
import transfusion_pytorch.model as model_module    # noqa: E402
from transfusion_pytorch.attention import attend   # noqa: E402
from transfusion_pytorch.jobs import image_text     # noqa: E402
from transfusion_pytorch.language_models import LANGUAGE_MODEL_LACKS   # noqa: E402
from transfusion_pytorch.masks import padded_length  # noqa: E402
from transfusion_pytorch.training.parallelize import TOKEN_MULTIPLE, apply_activation_checkpointing, apply_compile  # noqa: E402


@dataclass(frozen = True)
class Shape:
    """A model and its batches."""
    vocab: int
    dim: int
    depth: int
    heads: int
    dim_head: int
    tokens: int                     # packed tokens per batch, about
    grid: int = 32                  # image latents: grid x grid tokens ...
    dim_latent: int = 16            # ... of this many channels
    kv_heads: int | None = None     # a language model's: grouped-query attention ...
    dim_ff_hidden: int | None = None    # ... and its SwiGLU width (None: the image-text model)


FULL = dict(
    # the image-text job's model at a GPU size (a tokenizer's vocabulary, a VAE's latent channels and grid)
    image_text = Shape(vocab = 50257, dim = 1024, depth = 16, heads = 16, dim_head = 64, tokens = 16384),
    # Llama 3.2 1B
    llama = Shape(vocab = 128256, dim = 2048, depth = 16, heads = 32, dim_head = 64, tokens = 16384, kv_heads = 8, dim_ff_hidden = 8192),
)
TINY = dict(
    image_text = Shape(vocab = 1000, dim = 64, depth = 2, heads = 2, dim_head = 32, tokens = 400, grid = 4, dim_latent = 8),
    llama = Shape(vocab = 2000, dim = 64, depth = 2, heads = 4, dim_head = 16, tokens = 400, grid = 4, dim_latent = 8,
                  kv_heads = 2, dim_ff_hidden = 128),
)
MODES = ('none', 'full', 'selective')


def build_model(shape: Shape, use_flex: bool, device, language_models: Path) -> Transfusion:
    """The image-text model, or a model started from a Llama-shaped language model: saved in
    the Hugging Face layout (random weights: nothing is downloaded) and loaded back by
    `Transfusion.from_language_model`, as a downloaded one would be."""
    torch.manual_seed(0)
    latents = dict(dim_latent = shape.dim_latent, modality_default_shape = (shape.grid, shape.grid))
    with torch.device(device):                      # initialised where it trains: seconds, not minutes, for 1.5B parameters
        if shape.kv_heads is None:
            # the job's own model, for a tokenizer of `vocab` ids and a VAE of `dim_latent` channels
            config = image_text.ImageTextConfig(data = ('unused',), dim = shape.dim, depth = shape.depth, heads = shape.heads,
                                                dim_head = shape.dim_head)
            record = dict(tokenizer = dict(vocab_size = shape.vocab), codec = dict(dim_latent = shape.dim_latent), shape = [shape.grid] * 2)
            model = image_text.build_model(config, record)
            # flex attention or SDPA: read from the config at each forward pass
            model.config = replace(model.config, transformer = replace(model.config.transformer, use_flex_attn = use_flex))
            return model
        folder = language_models / f'llama-{shape.dim}-{shape.depth}'
        if not folder.exists():
            language_model = Transfusion(num_text_tokens = shape.vocab, transformer = dict(
                dim = shape.dim, depth = shape.depth, heads = shape.heads, kv_heads = shape.kv_heads, dim_head = shape.dim_head,
                dim_ff_hidden = shape.dim_ff_hidden, rotary_theta = 5e5, norm_eps = 1e-5, **LANGUAGE_MODEL_LACKS))
            language_model.save_language_model(folder, dtype = torch.bfloat16)
            del language_model
        return Transfusion.from_language_model(folder, **latents, transformer = dict(use_flex_attn = use_flex))


def image_text_batch(shape: Shape, seed: int) -> list:
    """Image-caption samples (a fifth image first) and, a fifth of the samples, text-only rows,
    until about `shape.tokens` packed tokens."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    image_tokens = shape.grid ** 2 + 8                  # latents, META, shape digits, BOM, EOM
    batch, used = [], 0
    while True:
        if rng.random() < 0.2:
            sample = [torch.randint(0, shape.vocab, (rng.randint(shape.tokens // 64, shape.tokens // 16),), generator = generator)]
            length = sample[0].numel() + 2
        else:
            caption = torch.randint(0, shape.vocab, (rng.randint(8, 64),), generator = generator)
            image = (0, torch.randn(shape.grid, shape.grid, shape.dim_latent, generator = generator))
            sample = [image, caption] if rng.random() < 0.2 else [caption, image]
            length = caption.numel() + image_tokens + 2
        if used + length > shape.tokens and batch:
            return batch
        batch.append(sample)
        used += length


def matmul_peak(device, dtype = torch.bfloat16) -> float:
    n, repeats = (8192, 20) if device.type == 'cuda' else (1024, 5)
    a, b = (torch.randn(n, n, device = device, dtype = dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


CHECKS: list[dict] = []      # every check made in this process, in order


def check(condition: bool, message: str) -> bool:
    """Prints and records a check; a failed one does not stop the run (the other figures are
    still worth a GPU's time), but gpu.py exits non-zero at its end."""
    CHECKS.append(dict(ok = bool(condition), message = message))
    print(f'  [{"ok" if condition else "FAILED"}] {message}', flush = True)
    return bool(condition)


def graphs() -> int:
    return torch._dynamo.utils.counters['stats']['unique_graphs']


def fresh_noise(packed, device):
    return torch.rand(packed.num_spans, device = device), tuple(torch.randn_like(x) for x in packed.latents)


def loss_and_grads(model, packed, times, noise, device):
    model.zero_grad(set_to_none = True)
    with torch.autocast(device.type, dtype = torch.bfloat16):
        loss = model.compute_loss(packed, times, noise).total
    loss.backward()
    grads = {name.replace('_checkpoint_wrapped_module.', ''): p.grad.float() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


# the checks

def check_flex_attention(model, packed, device, backend):
    """1. compiled flex attention with the model's padded block mask against SDPA per sample.
    On CPU, where flex attention has no backward pass, the backward check runs the same
    comparison on SDPA over the padded sequence instead."""
    from torch.nn.attention.flex_attention import flex_attention
    n, heads, dim_head = packed.num_tokens, 4, 64
    q, k, v = (torch.randn(n, heads, dim_head, device = device, requires_grad = True) for _ in range(3))
    layout = masks.build_layout(packed, use_flex_attn = True, pad_to_multiple = model.pad_to_multiple)
    reference = attend(q, k, v, masks.per_sample_layout(packed))
    flex = torch.compile(flex_attention, backend = backend, fullgraph = True)

    def flex_attend(q, k, v):
        padded = [F.pad(t, (0, 0, 0, 0, 0, layout.num_tokens - n)).transpose(0, 1)[None] for t in (q, k, v)]
        return flex(*padded, block_mask = layout.block_mask)[0].transpose(0, 1)[:n]

    backward = device.type == 'cuda'
    with torch.set_grad_enabled(backward):
        out = flex_attend(q, k, v)
    error = (out - reference).abs().max().item()
    check(error < 2e-2, f'compiled flex attention = SDPA per sample, forward (max |diff| {error:.1e}, {n:,} tokens)')

    what = 'compiled flex attention'
    if not backward:
        what = 'no flex backward on CPU; in its place SDPA over the padded sequence'
        dense = masks.build_layout(packed, pad_to_multiple = model.pad_to_multiple)
        out = attend(*(F.pad(t, (0, 0, 0, 0, 0, dense.num_tokens - n)) for t in (q, k, v)), dense)[:n]
    grad = torch.randn_like(reference)
    got, expected = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(reference, (q, k, v), grad)
    errors = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, expected)]
    check(max(errors) < 2e-2, f'{what} = SDPA per sample, backward (dq, dk, dv: relative max |diff| '
                              f'{", ".join(f"{e:.1e}" for e in errors)})')


def check_one_graph(model, packed, device, use_flex):
    """2. a block (not compiled yet) traces to one graph, no break, on the padded layout."""
    from transfusion_pytorch.transformer import Conditioning, Context, pad_to_layout, time_features
    transformer = model.transformer
    times, _ = fresh_noise(packed, device)
    layout = masks.build_layout(packed, use_flex_attn = use_flex, pad_to_multiple = model.pad_to_multiple)
    x = torch.randn(packed.num_tokens, transformer.dim, device = device)
    x, positions, times, token_span = pad_to_layout(layout.num_tokens, x, packed.position, times, packed.span)
    with torch.no_grad(), torch.autocast(device.type, dtype = torch.bfloat16):
        cond = Conditioning(transformer.to_time_embed(time_features(times, transformer.config.dim_time)), token_span)
        explained = torch._dynamo.explain(transformer.blocks[0])(x, Context(layout, transformer.rotary(positions), cond))
    check(explained.graph_break_count == 0 and explained.graph_count == 1,
          f'a block traces to {explained.graph_count} graph(s) with {explained.graph_break_count} break(s) '
          f'{[str(r.reason)[:120] for r in explained.break_reasons]}')


def check_compiled_against_eager(eager, compiled, packed, device):
    """2 and 4. compiled and padded (flex on CUDA) against eager and unpadded with SDPA, bf16;
    the compiled model's forward pass builds one attention layout (block mask) for all blocks."""
    times, noise = fresh_noise(packed, device)
    eager_loss, eager_grads = loss_and_grads(eager, packed, times, noise, device)
    calls, build_layout = [], model_module.build_layout
    model_module.build_layout = lambda *args, **kwargs: calls.append(1) or build_layout(*args, **kwargs)
    try:
        loss, grads = loss_and_grads(compiled, packed, times, noise, device)
    finally:
        model_module.build_layout = build_layout
    check(len(calls) == 1, f'one attention layout (block mask) per forward pass, shared by {len(compiled.transformer.blocks)} blocks '
                           f'(built {len(calls)} times)')
    norm = lambda g: torch.sqrt(sum(t.pow(2).sum() for t in g.values())).item()
    check(abs(loss - eager_loss) <= 2e-2 * abs(eager_loss), f'compiled loss {loss:.4f} vs eager (SDPA) {eager_loss:.4f}')
    check(abs(norm(grads) - norm(eager_grads)) <= 5e-2 * norm(eager_grads),
          f'compiled gradient norm {norm(grads):.4f} vs eager {norm(eager_grads):.4f}')
    cosines = {name: F.cosine_similarity(grads[name].flatten(), eager_grads[name].flatten(), dim = 0).item()
               for name in eager_grads if eager_grads[name].norm() > 1e-6}
    worst = min(cosines, key = cosines.get)
    check(grads.keys() == eager_grads.keys() and cosines[worst] > 0.98,
          f'every gradient along the eager one: lowest cosine {cosines[worst]:.4f} ({worst})')


def check_no_recompile(model, shape, device):
    """5. other lengths and numbers of spans: no new graph."""
    before, lengths = graphs(), []
    for seed in (1, 2, 3):
        packed = model.pack(image_text_batch(replace(shape, tokens = int(shape.tokens * (0.6 + 0.1 * seed))), seed))
        lengths.append((packed.num_tokens, packed.num_spans))
        loss_and_grads(model, packed, *fresh_noise(packed, device), device)
    check(graphs() == before, f'batches of (tokens, spans) {lengths} compiled {graphs() - before} new graph(s)')


def run_checks(shape: Shape, device, backend: str, use_flex: bool, folder: Path):
    """Checks 1 to 5 on the image-text model."""
    print(f'  image-text model, {backend}, {"flex attention" if use_flex else "SDPA"}, bf16 autocast', flush = True)
    eager = build_model(shape, False, device, folder)
    model = build_model(shape, use_flex, device, folder)          # the same weights
    model.pad_to_multiple = padded_length(shape.tokens, TOKEN_MULTIPLE)
    packed = eager.pack(image_text_batch(shape, 0))

    check_flex_attention(model, packed, device, backend)
    check_one_graph(model, packed, device, use_flex)
    apply_compile(model, backend, max_tokens = shape.tokens)
    check_compiled_against_eager(eager, model, packed, device)
    check_no_recompile(model, shape, device)


# the measurements

def measure(name: str, shape: Shape, mode: str, device, backend: str, use_flex: bool, steps: int, warmup: int, peak: float,
            folder: Path, profile_steps: int = 0) -> dict:
    """One (model, checkpointing mode): the median of `steps` steps after `warmup`, and with
    `profile_steps`, the kernel-kind table of that many more steps and the block mask's sparsity."""
    model = build_model(shape, use_flex, device, folder)
    apply_activation_checkpointing(model, None if mode == 'none' else mode)
    apply_compile(model, backend, max_tokens = shape.tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr = 1e-4, fused = True)
    packed = model.pack(image_text_batch(shape, 0))
    reset_peak_memory(device)

    def step() -> torch.Tensor:
        times, noise = fresh_noise(packed, device)
        with torch.autocast(device.type, dtype = torch.bfloat16):
            loss = model.compute_loss(packed, times, noise).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none = True)
        return loss

    before, step_times, losses = graphs(), [], []
    for _ in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
    check(all(map(math.isfinite, losses)), f'{name} / {mode}: every loss finite ({", ".join(f"{value:.3f}" for value in losses)})')

    step_s = statistics.median(step_times[warmup:])
    flops, attention = per_token_flops(model, packed)
    row = dict(model = name, mode = mode, params = sum(p.numel() for p in model.parameters()), tokens = packed.num_tokens,
               padded = model.pad_to_multiple, samples = len(packed.seq_lengths), step_s = step_s, first_s = step_times[0],
               tokens_per_s = packed.num_tokens / step_s, mfu = flops / step_s / peak, attention_share = attention / flops,
               graphs = graphs() - before, peak_gib = peak_memory_gib(device) if device.type == 'cuda' else None)
    print(f'  {name} / {mode}: {row["params"] / 1e6:,.1f}M parameters, {row["tokens"]:,} tokens (padded to {row["padded"]:,}), '
          f'first step {row["first_s"]:.1f} s ({row["graphs"]} graph(s) compiled), median {step_s * 1e3:.1f} ms, '
          f'{row["tokens_per_s"]:,.0f} tokens/s, MFU {100 * row["mfu"]:.1f}%, peak {gib(row["peak_gib"])}', flush = True)
    if profile_steps:
        sparsity = gpu_profile.block_mask_sparsity(packed, model.pad_to_multiple)
        row['profile'] = dict(gpu_profile.profile(step, device, profile_steps), step_ms = step_s * 1e3, block_mask = sparsity)
    return row
