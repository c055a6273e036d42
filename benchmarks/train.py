"""Training throughput and memory: this package against the public `transfusion-pytorch`
0.20.0, side by side, on identical configurations and batches (see `workload.py`).

    python benchmarks/train.py                      # every case, both packages, fp32, 2 threads
    python benchmarks/train.py --cases multimodal --steps 5 --no-reference

The public package runs in its own virtualenv `.venv-reference` in the repository root,
created on first use with `python -m venv .venv-reference` and
`pip install torch==2.13.0 transfusion-pytorch==0.20.0` (torch pinned: unpinned, pip pulls the
multi-GB CUDA build). Every (package, case) runs in a fresh process, so that each peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) belongs to one side and one case only.

A training step is forward + backward + AdamW step. Tokens/s is the number of tokens the user
gives (text ids + latent tokens, see `workload.py`) over the median step time of `--steps`
steps after `--warmup` steps. MFU is our model FLOP/s (6 x per-token parameters x packed
tokens + attention over the useful, causal-halved sum of squared sample lengths) over the
measured fp32 matmul rate of the same threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_VENV = ROOT / '.venv-reference'
REFERENCE_PINS = ('torch==2.13.0', 'transfusion-pytorch==0.20.0')
RESULT = 'RESULT '


# the worker: one package, one case, one process

def per_token_flops(model, packed) -> tuple[float, float]:
    """(matmul FLOPs of one training step, of which attention), for our model on a packed batch:
    6 x the parameters each packed token multiplies by (the adaLN modulations run once per span
    and are left out) + the token-dependent head and latent projections + attention, whose
    useful work is 2 x 2 x sum(L_d^2) / 2 x heads x dim_head per layer forward (causal half),
    times 3 for forward + backward."""
    import torch
    transformer, config = model.transformer, model.config.transformer
    per_token = 0
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and 'to_modulation' not in name and 'to_time_embed' not in name:
            per_token += module.weight.numel()
    num_tokens = packed.num_tokens
    text_targets = int((packed.text_target >= 0).sum())
    latent_tokens = sum(int(index.numel()) for index in packed.latent_index)
    dim_latent = model.config.dim_latent[0]
    flops = 6 * per_token * num_tokens + 6 * model.to_logits.weight.numel() * text_targets
    flops += 6 * 2 * config.dim * dim_latent * latent_tokens
    squares = float((packed.seq_lengths.double() ** 2).sum())
    attention = 3 * 2 * squares * config.heads * config.dim_head * config.depth
    return flops + attention, attention


def worker(args) -> dict:
    import torch
    import workload
    from transfusion_pytorch import Transfusion

    torch.set_num_threads(args.threads)
    case = workload.CASES[args.case]
    batch = workload.make_batch(case, seed = args.seed)
    text, modality = workload.count_tokens(batch)

    torch.manual_seed(args.seed)
    model = Transfusion(**workload.model_kwargs(case))
    # the same optimizer on both sides: torch's fused AdamW kernel (CPU and CUDA), one pass per parameter
    optimizer = torch.optim.AdamW(model.parameters(), lr = 1e-4, fused = args.optimizer == 'fused', foreach = args.optimizer == 'foreach')

    autocast = torch.autocast('cpu', dtype = torch.bfloat16, enabled = args.bf16)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with autocast:
            loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none = True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())

    result = dict(
        case = case.name, bf16 = args.bf16, fingerprint = workload.fingerprint(batch),
        text_tokens = text, modality_tokens = modality, tokens = text + modality,
        step_s = statistics.median(times[args.warmup:]), all_step_s = times, losses = losses,
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        params = sum(p.numel() for p in model.parameters()),
        package = str(Path(sys.modules['transfusion_pytorch'].__file__).parent),
    )
    if args.side == 'ours':
        packed = model.pack(batch)
        result['flops'], result['attention_flops'] = per_token_flops(model, packed)
        result['packed_tokens'] = packed.num_tokens
    return result


def matmul_rate(args) -> dict:
    """Best-of matmul FLOP/s, fp32 and bf16, at the benchmark's thread count."""
    import torch
    torch.set_num_threads(args.threads)
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        n = 2048
        a, b = torch.randn(n, n, dtype = dtype), torch.randn(n, n, dtype = dtype)
        for _ in range(3):
            a @ b
        best = float('inf')
        for _ in range(10):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        rates[str(dtype).removeprefix('torch.')] = 2 * n ** 3 / best
    return rates


# the driver

def reference_python() -> Path:
    python = REFERENCE_VENV / 'bin' / 'python'
    # -I: isolated, so that this repository's own egg-info in the working directory is not found
    check = [str(python), '-I', '-c', 'import importlib.metadata as m; print(m.version("transfusion-pytorch"), m.version("torch"))']

    def installed() -> bool:
        found = subprocess.run(check, capture_output = True, text = True).stdout.split() if python.exists() else []
        return len(found) == 2 and found[0] == '0.20.0' and found[1].startswith('2.13.0')

    if not installed():
        print(f'creating {REFERENCE_VENV} with {" ".join(REFERENCE_PINS)}', file = sys.stderr)
        subprocess.run([sys.executable, '-m', 'venv', str(REFERENCE_VENV)], check = True)
        subprocess.run([str(REFERENCE_VENV / 'bin' / 'pip'), 'install', *REFERENCE_PINS], check = True, stdout = sys.stderr)
        if not installed():
            raise RuntimeError(f'{REFERENCE_VENV} does not hold {" and ".join(REFERENCE_PINS)}')
    return python


def run_worker(python: Path | str, side: str, case: str, args, bf16: bool = False, mode: str = 'worker') -> dict:
    command = [
        str(python), str(Path(__file__).resolve()), f'--{mode}', '--side', side, '--case', case,
        '--steps', str(args.steps), '--warmup', str(args.warmup), '--threads', str(args.threads), '--seed', str(args.seed),
        '--optimizer', args.optimizer,
    ] + (['--bf16'] if bf16 else [])
    env = dict(os.environ, OMP_NUM_THREADS = str(args.threads), PYTHONPATH = '')
    # from a neutral directory, so that neither side imports the other's package by accident
    done = subprocess.run(command, capture_output = True, text = True, env = env, cwd = Path(__file__).parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f'{side} / {case} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}')
    return json.loads(lines[-1][len(RESULT):])


def fmt_rate(tokens_per_s: float | None) -> str:
    return '-' if tokens_per_s is None else f'{tokens_per_s:,.0f}'


def driver(args):
    import workload
    names = args.cases or list(workload.CASES)
    reference = None if args.no_reference else reference_python()

    load = os.getloadavg()
    peak = run_worker(sys.executable, 'ours', names[0], args, mode = 'matmul')
    results = {}
    for name in names:
        ours = run_worker(sys.executable, 'ours', name, args)
        with_reference = reference is not None and (args.reference_cases is None or name in args.reference_cases)
        theirs = run_worker(reference, 'reference', name, args) if with_reference else None
        if theirs is not None and theirs['fingerprint'] != ours['fingerprint']:
            raise RuntimeError(f'{name}: the two sides saw different batches')
        results[name] = (ours, theirs)
        print(f'  done {name}: ours {ours["step_s"]:.2f} s/step' + ('' if theirs is None else f', reference {theirs["step_s"]:.2f} s/step'), file = sys.stderr)

    bf16 = {name: run_worker(sys.executable, 'ours', name, args, bf16 = True) for name in args.bf16_cases if name in names}
    load_after = os.getloadavg()

    print(f'\ntorch {__import__("torch").__version__}, {args.threads} threads, fp32 unless marked, median of {args.steps} steps after {args.warmup} warm-up; '
          f'load average {load[0]:.2f} before, {load_after[0]:.2f} after')
    print(f'matmul peak (2048^3, best of 10): fp32 {peak["float32"] / 1e9:.0f} GFLOP/s, bf16 {peak["bfloat16"] / 1e9:.0f} GFLOP/s')
    print('tokens = text ids + latent tokens as given by the user (structural tokens not counted)\n')

    header = '| case | tokens (text + latent) | ours tok/s | reference tok/s | speed-up | ours peak RSS | reference peak RSS | RSS ratio | ours MFU (fp32) |'
    print(header)
    print('|' + '---|' * header.count(' | ') + '---|')
    for name, (ours, theirs) in results.items():
        rate = ours['tokens'] / ours['step_s']
        their_rate = None if theirs is None else theirs['tokens'] / theirs['step_s']
        mfu = ours['flops'] / ours['step_s'] / peak['float32']
        print(
            f'| {name} | {ours["tokens"]:,} ({ours["text_tokens"]:,} + {ours["modality_tokens"]:,}) | {fmt_rate(rate)} | {fmt_rate(their_rate)} | '
            + ('-' if theirs is None else f'{rate / their_rate:.1f}x') + f' | {ours["peak_rss_mb"]:,.0f} MB | '
            + ('-' if theirs is None else f'{theirs["peak_rss_mb"]:,.0f} MB | {theirs["peak_rss_mb"] / ours["peak_rss_mb"]:.1f}x') + ('' if theirs is not None else ' - ')
            + f' | {100 * mfu:.1f}% |'
        )

    for name, run in bf16.items():
        fp32 = results[name][0]
        rate, fp32_rate = run['tokens'] / run['step_s'], fp32['tokens'] / fp32['step_s']
        mfu = run['flops'] / run['step_s'] / peak['bfloat16']
        first = abs(run['losses'][0] - fp32['losses'][0])
        print(f'\nbf16 autocast, {name}: {fmt_rate(rate)} tok/s ({rate / fp32_rate:.2f}x fp32), MFU {100 * mfu:.1f}% of the bf16 matmul peak, '
              f'peak RSS {run["peak_rss_mb"]:,.0f} MB; first-step loss {run["losses"][0]:.4f} vs fp32 {fp32["losses"][0]:.4f} '
              f'(|diff| {first:.4f}), last-step loss {run["losses"][-1]:.4f} vs {fp32["losses"][-1]:.4f}')

    print_targets(results)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(peak = peak, results = results, bf16 = bf16, load = [load, load_after]), indent = 1))


def print_targets(results):
    def rate(name, side = 0):
        run = results.get(name, (None, None))[side]
        return None if run is None else run['tokens'] / run['step_s']

    checks = []
    if rate('multimodal') and rate('multimodal', 1):
        ratio = rate('multimodal') / rate('multimodal', 1)
        checks.append((ratio >= 3, f'multimodal >= 3x the reference: {ratio:.2f}x'))
        rss = results['multimodal'][1]['peak_rss_mb'] / results['multimodal'][0]['peak_rss_mb']
        checks.append((rss >= 3, f'multimodal peak RSS <= 1/3 of the reference: 1/{rss:.2f}'))
    if rate('multimodal') and rate('text-same-count'):
        ratio = rate('text-same-count') / rate('multimodal')
        checks.append((ratio <= 1.3, f'multimodal within 1.3x of text-only at the same count: text / multimodal = {ratio:.2f}x'))
    if rate('short-32') and rate('long-2'):
        ratio = rate('short-32') / rate('long-2')
        checks.append((ratio >= 1, f'32 short samples at least as fast as 2 long: {ratio:.2f}x'))
    if checks:
        print('\ntargets:')
        for met, line in checks:
            print(f'  [{"met" if met else "NOT met"}] {line}')


def main():
    parser = argparse.ArgumentParser(description = __doc__.split('\n\n')[0])
    parser.add_argument('--cases', nargs = '*', help = 'subset of workload.CASES (default: all)')
    parser.add_argument('--steps', type = int, default = 5)
    parser.add_argument('--warmup', type = int, default = 2)
    parser.add_argument('--threads', type = int, default = 2)
    parser.add_argument('--seed', type = int, default = 0)
    parser.add_argument('--no-reference', action = 'store_true', help = 'measure this package only')
    parser.add_argument('--reference-cases', nargs = '*', help = 'cases where the reference runs too (default: all)')
    parser.add_argument('--bf16-cases', nargs = '*', default = ['multimodal'], help = 'cases also run under bf16 autocast (ours)')
    parser.add_argument('--optimizer', choices = ('fused', 'foreach', 'for-loop'), default = 'fused', help = 'AdamW implementation, the same for both sides')
    parser.add_argument('--json', help = 'also write the raw results here')
    # internal: one measurement in this process
    parser.add_argument('--worker', action = 'store_true', help = argparse.SUPPRESS)
    parser.add_argument('--matmul', action = 'store_true', help = argparse.SUPPRESS)
    parser.add_argument('--side', default = 'ours', help = argparse.SUPPRESS)
    parser.add_argument('--case', help = argparse.SUPPRESS)
    parser.add_argument('--bf16', action = 'store_true', help = argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker or args.matmul:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        print(RESULT + json.dumps(worker(args) if args.worker else matmul_rate(args)), flush = True)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        driver(args)


if __name__ == '__main__':
    main()
