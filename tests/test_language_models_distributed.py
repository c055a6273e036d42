"""FSDP2 over a frozen language model with trainable modality weights beside it: two gloo
processes on CPU against one process over the same global batches (as in
test_training_distributed.py). Frozen weights stay bit-identical, in the model and its EMA; the
others train alike."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_helpers import build_language_model

pytest.importorskip('transformers')
RUN = Path(__file__).parent / 'distributed_run.py'


def run(tmp_path: Path, folder: Path, strategy: str, nproc: int, grad_accum: int) -> dict:
    out = tmp_path / f'{strategy}_{nproc}.pt'
    env = dict(os.environ, OMP_NUM_THREADS = '1')
    arguments = [str(RUN), str(out), strategy, str(grad_accum), str(folder)]
    if nproc > 1:
        arguments = ['-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--standalone', *arguments]
    result = subprocess.run([sys.executable, *arguments], env = env, capture_output = True, text = True, timeout = 240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out, weights_only = False)


def test_fsdp_trains_modality_weights_beside_a_frozen_language_model(tmp_path):
    folder = tmp_path / 'lm'
    build_language_model('qwen3', folder)
    single = run(tmp_path, folder, 'ddp', nproc = 1, grad_accum = 2)
    double = run(tmp_path, folder, 'fsdp', nproc = 2, grad_accum = 1)

    torch.testing.assert_close(torch.tensor(double['losses']), torch.tensor(single['losses']), atol = 1e-5, rtol = 1e-5)
    assert double['model'].keys() == single['model'].keys()
    for name, value in single['model'].items():
        torch.testing.assert_close(double['model'][name], value, atol = 1e-5, rtol = 1e-5, msg = lambda m: f'{name}: {m}')
    assert len(double['frozen']) > 0
    for name in double['frozen']:
        assert torch.equal(double['model'][name], double['initial'][name]), name
    # the EMA (sharing the frozen weights in one process, sharding its own reference to them under FSDP) alike
    assert double['ema'].keys() == single['ema'].keys()
    for name, value in single['ema'].items():
        torch.testing.assert_close(double['ema'][name], value, atol = 1e-5, rtol = 1e-5, msg = lambda m: f'ema {name}: {m}')
    for name in double['frozen']:
        assert torch.equal(double['ema'][f'module.{name}'], double['initial'][name]), name
    moved = [name for name, value in double['model'].items() if not torch.equal(value, double['initial'][name])]
    assert 'transformer.blocks.0.attn.modality_to_qkv.weight' in moved and 'token_embed.structural' in moved
