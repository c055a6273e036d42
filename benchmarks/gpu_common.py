"""What the sections of `benchmarks/gpu.py` share: timing on a device, peak memory, and the
plumbing of a measurement that runs in its own process (so that its peak memory belongs to it
alone) and hands back one JSON line."""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(__file__).resolve().parent
RESULT = 'RESULT '


def sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device):
    """Before a measurement: the previous one's model freed (a reference cycle would keep it,
    and count it in this one's peak), then the peak reset."""
    if device.type == 'cuda':
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """The peak allocated on CUDA; on CPU the process's peak RSS (which includes the interpreter
    and torch itself)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """(median seconds, every timed call) of `fn()` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def gib(value: float | None) -> str:
    return '-' if value is None or math.isnan(value) else f'{value:.1f} GiB'


def worker_main(run):
    """The entry point of a worker script: `script.py --worker JSON-SPEC` prints the result of
    `run(spec)` on one line that starts with RESULT."""
    spec = json.loads(sys.argv[sys.argv.index('--worker') + 1])
    print(RESULT + json.dumps(run(spec)), flush = True)


def run_worker(script: Path, spec: dict, *, python: str = sys.executable, pythonpath: str = str(ROOT),
               timeout: float = 600) -> dict:
    """Runs `script --worker spec` in a fresh process with `pythonpath` alone on PYTHONPATH,
    from a neutral folder (so that a package installed elsewhere is not shadowed by this
    repository); returns its result, or raises with the end of its output."""
    env = dict(os.environ, PYTHONPATH = pythonpath, PYTHONUNBUFFERED = '1')
    done = subprocess.run([python, str(Path(script).resolve()), '--worker', json.dumps(spec)], capture_output = True, text = True, env = env,
                          cwd = tempfile.gettempdir(), timeout = timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f'{script.name} {spec.get("side", "")} failed (exit status {done.returncode}):\n'
                           f'{done.stdout[-2000:]}\n{done.stderr[-3000:]}')
    return json.loads(lines[-1][len(RESULT):])
