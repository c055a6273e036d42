"""Two gloo processes on CPU, started by torchrun, against one process over the same global batch.

Rank r takes global batches r, r + 2, ...; one process with 2-step accumulation takes them all in
the same order, and each batch's noise is seeded by its position, so the two runs compute the
same gradients up to float32 summation order (the all-reduce averages where accumulation sums
halves). Tolerance: 1e-5 absolute and relative on parameters after 3 AdamW steps at lr 1e-3.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).parent / 'distributed_run.py'


def run(tmp_path: Path, name: str, strategy: str, nproc: int, grad_accum: int) -> dict:
    out = tmp_path / f'{name}.pt'
    env = dict(os.environ, OMP_NUM_THREADS = '1')
    if nproc == 1:
        command = [sys.executable, str(RUN), str(out), strategy, str(grad_accum)]
    else:
        command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--standalone',
                   str(RUN), str(out), strategy, str(grad_accum)]
    result = subprocess.run(command, env = env, capture_output = True, text = True, timeout = 240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out, weights_only = False)


@pytest.fixture(scope = 'module')
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp('single'), 'single', 'ddp', nproc = 1, grad_accum = 2)


@pytest.mark.parametrize('strategy', ['ddp', 'fsdp'])
def test_two_processes_match_one_over_the_same_global_batch(single, strategy, tmp_path):
    double = run(tmp_path, strategy, strategy, nproc = 2, grad_accum = 1)

    torch.testing.assert_close(torch.tensor(double['losses']), torch.tensor(single['losses']), atol = 1e-5, rtol = 1e-5)
    for part in ('model', 'ema'):
        assert double[part].keys() == single[part].keys()
        for name, value in single[part].items():
            torch.testing.assert_close(double[part][name], value, atol = 1e-5, rtol = 1e-5, msg = lambda m: f'{part}.{name}: {m}')

    # and training did move the parameters
    moved = [name for name, value in double['model'].items() if not torch.equal(value, double['initial'][name])]
    assert len(moved) > len(double['model']) // 2
