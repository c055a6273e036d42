"""TrainConfig checks its values on construction, before a run writes anything (the optimizer
and the EMA would reject some of them only once the trainer is built)."""

import pytest

from transfusion_pytorch.training import TrainConfig


@pytest.mark.parametrize('key, value, message', [
    ('lr', -1e-3, 'lr must be a finite number >= 0, got -0.001'),
    ('lr', float('nan'), 'lr must be a finite number >= 0, got nan'),
    ('weight_decay', -0.1, 'weight_decay must be a finite number >= 0'),
    ('betas', (0.9, 1.0), r'betas must be two numbers in \[0, 1\)'),
    ('warmup_steps', -1, 'warmup_steps must be >= 0'),
    ('min_lr_ratio', 1.5, r'min_lr_ratio must lie in \[0, 1\]'),
    ('grad_clip', 0., 'grad_clip must be positive or None'),
    ('ema_beta', 1.0, r'ema_beta must lie in \[0, 1\) or be None, got 1.0'),
    ('max_steps', 0, 'max_steps must be positive'),
    ('strategy', 'zero3', r"strategy must be one of \('ddp', 'fsdp'\), got 'zero3'"),
    ('activation_checkpointing', 'some', r"activation_checkpointing must be one of \(None, 'selective', 'full'\), got 'some'"),
    ('compile_backend', '', "compile_backend must name a torch.compile backend, got ''"),
])
def test_train_config_rejects_bad_values(key, value, message):
    options = dict(out_dir = 'unused', max_steps = 10, max_tokens = 64)
    with pytest.raises(ValueError, match = message):
        TrainConfig(**{**options, key: value})


def test_train_config_accepts_the_edges():
    TrainConfig(out_dir = 'unused', max_steps = 10, max_tokens = 64, lr = 0., weight_decay = 0., ema_beta = None, grad_clip = None,
                warmup_steps = 0, min_lr_ratio = 1.)
