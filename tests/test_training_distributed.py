"""Two gloo processes on CPU, started by torchrun, against one process over the same global batch.

Rank r takes global batches r, r + 2, ...; one process with 2-step accumulation takes them all in
the same order, and each batch's noise is seeded by its position, so the two runs compute the
same gradients up to float32 summation order (the all-reduce averages where accumulation sums
halves). Tolerance: 1e-5 absolute and relative on parameters after 3 AdamW steps at lr 1e-3.

The same holds with FSDP2, activation checkpointing and compiled blocks together (compiled with
the 'aot_eager' backend: dynamo, AOTAutograd and the checkpointed graphs as with Inductor,
without the minute of kernel generation; Inductor's numbers are checked in
`test_training_scale.py`). With bf16, FSDP2's mixed-precision policy gathers the weights in
bf16 for the forward pass: the losses agree with fp32 to 1e-2 relative.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).parent / 'distributed_run.py'


def run(tmp_path: Path, name: str, strategy: str, nproc: int, grad_accum: int, options: tuple[str, ...] = ()) -> dict:
    out = tmp_path / f'{name}.pt'
    env = dict(os.environ, OMP_NUM_THREADS = '1')
    arguments = [str(RUN), str(out), strategy, str(grad_accum), *options]
    if nproc == 1:
        command = [sys.executable, *arguments]
    else:
        command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--standalone', *arguments]
    result = subprocess.run(command, env = env, capture_output = True, text = True, timeout = 240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out, weights_only = False)


@pytest.fixture(scope = 'module')
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp('single'), 'single', 'ddp', nproc = 1, grad_accum = 2)


COMPILED = ('compile=True', 'compile_backend=aot_eager')


@pytest.mark.parametrize('strategy, options', [
    ('ddp', ()), ('fsdp', ()),
    ('fsdp', ('activation_checkpointing=full', *COMPILED)),
    ('ddp', ('activation_checkpointing=selective', *COMPILED)),
], ids = ['ddp', 'fsdp', 'fsdp-full-checkpointing-compiled', 'ddp-selective-checkpointing-compiled'])
def test_two_processes_match_one_over_the_same_global_batch(single, strategy, options, tmp_path):
    double = run(tmp_path, strategy, strategy, nproc = 2, grad_accum = 1, options = options)

    torch.testing.assert_close(torch.tensor(double['losses']), torch.tensor(single['losses']), atol = 1e-5, rtol = 1e-5)
    for part in ('model', 'ema'):
        assert double[part].keys() == single[part].keys()
        for name, value in single[part].items():
            torch.testing.assert_close(double[part][name], value, atol = 1e-5, rtol = 1e-5, msg = lambda m: f'{part}.{name}: {m}')

    # and training did move the parameters
    moved = [name for name, value in double['model'].items() if not torch.equal(value, double['initial'][name])]
    assert len(moved) > len(double['model']) // 2
    # the blocks were compiled (one graph per kind of block: the token count is padded to the budget) or not
    assert double['graphs'] == (0 if not options else 2 if 'activation_checkpointing=selective' in options else 1)


def test_fsdp_bf16_gathers_bf16_weights_and_keeps_fp32_shards(single, tmp_path):
    double = run(tmp_path, 'fsdp-bf16', 'fsdp', nproc = 2, grad_accum = 1, options = ('bf16=True',))
    assert double['forward_dtypes'] == {torch.bfloat16}
    assert single['forward_dtypes'] == {torch.float32}
    assert all(value.dtype == torch.float32 for value in double['model'].values() if value.is_floating_point())
    torch.testing.assert_close(torch.tensor(double['losses']), torch.tensor(single['losses']), rtol = 1e-2, atol = 0)


def test_fsdp_resumes_the_ema_of_a_frozen_model_from_weights_saved_once(tmp_path):
    """Issue 25, item 18 under FSDP2, where the EMA's frozen weights are shards of their own: the
    checkpoint holds them once (under the model), and a run from other initial weights resumes
    the EMA's from there, exactly."""
    env = dict(os.environ, OMP_NUM_THREADS = '1')
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone',
               str(Path(__file__).parent / 'fsdp_resume_run.py'), str(tmp_path / 'run'), str(tmp_path / 'result.pt')]
    result = subprocess.run(command, env = env, capture_output = True, text = True, timeout = 240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = torch.load(tmp_path / 'result.pt', weights_only = False)
    assert out['step'] == 3 and out['equal'] == dict(model = True, ema = True)
    assert len(out['shared']) > 10
    assert all(f'model.{name}' in out['keys'] and f'ema.module.{name}' not in out['keys'] for name in out['shared'])
