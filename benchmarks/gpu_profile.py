"""Where a training step spends its time, by kind of kernel: torch.profiler's `key_averages()`
over a few steps after the warm-up, each kernel classified by its name, and the block mask's
sparsity for the batch (issue 21, item 1: the levers are the matmuls, the flex attention
kernels, the modulation's index_add_ and the remaining elementwise work).

On CUDA the rows are the GPU kernels and their self device time. On CPU (`gpu.py --dry-run`)
there are no kernels: the rows are the aten operators and their self CPU time, classified by the
same rules, so that the plumbing and the classification run where the tests run.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile as torch_profile

from transfusion_pytorch import masks

KINDS = ('matmul', 'attention forward', 'attention backward', 'index / scatter', 'aten elementwise & reductions',
         'inductor-fused elementwise', 'other')

ATTENTION = ('flex_attention', 'flash', 'fmha', 'attention', 'sdpa')
MATMUL = ('gemm', 'gemv', 'cublas', 'cutlass', 'nvjet', 'xmma', 'splitkreduce')
MATMUL_OPS = {'aten::mm', 'aten::addmm', 'aten::bmm', 'aten::baddbmm', 'aten::mv', 'aten::addmv', 'aten::_scaled_mm',
              'aten::_addmm_activation'}
INDEX = ('index', 'scatter', 'gather', 'embedding', 'sort', 'nonzero', 'masked_select')
ATEN = ('at::native', 'aten::', 'elementwise', 'reduce_kernel', 'multi_tensor_apply', 'catarraybatchedcopy')


def classify(name: str) -> str:
    """The kind of a kernel (CUDA) or aten operator (CPU), from its name. Order matters: flex
    attention's Triton templates and flash attention's CUTLASS kernels are attention, not
    matmuls or inductor kernels; inductor's matmul templates (`triton_tem_fused_mm...`) are
    matmuls; an index_add_ fused by inductor is inductor's."""
    n = name.lower()
    if any(word in n for word in ATTENTION):
        return 'attention backward' if 'backward' in n or 'bwd' in n else 'attention forward'
    if n in MATMUL_OPS or any(word in n for word in MATMUL) or (n.startswith('triton_tem_') and ('mm_' in n or n.endswith('mm'))):
        return 'matmul'
    if n.startswith('triton_') or 'cpp_fused' in n:
        return 'inductor-fused elementwise'
    if any(word in n for word in INDEX):
        return 'index / scatter'
    if any(word in n for word in ATEN):
        return 'aten elementwise & reductions'
    return 'other'


def self_time_us(event, device: torch.device) -> float:
    return event.self_device_time_total if device.type == 'cuda' else event.self_cpu_time_total


def is_kernel(event, device: torch.device) -> bool:
    """CUDA: the events on the GPU (kernels, copies, memsets); CPU: the operators."""
    if device.type == 'cuda':
        return event.device_type == torch.autograd.DeviceType.CUDA
    return event.device_type == torch.autograd.DeviceType.CPU


def profile(step, device: torch.device, steps: int) -> dict:
    """`steps` calls of `step()` (already warmed up) under torch.profiler: per kind, ms per step
    and share of the kernel time; the ten longest kernels; the wall time per step under the
    profiler (which slows the host down)."""
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if device.type == 'cuda' else [ProfilerActivity.CPU]
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    with torch_profile(activities = activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    rows = [(event.key, self_time_us(event, device) / 1e3 / steps, event.count / steps)
            for event in prof.key_averages() if is_kernel(event, device) and self_time_us(event, device) > 0]
    return summarise(rows, wall * 1e3 / steps, steps, device)


def summarise(rows: list[tuple[str, float, float]], wall_ms: float, steps: int, device: torch.device) -> dict:
    """rows: (kernel name, ms per step, calls per step)."""
    total = sum(ms for _, ms, _ in rows)
    per_kind = {kind: 0. for kind in KINDS}
    for name, ms, _ in rows:
        per_kind[classify(name)] += ms
    top = sorted(rows, key = lambda row: -row[1])[:10]
    return dict(
        steps = steps, source = 'CUDA kernels, self device time' if device.type == 'cuda' else 'CPU aten operators, self CPU time',
        kernel_ms_per_step = total, wall_ms_per_step = wall_ms,
        kinds = [dict(kind = kind, ms_per_step = ms, share = ms / total if total else 0.) for kind, ms in per_kind.items()],
        top = [dict(name = name[:160], kind = classify(name), ms_per_step = ms, calls_per_step = calls) for name, ms, calls in top],
    )


def block_mask_sparsity(packed, pad_to_multiple: int | None) -> dict:
    """The flex attention block mask the model builds for `packed`: the share of its blocks
    that flex attention skips (`BlockMask.sparsity()`), the blocks it computes, and what a plain
    causal mask over the whole padded sequence would skip, for comparison."""
    layout = masks.build_layout(packed, use_flex_attn = True, pad_to_multiple = pad_to_multiple)
    block_mask = layout.block_mask
    block = block_mask.BLOCK_SIZE[0]
    blocks = -(-layout.num_tokens // block)
    return dict(sparsity_pct = float(block_mask.sparsity()), block_size = block, tokens = packed.num_tokens,
                padded_tokens = layout.num_tokens, samples = len(packed.seq_lengths), blocks_total = blocks * blocks,
                causal_sparsity_pct = 100. * (1 - blocks * (blocks + 1) / 2 / (blocks * blocks)))


def print_profile(name: str, result: dict):
    mask = result['block_mask']
    print(f'\n{name}: {result["kernel_ms_per_step"]:.1f} ms of {result["source"]} per step, against {result["step_ms"]:.1f} ms per '
          f'measured step ({result["wall_ms_per_step"]:.1f} ms under the profiler, {result["steps"]} steps); '
          f'block mask sparsity {mask["sparsity_pct"]:.1f}% '
          f'({mask["samples"]} samples, {mask["tokens"]:,} tokens padded to {mask["padded_tokens"]:,}, blocks of {mask["block_size"]}; '
          f'causal alone would skip {mask["causal_sparsity_pct"]:.1f}%)')
    print('| kind | ms per step | share |')
    print('|---|---|---|')
    for row in result['kinds']:
        print(f'| {row["kind"]} | {row["ms_per_step"]:.2f} | {100 * row["share"]:.1f}% |')
    print('longest kernels (ms per step, calls per step):')
    for row in result['top']:
        print(f'  {row["ms_per_step"]:8.2f} ms  {row["calls_per_step"]:5.0f}x  [{row["kind"]}] {row["name"][:110]}')
