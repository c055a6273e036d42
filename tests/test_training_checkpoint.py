import os
import random

import pytest
import torch

from transfusion_pytorch import Transfusion
from transfusion_pytorch.training import CorruptCheckpoint, Every, TrainConfig, Trainer
from transfusion_pytorch.training.checkpoint import MANIFEST, list_checkpoints, verify, write_manifest

from conftest import random_sample, tiny_model
from test_training_data import ListDataset


pytestmark = pytest.mark.usefixtures('one_thread')     # tiny models: one thread is fastest (conftest)

class Interrupt(Exception):
    pass


def interrupt_at(step):
    def fn(trainer, at):
        raise Interrupt(at)
    return Every(step, fn)


def run(out_dir, callbacks = (), model_seed = 0, **overrides):
    torch.manual_seed(0)                                    # random_sample draws from torch's global RNG
    rng = random.Random(0)
    data = ListDataset([random_sample(rng) for _ in range(40)])
    torch.manual_seed(model_seed)
    model = tiny_model(transformer = dict(dim = 32, depth = 2, dim_head = 8, heads = 2, dropout = 0.1))
    options = dict(out_dir = str(out_dir), max_steps = 8, max_tokens = 80, grad_accum = 2, lr = 3e-3, warmup_steps = 2,
                   checkpoint_every = 3, keep_last = 2, log_every = 1, progress = False, ema_beta = 0.9)
    options.update(overrides)
    trainer = Trainer(model, data, TrainConfig(**options), callbacks = list(callbacks))
    return trainer, trainer.train()


def losses(history):
    return {entry['step']: entry['loss'] for entry in history}


def test_resume_after_a_crash_is_bitwise_exact(tmp_path):
    full_trainer, full = run(tmp_path / 'full')

    with pytest.raises(Interrupt):
        run(tmp_path / 'crashed', callbacks = [interrupt_at(4)])         # dies after step 4; last checkpoint at 3
    assert [p.name for p in list_checkpoints(tmp_path / 'crashed' / 'checkpoints')] == ['step_00000003']

    resumed_trainer, resumed = run(tmp_path / 'crashed', model_seed = 123)    # other initial weights: all restored
    assert min(losses(resumed)) == 4
    for step, loss in losses(resumed).items():
        assert loss == losses(full)[step], f'step {step}: {loss} != {losses(full)[step]}'

    for name, value in full_trainer.model.state_dict().items():
        assert torch.equal(value, resumed_trainer.model.state_dict()[name]), name
    for name, value in full_trainer.ema.state_dict().items():
        assert torch.equal(value, resumed_trainer.ema.state_dict()[name]), name

    # the final model loads without the trainer
    loaded = Transfusion.from_pretrained(tmp_path / 'crashed' / 'pretrained')
    assert torch.equal(loaded.to_logits.weight, resumed_trainer.model.to_logits.weight)


def test_keeps_the_last_n(tmp_path):
    run(tmp_path, max_steps = 7, checkpoint_every = 2, keep_last = 2)
    assert [p.name for p in list_checkpoints(tmp_path / 'checkpoints')] == ['step_00000006', 'step_00000007']


def test_a_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    run(tmp_path, max_steps = 6, checkpoint_every = 3)
    newest, previous = list_checkpoints(tmp_path / 'checkpoints')[::-1]
    shard = next((newest / 'state').glob('*.distcp'))
    shard.write_bytes(shard.read_bytes()[:-10])

    with pytest.raises(CorruptCheckpoint, match = r'\.distcp has \d+ bytes, the manifest says \d+ \(truncated\?\)'):
        verify(newest)

    with pytest.warns(UserWarning, match = 'falling back to the previous checkpoint'):
        trainer, history = run(tmp_path, max_steps = 6)
    assert min(losses(history)) == 4                           # resumed from step 3, not 6


def damage_trainer_state(directory):
    """trainer.pt written damaged: not a pickle, though the manifest agrees with it."""
    (directory / 'trainer.pt').write_bytes(b'PK\x03\x04 not a whole zip archive' * 10)
    (directory / MANIFEST).unlink()
    write_manifest(directory)


def test_an_unreadable_trainer_state_falls_back_to_the_previous_checkpoint(tmp_path):
    """Issue 25, item 8: a trainer.pt that torch.load cannot read is a damaged checkpoint, like
    any other file: the run resumes from the one before, and exactly."""
    _, full = run(tmp_path / 'full', max_steps = 6, checkpoint_every = 3)
    run(tmp_path / 'run', max_steps = 6, checkpoint_every = 3)
    newest = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1]
    damage_trainer_state(newest)
    verify(newest)                                              # the manifest agrees: only reading it tells

    with pytest.warns(UserWarning, match = r'step_00000006: trainer\.pt cannot be read \(.*\); falling back to the previous checkpoint'):
        trainer, resumed = run(tmp_path / 'run', max_steps = 6, checkpoint_every = 3, model_seed = 123)
    assert sorted(losses(resumed)) == [4, 5, 6]                  # from step 3, not 6
    assert all(losses(resumed)[step] == losses(full)[step] for step in (4, 5, 6))


def test_a_checkpoint_of_the_earlier_layout_resumes(tmp_path):
    """trainer.pt as written before every rank's data position was kept (`rng`: one per rank,
    `data`: rank 0's) still resumes a one-process run exactly."""
    _, full = run(tmp_path / 'full', max_steps = 6, checkpoint_every = 3)
    with pytest.raises(Interrupt):
        run(tmp_path / 'run', max_steps = 6, checkpoint_every = 3, callbacks = [interrupt_at(4)])
    checkpoint = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1]
    state = torch.load(checkpoint / 'trainer.pt', weights_only = False)
    (rank,) = state.pop('ranks')
    torch.save(dict(state, rng = [rank['rng']], data = rank['data']), checkpoint / 'trainer.pt')
    (checkpoint / MANIFEST).unlink()
    write_manifest(checkpoint)

    _, resumed = run(tmp_path / 'run', max_steps = 6, checkpoint_every = 3, model_seed = 123)
    assert sorted(losses(resumed)) == [4, 5, 6] and all(losses(resumed)[step] == losses(full)[step] for step in (4, 5, 6))


@pytest.mark.skipif(os.geteuid() == 0, reason = 'root reads a file whatever its permissions')
def test_a_trainer_state_without_read_permission_falls_back(tmp_path):
    run(tmp_path, max_steps = 6, checkpoint_every = 3)
    newest = list_checkpoints(tmp_path / 'checkpoints')[-1]
    (newest / 'trainer.pt').chmod(0)
    with pytest.raises(CorruptCheckpoint, match = r'trainer\.pt cannot be read \(Permission denied\)'):
        verify(newest)
    with pytest.warns(UserWarning, match = 'falling back to the previous checkpoint'):
        _, history = run(tmp_path, max_steps = 6)
    assert min(losses(history)) == 4


def test_an_unfinished_checkpoint_is_detected(tmp_path):
    run(tmp_path, max_steps = 3, checkpoint_every = 3)
    newest = list_checkpoints(tmp_path / 'checkpoints')[-1]
    (newest / 'manifest.json').unlink()
    with pytest.raises(CorruptCheckpoint, match = 'no manifest.json'):
        verify(newest)
    with pytest.raises(CorruptCheckpoint, match = r'no usable checkpoint in .*, all 1 are damaged \(.*no manifest\.json.*\): move them away'):
        run(tmp_path, max_steps = 3)


def read_metrics(out_dir):
    import json
    return [json.loads(line) for line in (out_dir / 'metrics.jsonl').read_text().splitlines()]


def test_a_resumed_run_drops_the_metrics_logged_after_its_checkpoint(tmp_path):
    _, full = run(tmp_path / 'full')

    with pytest.raises(Interrupt):
        run(tmp_path / 'crashed', callbacks = [interrupt_at(5)])         # steps 1-4 logged; last checkpoint at 3
    metrics = tmp_path / 'crashed' / 'metrics.jsonl'
    assert [row['step'] for row in read_metrics(tmp_path / 'crashed')] == [1, 2, 3, 4]
    with open(metrics, 'a') as file:
        file.write('{"step": 5, "loss": 0.')                            # and a row cut short by a kill mid-write

    run(tmp_path / 'crashed')
    rows = read_metrics(tmp_path / 'crashed')
    assert [row['step'] for row in rows] == list(range(1, 9))            # each step once: the lost run's step 4 is gone
    assert [row['loss'] for row in rows] == [row['loss'] for row in read_metrics(tmp_path / 'full')]
    assert not metrics.with_name('metrics.jsonl.tmp').exists()

    # a finished run rerun drops nothing
    run(tmp_path / 'crashed')
    assert [row['step'] for row in read_metrics(tmp_path / 'crashed')] == list(range(1, 9))
