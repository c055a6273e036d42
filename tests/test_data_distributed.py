"""Two gloo processes under torchrun: each sample read once per epoch across the processes and
their workers, and the image-text job trains on both (see data_distributed_run.py)."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip('PIL')          # the data extra

from transfusion_pytorch.cli import main
from transfusion_pytorch.data.shards import Shard

from data_helpers import prepared_set

RUN = Path(__file__).parent / 'data_distributed_run.py'


def test_two_processes_read_each_sample_once_per_epoch_and_train(tmp_path):
    prepared = prepared_set(tmp_path, num = 30)
    env = dict(os.environ, OMP_NUM_THREADS = '1', PYTHONPATH = os.pathsep.join([str(RUN.parents[1]), os.environ.get('PYTHONPATH', '')]))
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', str(RUN), str(prepared.folder), str(tmp_path / 'out')]
    result = subprocess.run(command, env = env, capture_output = True, text = True, timeout = 300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    everything = sorted(e['key'] for path in prepared.shard_paths() for e in Shard(path).samples)
    by_slot = {}
    for rank, batches in enumerate(json.loads((tmp_path / 'out' / 'read.json').read_text())):
        for batch in batches:
            by_slot.setdefault((rank, batch['slot']), []).extend(batch['keys'])
    assert sorted(by_slot) == [(0, 0), (1, 1)]                  # slot = rank x 1 worker + worker
    for epoch in range(2):
        read = by_slot[(0, 0)][15 * epoch:15 * (epoch + 1)] + by_slot[(1, 1)][15 * epoch:15 * (epoch + 1)]
        assert sorted(read) == everything

    run = tmp_path / 'out' / 'ddp'
    metrics = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [m['step'] for m in metrics if 'loss' in m] == [1, 2]
    assert (run / 'pretrained_ema' / 'model.safetensors').exists() and (run / 'samples' / 'step_000002.png').exists()



RESUME = Path(__file__).parent / 'resume_distributed_run.py'


def test_a_resumed_two_process_run_trains_each_rank_on_the_batches_of_the_uninterrupted_one(tmp_path, capsys):
    """Issue 25, item 1: killed after step 5 with its last checkpoint at step 3 and rerun, each
    rank trains steps 4 to 8 on the samples of the uninterrupted run, and the losses are the
    same; before, every rank resumed from rank 0's data position."""
    prepared = prepared_set(tmp_path, num = 30)
    env = dict(os.environ, OMP_NUM_THREADS = '1', PYTHONPATH = os.pathsep.join([str(RUN.parents[1]), os.environ.get('PYTHONPATH', '')]))
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--standalone', str(RESUME), str(prepared.folder), str(tmp_path)]
    result = subprocess.run(command, env = env, capture_output = True, text = True, timeout = 300)
    if result.returncode != 0 and 'SIGABRT' in result.stderr and (tmp_path / 'batches.json').exists():
        # once in about twenty runs a gloo process aborted while leaving the process group, after
        # every batch was recorded ('terminate called without an active exception'): a teardown
        # fault of its own, not of resuming; the whole run is made again from a clean folder
        warnings.warn('a process aborted while leaving the process group; running again')
        for name in ('full', 'crashed', 'batches.json'):
            path = tmp_path / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        result = subprocess.run(command, env = env, capture_output = True, text = True, timeout = 300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    batches = json.loads((tmp_path / 'batches.json').read_text())
    full, resumed = batches['full'], batches['crashed']
    steps = [str(step) for step in range(1, 9)]
    assert all(list(rank) == steps for rank in full + resumed)
    # the ranks had taken different numbers of samples by the checkpoint (so one's position is not the other's)
    assert len([k for step in steps[:3] for k in full[0][step]]) != len([k for step in steps[:3] for k in full[1][step]])
    for rank in range(2):
        for step in steps:
            assert resumed[rank][step] == full[rank][step], f'rank {rank}, step {step}'

    def losses(name):
        rows = [json.loads(line) for line in (tmp_path / name / 'metrics.jsonl').read_text().splitlines()]
        return [(row['step'], row['loss']) for row in rows if 'loss' in row]
    assert [step for step, _ in losses('crashed')] == list(range(1, 9))
    assert losses('crashed') == losses('full')

    # the same command in one process: refused in one line, as positions are not re-split
    keys = dict(data = prepared.folder, out_root = tmp_path, name = 'crashed', steps = 8, checkpoint_every = 3, dim = 32, depth = 1, heads = 2,
                dim_head = 16, max_tokens = 113, workers = 1, shuffle_buffer = 4, log_every = 1, sample_every = 1000, threads = 1, warmup_steps = 2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(['train', '--job', 'image_text', *[item for key, value in keys.items() for item in (f"--{key.replace('_', '-')}", str(value))]])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and err.startswith('transfusion: error: checkpoint ') and \
        err.endswith('step_00000008 was written by 2 processes and this run has 1: resume with 2 (each process resumes from its own data position)')
