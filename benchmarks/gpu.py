"""The GPU path: flex attention, torch.compile'd blocks, bf16 autocast. Reports MFU for dim
1024, depth 16 on about 16k packed tokens, against the measured bf16 matmul rate of the card.

    python benchmarks/gpu.py                 # needs CUDA; prints the checks, then the numbers

It checks itself before it measures, and stops at the first failed check:

1. the flex attention block mask is built once per batch and shared by every layer (a spy on
   `create_block_mask` counts one call per forward pass);
2. each transformer block compiles with `fullgraph = True` (no graph break) and
   `torch._dynamo.explain` reports one graph;
3. the compiled model's loss and gradients match the eager model's on the same batch, noise and
   times (bf16 autocast: loss to 2e-2 relative, gradient norm to 5e-2 relative);
4. the loss is finite at every step.

The batch is packed once (packing is host-side work a data loader does ahead of time); each
step draws fresh noise and times, runs forward + backward + fused AdamW. MFU = model FLOPs
(`train.per_token_flops`: 6 x per-token parameters x packed tokens + causal attention over the
sum of squared sample lengths) / step time / measured bf16 matmul FLOP/s. Goal: >= 40%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload                                    # noqa: E402
from train import per_token_flops                  # noqa: E402

from transfusion_pytorch import Transfusion        # noqa: E402
import transfusion_pytorch.masks as masks          # noqa: E402


def bf16_peak(device, n: int = 8192, repeats: int = 20) -> float:
    a, b = (torch.randn(n, n, device = device, dtype = torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def check(condition: bool, message: str):
    print(f'  [{"ok" if condition else "FAILED"}] {message}', flush = True)
    if not condition:
        sys.exit(1)


def loss_and_grad_norm(model, packed, times, noise):
    model.zero_grad(set_to_none = True)
    with torch.autocast('cuda', dtype = torch.bfloat16):
        loss = model.compute_loss(packed, times, noise).total
    loss.backward()
    norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None))
    return loss.item(), norm.item()


def main():
    parser = argparse.ArgumentParser(description = __doc__.split('\n\n')[0])
    parser.add_argument('--dim', type = int, default = 1024)
    parser.add_argument('--depth', type = int, default = 16)
    parser.add_argument('--tokens', type = int, default = 16384, help = 'about this many packed tokens')
    parser.add_argument('--samples', type = int, default = 16)
    parser.add_argument('--steps', type = int, default = 10)
    parser.add_argument('--warmup', type = int, default = 3)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit('benchmarks/gpu.py needs a CUDA device')
    device = torch.device('cuda')
    torch.backends.cuda.matmul.allow_tf32 = True

    # user tokens: 40% text, 60% latent; the structural tokens bring the packed count to about --tokens
    user_tokens = args.tokens - 40 * args.samples
    case = workload.Case('gpu', 'GPU batch', args.samples, int(user_tokens * 0.4), user_tokens - int(user_tokens * 0.4))
    batch = workload.make_batch(case)
    torch.manual_seed(0)
    model = Transfusion(
        num_text_tokens = workload.NUM_TEXT_TOKENS, dim_latent = workload.DIM_LATENT, modality_default_shape = (4,),
        transformer = dict(dim = args.dim, depth = args.depth, use_flex_attn = True),
    ).to(device)
    packed = model.pack(batch)
    params = sum(p.numel() for p in model.parameters())
    print(f'{torch.cuda.get_device_name()}; {params / 1e6:.0f}M parameters, {packed.num_tokens:,} packed tokens in {packed.batch_size} samples, {packed.num_spans} modality spans')

    def fresh():
        return torch.rand(packed.num_spans, device = device), tuple(torch.randn_like(x) for x in packed.latents)

    print('checks:')
    calls = []
    original = masks.flex_layout

    def counting_layout(p):
        calls.append(1)
        return original(p)

    masks.flex_layout = counting_layout
    times, noise = fresh()
    eager = loss_and_grad_norm(model, packed, times, noise)
    masks.flex_layout = original
    check(len(calls) == 1, f'one block mask per forward pass for {args.depth} layers (built {len(calls)} times)')

    from transfusion_pytorch.transformer import Conditioning, Context, time_features
    transformer = model.transformer
    with torch.no_grad(), torch.autocast('cuda', dtype = torch.bfloat16):
        layout = masks.build_layout(packed, use_flex_attn = True)
        cond = Conditioning(transformer.to_time_embed(time_features(times, transformer.config.dim_time)), packed.span)
        ctx = Context(layout, transformer.rotary(packed.position), cond)
        x = torch.randn(packed.num_tokens, args.dim, device = device)
        explained = torch._dynamo.explain(transformer.blocks[0])(x, ctx)
    check(explained.graph_break_count == 0 and explained.graph_count == 1,
          f'a block traces to {explained.graph_count} graph(s) with {explained.graph_break_count} break(s) {[str(r.reason)[:120] for r in explained.break_reasons]}')

    for block in transformer.blocks:
        block.compile(fullgraph = True, dynamic = False)
    compiled = loss_and_grad_norm(model, packed, times, noise)
    check(abs(compiled[0] - eager[0]) <= 2e-2 * abs(eager[0]), f'compiled loss {compiled[0]:.4f} vs eager {eager[0]:.4f}')
    check(abs(compiled[1] - eager[1]) <= 5e-2 * eager[1], f'compiled gradient norm {compiled[1]:.4f} vs eager {eager[1]:.4f}')

    optimizer = torch.optim.AdamW(model.parameters(), lr = 1e-4, fused = True)
    step_times = []
    for step in range(args.warmup + args.steps):
        times, noise = fresh()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast('cuda', dtype = torch.bfloat16):
            loss = model.compute_loss(packed, times, noise).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none = True)
        torch.cuda.synchronize()
        step_times.append(time.perf_counter() - start)
        check(torch.isfinite(loss).item(), f'step {step}: loss {loss.item():.4f} finite')

    step_s = statistics.median(step_times[args.warmup:])
    flops, attention = per_token_flops(model, packed)
    peak = bf16_peak(device)
    mfu = flops / step_s / peak
    print(f'\nmedian step {step_s * 1e3:.1f} ms over {args.steps} steps; {packed.num_tokens / step_s:,.0f} packed tokens/s; '
          f'peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB')
    print(f'model {flops / 1e12:.2f} TFLOP per step ({100 * attention / flops:.0f}% attention); '
          f'{flops / step_s / 1e12:.1f} TFLOP/s; measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s')
    print(f'MFU {100 * mfu:.1f}% (goal >= 40%: {"met" if mfu >= 0.4 else "NOT met"})')


if __name__ == '__main__':
    main()
