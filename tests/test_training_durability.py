"""A run killed with SIGKILL while writing a checkpoint leaves the previous one loadable and
the run resumable."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transfusion_pytorch.training.checkpoint import list_checkpoints, verify

from conftest import random_sample, tiny_model
from test_training_data import ListDataset

TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures('one_thread')     # tiny models: one thread is fastest (conftest)

# a training run whose second checkpoint (step 4) stops half way through its manifest: the
# state and trainer files are on disk, the manifest is torn, and the process waits to be killed
CHILD = r'''
import sys, time
sys.path.insert(0, sys.argv[2])
import torch
from transfusion_pytorch.training import checkpoint
from test_training_durability import make_trainer

original = checkpoint.write_manifest

def torn_write_manifest(directory):
    if directory.name.endswith('00000004'):
        with open(directory / checkpoint.MANIFEST, 'w') as file:
            file.write('{"state/.metadata": {"bytes": 1')      # half a manifest
        print('WRITING', flush = True)
        time.sleep(600)
    original(directory)

checkpoint.write_manifest = torn_write_manifest
torch.set_num_threads(1)
make_trainer(sys.argv[1]).train()
'''


def make_trainer(out_dir, max_steps = 6):
    from transfusion_pytorch.training import TrainConfig, Trainer
    torch.manual_seed(0)
    rng = random.Random(0)
    data = ListDataset([random_sample(rng) for _ in range(16)])
    torch.manual_seed(0)
    config = TrainConfig(out_dir = str(out_dir), max_steps = max_steps, max_tokens = 60, lr = 1e-3, checkpoint_every = 2,
                         keep_last = 3, log_every = 1, progress = False, ema_beta = 0.9)
    return Trainer(tiny_model(), data, config)


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_and_resumes(tmp_path):
    child = subprocess.Popen([sys.executable, '-c', CHILD, str(tmp_path), str(TESTS)],
                             stdout = subprocess.PIPE, stderr = subprocess.PIPE, text = True)
    try:
        deadline = time.monotonic() + 300
        line = ''
        while 'WRITING' not in line:
            line = child.stdout.readline()
            assert line or child.poll() is None, child.stderr.read()
            assert time.monotonic() < deadline, 'the child never reached the checkpoint write'
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout = 60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
        child.stderr.close()

    root = tmp_path / 'checkpoints'
    assert [p.name for p in list_checkpoints(root)] == ['step_00000002']      # the torn one never got its final name
    assert (root / '.tmp_step_00000004' / 'manifest.json').exists()
    verify(root / 'step_00000002')

    # resuming: from step 2, through a fresh write of step 4, to the end
    trainer = make_trainer(tmp_path)
    history = trainer.train()
    assert min(entry['step'] for entry in history) == 3 and trainer.step == 6
    assert [p.name for p in list_checkpoints(root)] == ['step_00000002', 'step_00000004', 'step_00000006']
    for directory in list_checkpoints(root):
        verify(directory)
    assert not (root / '.tmp_step_00000004').exists()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    # and the resumed run matches one that was never interrupted
    uninterrupted = make_trainer(tmp_path / 'uninterrupted')
    uninterrupted.train()
    for name, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name
