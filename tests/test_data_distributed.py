"""Two gloo processes under torchrun: each sample read once per epoch across the processes and
their workers, and the image-text job trains on both (see data_distributed_run.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('PIL')          # the data extra

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

