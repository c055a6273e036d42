"""Training: trainer, data, checkpoints, distributed setup and parallelization, each its own file.

    trainer.py      Trainer, TrainConfig, the train step and loop
    nonfinite.py    the non-finite guard: bad steps held back on the device, reported when the host reads the flags
    data.py         the dataset protocol and the token-budget loader
    checkpoint.py   atomic, verified training checkpoints (DCP), exact resume
    distributed.py  process-group setup for torchrun (nccl / gloo)
    parallelize.py  DDP or FSDP2, applied from outside the model
    __main__.py     `python -m transfusion_pytorch.training`: a small working run on toy data
"""

from .checkpoint import CheckpointError, CheckpointMismatch, CorruptCheckpoint
from .data import SampleDataset, TokenBudgetLoader, packed_num_tokens
from .trainer import Every, TrainConfig, Trainer


def train(model, dataset, config: TrainConfig, **kwargs) -> list[dict]:
    """Trains `model` on `dataset` (resuming from `config.out_dir` if it holds checkpoints);
    returns the logged metrics. Works alone and under torchrun."""
    return Trainer(model, dataset, config, **kwargs).train()


__all__ = ['Trainer', 'TrainConfig', 'Every', 'train', 'TokenBudgetLoader', 'SampleDataset', 'packed_num_tokens', 'CheckpointError', 'CheckpointMismatch',
           'CorruptCheckpoint']
