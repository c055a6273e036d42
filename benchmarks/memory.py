"""Activation checkpointing on the first model of docs/usage.md: peak memory and step time with
'selective' (every other block) and 'full' (every block) against none.

    python benchmarks/memory.py                             # the multimodal case, fp32, 2 threads
    python benchmarks/memory.py --cases multimodal long-2 --bf16 --rounds 3

Each (case, mode) trains in a fresh process, so that its peak belongs to it alone. A step is
forward + backward + AdamW (fused), as in `train.py`, on the model and batch of `workload.py`.
Reported for each mode:

- peak memory: on CPU the process's peak RSS (`ru_maxrss`), which holds the interpreter and
  libraries, weights, gradients, AdamW state and the activations; on CUDA
  `torch.cuda.max_memory_allocated`;
- gradients and activations: the peak minus the same process's memory before the first
  forward pass, with the weights and the AdamW state made (the part checkpointing changes);
- step time: the median of `--steps` steps after `--warmup` (the best of `--rounds` rounds, the
  modes taking turns), wall-clock and in CPU time of the process (all its threads); the cost
  over no checkpointing is taken from the CPU time, which other jobs on a shared machine
  disturb far less than the wall clock.
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

RESULT = 'RESULT '
MODES = ('none', 'selective', 'full')


def peak_bytes(device) -> int:
    import torch
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args) -> dict:
    import torch
    import workload
    from transfusion_pytorch import Transfusion
    from transfusion_pytorch.training.parallelize import apply_activation_checkpointing

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    case = workload.CASES[args.case]
    batch = workload.make_batch(case, seed = args.seed)
    torch.manual_seed(args.seed)
    model = Transfusion(**workload.model_kwargs(case)).to(device)
    apply_activation_checkpointing(model, None if args.mode == 'none' else args.mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr = 1e-4, fused = True)
    autocast = torch.autocast(device.type, dtype = torch.bfloat16, enabled = args.bf16)

    def step():
        with autocast:
            loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none = True)
        return loss.item()

    # the AdamW state made first (one step on zero gradients), so that what grows from here is
    # the step's gradients and activations
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none = True)
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = current_rss()
    times, cpu_times, losses = [], [], []
    for _ in range(args.warmup + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step())
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = peak_bytes(device)
    return dict(case = case.name, mode = args.mode, bf16 = args.bf16, step_s = statistics.median(times[args.warmup:]),
                cpu_s = statistics.median(cpu_times[args.warmup:]), peak_mb = peak / 2 ** 20,
                activations_mb = (peak - before) / 2 ** 20, losses = losses)


def current_rss() -> int:
    """The process's resident memory now, in bytes (Linux)."""
    with open('/proc/self/statm') as file:
        return int(file.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def run_worker(case: str, mode: str, args) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), '--worker', '--case', case, '--mode', mode, '--device', args.device,
               '--steps', str(args.steps), '--warmup', str(args.warmup), '--threads', str(args.threads), '--seed', str(args.seed)]
    command += ['--bf16'] if args.bf16 else []
    env = dict(os.environ, OMP_NUM_THREADS = str(args.threads))
    done = subprocess.run(command, capture_output = True, text = True, env = env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f'{case} / {mode} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}')
    return json.loads(lines[-1][len(RESULT):])


def driver(args):
    import torch
    load = os.getloadavg()
    runs = {}
    for round in range(args.rounds):
        for case in args.cases:
            for mode in args.modes:
                run = run_worker(case, mode, args)
                runs.setdefault((case, mode), []).append(run)
                print(f'  round {round + 1}, {case} / {mode}: {run["step_s"]:.2f} s/step, peak {run["peak_mb"]:,.0f} MB', file = sys.stderr)
    # the fastest round of each: the modes take turns, so that a busy spell of the machine slows
    # one round of every mode rather than all rounds of one
    rows = [min(runs[key], key = lambda run: run['cpu_s']) for key in runs]
    load_after = os.getloadavg()

    memory = 'peak RSS' if args.device == 'cpu' else 'peak allocated'
    print(f'\ntorch {torch.__version__}, {args.device}, {args.threads} threads, {"bf16 autocast" if args.bf16 else "fp32"}, '
          f'median of {args.steps} steps after {args.warmup} warm-up, best of {args.rounds} rounds; '
          f'load average {load[0]:.2f} before, {load_after[0]:.2f} after\n')
    print(f'| case | checkpointing | {memory} | gradients + activations (peak - before) | step time | CPU time per step | vs none |')
    print('|---|---|---|---|---|---|---|')
    for row in rows:
        base = next(r for r in rows if r['case'] == row['case'] and r['mode'] == 'none') if 'none' in args.modes else None
        relative = '-' if base is None else f'{row["cpu_s"] / base["cpu_s"]:.2f}x'
        saved = '' if base is None or row is base else f' ({row["activations_mb"] / base["activations_mb"]:.0%} of none)'
        print(f'| {row["case"]} | {row["mode"]} | {row["peak_mb"]:,.0f} MB | {row["activations_mb"]:,.0f} MB{saved} | '
              f'{row["step_s"]:.2f} s | {row["cpu_s"]:.2f} s | {relative} |')
    for row in rows:
        base = next((r for r in rows if r['case'] == row['case'] and r['mode'] == 'none'), None)
        if base is not None and row is not base and row['losses'] != base['losses']:
            print(f'note: {row["case"]} / {row["mode"]}: losses differ from none: {row["losses"]} vs {base["losses"]}')
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows = rows, load = [load, load_after]), indent = 1))


def main():
    parser = argparse.ArgumentParser(description = __doc__.split('\n\n')[0])
    parser.add_argument('--cases', nargs = '*', default = ['multimodal'], help = 'cases of workload.CASES')
    parser.add_argument('--modes', nargs = '*', default = list(MODES), choices = MODES)
    parser.add_argument('--steps', type = int, default = 3)
    parser.add_argument('--warmup', type = int, default = 1)
    parser.add_argument('--rounds', type = int, default = 1, help = 'run every mode this many times, in turn, and keep the fastest')
    parser.add_argument('--threads', type = int, default = 2)
    parser.add_argument('--seed', type = int, default = 0)
    parser.add_argument('--device', default = 'cpu')
    parser.add_argument('--bf16', action = 'store_true', help = 'bf16 autocast')
    parser.add_argument('--json', help = 'also write the raw results here')
    parser.add_argument('--worker', action = 'store_true', help = argparse.SUPPRESS)
    parser.add_argument('--case', help = argparse.SUPPRESS)
    parser.add_argument('--mode', help = argparse.SUPPRESS)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.worker:
        print(RESULT + json.dumps(worker(args)), flush = True)
    else:
        driver(args)


if __name__ == '__main__':
    main()
