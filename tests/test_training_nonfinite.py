"""Bad numbers in training: a non-finite loss or gradient is reported with its step and samples,
then stops the run (last good checkpoint intact) or skips the step; a checkpoint with
non-finite weights is never written."""

import re

import pytest
import torch

from transfusion_pytorch.training import Every, TrainConfig, Trainer
from transfusion_pytorch.training.checkpoint import list_checkpoints, verify
from transfusion_pytorch.training.trainer import NonFiniteError

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, tiny_model


pytestmark = pytest.mark.usefixtures('one_thread')     # tiny models: one thread is fastest (conftest)


class PoisonableDataset:
    """Samples of text and one modality; while `poisoned`, the modalities are scaled by 1e30:
    finite inputs whose flow loss overflows to inf."""

    def __init__(self, size = 12):
        generator = torch.Generator().manual_seed(0)
        self.samples = [
            [torch.randint(0, NUM_TEXT_TOKENS, (3,), generator = generator), (0, torch.randn(2, DIM_LATENTS[0], generator = generator))]
            for _ in range(size)
        ]
        self.poisoned = False

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        text, (m, latent) = self.samples[index]
        return [text, (m, latent * 1e30 if self.poisoned else latent)]


def set_flag(holder, name, steps: dict):
    """A callback that sets `holder.name` to `steps[step]` after the steps named in `steps`."""
    def fn(trainer, step):
        if step in steps:
            setattr(holder, name, steps[step])
    return Every(1, fn)


def make_trainer(out_dir, data, callbacks = (), **overrides):
    torch.manual_seed(0)
    options = dict(out_dir = str(out_dir), max_steps = 5, max_tokens = 40, lr = 1e-3, checkpoint_every = 1,
                   keep_last = 10, log_every = 1, progress = False, ema_beta = 0.9)
    options.update(overrides)
    return Trainer(tiny_model(), data, TrainConfig(**options), callbacks = list(callbacks))


def batch_indices_of_last_step(trainer):
    loader = trainer.loader
    return set(loader.local_batches(loader.epoch)[loader.position - 1])


def test_nonfinite_loss_stops_naming_the_step_and_samples(tmp_path):
    data = PoisonableDataset()
    trainer = make_trainer(tmp_path, data, callbacks = [set_flag(data, 'poisoned', {2: True})])
    with pytest.raises(NonFiniteError) as info:
        trainer.train()

    message = str(info.value)
    assert 'non-finite loss at step 3' in message, message
    reported = {int(i) for i in re.findall(r'sample (\d+) \(text loss', message)}
    assert reported == batch_indices_of_last_step(trainer), message

    # the weights were not updated, and the checkpoint of step 2 is intact and resumable
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    checkpoints = list_checkpoints(tmp_path / 'checkpoints')
    assert checkpoints[-1].name == 'step_00000002'
    verify(checkpoints[-1])

    data.poisoned = False
    resumed = make_trainer(tmp_path, data)
    history = resumed.train()
    assert min(entry['step'] for entry in history) == 3 and resumed.step == 5


def test_nonfinite_gradient_stops(tmp_path):
    data = PoisonableDataset()
    poison = type('Flag', (), {'on': False})()
    trainer = make_trainer(tmp_path, data, callbacks = [set_flag(poison, 'on', {1: True})])
    trainer.model.to_logits.weight.register_hook(lambda grad: grad * float('nan') if poison.on else grad)

    with pytest.raises(NonFiniteError, match = r'non-finite gradient at step 2 .*no sample on this rank has a non-finite loss'):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / 'checkpoints')] == ['step_00000001']
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_skip_leaves_weights_optimizer_and_ema_as_they_were(tmp_path):
    data = PoisonableDataset()
    saved = {}

    def snapshot(trainer, step):
        if step == 2:
            saved['model'] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            saved['ema'] = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
            saved['exp_avg'] = [trainer.optimizer.state[p]['exp_avg'].clone() for p in trainer.trainable]
        if step == 3:
            for k, v in trainer.model.state_dict().items():
                assert torch.equal(v, saved['model'][k]), k
            for k, v in trainer.ema.state_dict().items():
                assert torch.equal(v, saved['ema'][k]), k
            for p, before in zip(trainer.trainable, saved['exp_avg']):
                assert torch.equal(trainer.optimizer.state[p]['exp_avg'], before)
            saved['checked'] = True

    callbacks = [set_flag(data, 'poisoned', {2: True, 3: False}), Every(1, snapshot)]
    trainer = make_trainer(tmp_path, data, callbacks = callbacks, on_nonfinite = 'skip')
    with pytest.warns(UserWarning, match = r'non-finite loss at step 3 .*sample \d+ .*Step skipped'):
        history = trainer.train()

    assert saved['checked']
    assert [entry['step'] for entry in history if entry.get('skipped')] == [3]
    assert trainer.step == 5
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    for checkpoint in list_checkpoints(tmp_path / 'checkpoints'):
        verify(checkpoint)


def test_no_checkpoint_with_nonfinite_weights(tmp_path):
    trainer = make_trainer(tmp_path, PoisonableDataset(), max_steps = 1)
    trainer.train()
    before = list(list_checkpoints(tmp_path / 'checkpoints'))

    with torch.no_grad():
        trainer.model.token_embed.weight[0, 0] = float('inf')
    with pytest.raises(NonFiniteError, match = r'model\.token_embed\.weight has non-finite values .* not writing the checkpoint'):
        trainer.save_checkpoint()
    with pytest.raises(NonFiniteError, match = 'not writing the pretrained model'):
        trainer.save_pretrained(tmp_path / 'pretrained_again')
    assert list(list_checkpoints(tmp_path / 'checkpoints')) == before
    assert not any(p.name.startswith('.tmp') for p in (tmp_path / 'checkpoints').iterdir())


def test_on_nonfinite_is_checked():
    with pytest.raises(ValueError, match = "on_nonfinite must be 'stop' or 'skip', got 'ignore'"):
        TrainConfig(out_dir = 'x', max_steps = 1, max_tokens = 10, on_nonfinite = 'ignore')


def snapshot_callback(saved: dict, at: int, compare: int):
    """Saves the model, EMA and AdamW moments after step `at` and asserts after step `compare`
    that they are the same."""
    def fn(trainer, step):
        state = lambda: ({k: v.clone() for k, v in trainer.model.state_dict().items()},
                         {k: v.clone() for k, v in trainer.ema.state_dict().items()},
                         [trainer.optimizer.state[p]['exp_avg'].clone() for p in trainer.trainable])
        if step == at:
            saved['state'] = state()
        if step == compare:
            for before, after in zip(saved['state'], state()):
                pairs = zip(before.values(), after.values()) if isinstance(before, dict) else zip(before, after)
                assert all(torch.equal(a, b) for a, b in pairs)
            saved['checked'] = True
    return Every(1, fn)


def test_deferred_check_stops_with_the_weights_before_the_bad_step(tmp_path):
    """The host reads the flag every 3 steps: step 2 is bad, step 3 is held back on the device
    too, and the run stops after step 3 with the weights of step 1."""
    data, saved = PoisonableDataset(), {}
    callbacks = [set_flag(data, 'poisoned', {1: True, 2: False}), snapshot_callback(saved, at = 1, compare = 2)]
    trainer = make_trainer(tmp_path, data, callbacks = callbacks, max_steps = 6, check_finite_every = 3, log_every = 100, checkpoint_every = 100)
    with pytest.raises(NonFiniteError, match = r'non-finite loss at step 2 .*step 2 and any after it were not applied, so the weights are those of step 1'):
        trainer.train()
    assert saved['checked'] and trainer.step == 3
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved['state'][0][name]), name
    assert list_checkpoints(tmp_path / 'checkpoints') == []


def test_deferred_check_skips_only_the_bad_step(tmp_path):
    data, saved = PoisonableDataset(), {}
    callbacks = [set_flag(data, 'poisoned', {1: True, 2: False}), snapshot_callback(saved, at = 1, compare = 2)]
    trainer = make_trainer(tmp_path, data, callbacks = callbacks, max_steps = 4, check_finite_every = 3, log_every = 100,
                           checkpoint_every = 100, on_nonfinite = 'skip')
    with pytest.warns(UserWarning, match = r'non-finite loss at step 2 .*Step skipped'):
        history = trainer.train()
    assert saved['checked']
    # reported at the check after step 3, where the run logs how many steps it skipped since the last one
    assert [(entry['step'], entry['skipped']) for entry in history if entry.get('skipped')] == [(3, 1)]
    assert trainer.ema.num_updates.item() == 3 and all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_check_finite_every_is_checked():
    with pytest.raises(ValueError, match = 'check_finite_every must be positive, got 0'):
        TrainConfig(out_dir = 'x', max_steps = 1, max_tokens = 10, check_finite_every = 0)
