"""The non-finite guard: a step whose loss or gradient is not finite is not applied, and is
reported, without the host waiting for the device every step.

Before the optimizer step the losses and the gradient norm are checked on every rank, on the
device, and agreed by an all-reduce. The flag is not read there: the trainer hands it to the
fused AdamW kernel as `found_inf` (through which `torch.amp.GradScaler` skips a step) and to
the EMA, so the step changes no weight, moment or average, while the step counter, schedule
and data still advance. Rolling back instead would need a copy of the weights and the
optimizer state, or a restart from the last checkpoint; the masked step is exact.

The host reads the flags of the steps since its last read at once (`check`), which the trainer
does every `check_finite_every` steps and at every log and checkpoint step. A bad step is
then reported with its step, the micro-batch and the dataset indices of the samples whose own
loss (the breakdown's `per_sample_text` / `per_sample_flow`) is not finite; by `on_nonfinite`:

- 'skip': a warning; the bad steps were not applied, the others were;
- 'stop': `NonFiniteError`. The first bad step also holds back every later one until the
  read, so the run stops with the weights of the step before it, as if the host had read the
  flag at once, and no checkpoint (checkpoint steps are read steps) is written past it.

See docs/performance.md for why the step must not wait on the device.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from . import distributed
from .distributed import DistInfo


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or weight; the message says which step and samples."""


@dataclass
class StepRecord:
    """What the host needs to report a step's bad numbers once it reads its flags."""
    step: int
    loss: torch.Tensor                  # this rank's loss
    grad_norm: torch.Tensor
    bad: torch.Tensor                   # (2,) how many ranks had a non-finite loss, gradient norm
    per_sample: list[tuple]             # per micro-batch: (batch, per-sample text losses, flow losses)


class NonFiniteGuard:
    def __init__(self, on_nonfinite: str, dist: DistInfo):
        self.on_nonfinite, self.dist = on_nonfinite, dist
        self.unchecked: list[StepRecord] = []           # steps whose flags the host has not read yet
        self.halted = torch.zeros((), dtype = torch.bool, device = dist.device)     # 'stop': a bad step holds back the rest

    def flag(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, per_sample: list[tuple]) -> torch.Tensor:
        """A bool scalar on the device: whether to hold step `step` back, because its loss or
        gradient is not finite on some rank (or, with 'stop', an earlier step's was). Nothing
        here waits on the device."""
        norm = grad_norm.full_tensor() if hasattr(grad_norm, 'full_tensor') else grad_norm
        bad = torch.stack([~torch.isfinite(loss), ~torch.isfinite(norm.to(loss.device))]).float()
        bad = distributed.sum_across_ranks(bad.to(self.dist.device))
        self.unchecked.append(StepRecord(step, loss, norm, bad, per_sample))
        skip = bad.sum() > 0
        if self.on_nonfinite == 'stop':
            self.halted = self.halted | skip
            return self.halted
        return skip

    def check(self) -> list[int]:
        """Reads the flags of the steps since the last check (one wait on the device) and returns
        the steps that were skipped; with 'stop', raises NonFiniteError at the first bad one."""
        records, self.unchecked = self.unchecked, []
        if len(records) == 0:
            return []
        skipped = []
        for record, (bad_loss, bad_grad) in zip(records, torch.stack([r.bad for r in records]).tolist()):
            if bad_loss == 0 and bad_grad == 0:
                continue
            message = self.message(record, 'loss' if bad_loss > 0 else 'gradient')
            if self.on_nonfinite == 'stop':
                raise NonFiniteError(f'{message}. Stopped: step {record.step} and any after it were not applied, so the weights are '
                                     f'those of step {record.step - 1}, and checkpoints are untouched')
            warnings.warn(message + '. Step skipped (on_nonfinite = "skip")')
            skipped.append(record.step)
        return skipped

    def message(self, record: StepRecord, what: str) -> str:
        bad_samples = [f'micro-batch {micro}: {description}'
                       for micro, (batch, text, flow) in enumerate(record.per_sample) for description in nonfinite_samples(batch, text, flow)]
        rank = f'rank {self.dist.rank}: ' if self.dist.is_distributed else ''
        samples = '; '.join(bad_samples) if bad_samples else 'no sample on this rank has a non-finite loss of its own'
        return (f'non-finite {what} at step {record.step} (loss {record.loss.item()}, gradient norm {record.grad_norm.item()}); '
                f'{rank}{samples}')


def nonfinite_samples(batch, per_sample_text: torch.Tensor, per_sample_flow: torch.Tensor) -> list[str]:
    """'sample <dataset index> (text loss x, flow loss y)' for each sample of `batch` whose own
    loss is not finite. A sample without modalities has a NaN flow loss by definition; that one
    does not count."""
    descriptions = []
    for position, index in enumerate(batch.indices):
        text, flow = float(per_sample_text[position]), float(per_sample_flow[position])
        has_modality = math.isfinite(flow) or not is_text_only(batch.samples[position])
        if not math.isfinite(text) or (has_modality and not math.isfinite(flow)):
            descriptions.append(f'sample {index} (text loss {text}, flow loss {flow})')
    return descriptions


def is_text_only(sample) -> bool:
    if torch.is_tensor(sample):
        return not sample.is_floating_point()
    return all(torch.is_tensor(element) and not element.is_floating_point() for element in sample)
