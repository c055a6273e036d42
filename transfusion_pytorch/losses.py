"""The training objective: next-token cross-entropy on text, flow-matching MSE on modalities.

    loss = text_loss_weight * CE(text) + flow_loss_weight * sum over modality types m of MSE_m

Each term is a mean over its valid tokens in the batch (text positions with a target; latent
tokens of type m), so a term does not depend on how much padding or how many samples of the
other kind a batch holds. The per-sample means come along in the breakdown.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossBreakdown:
    total: Tensor                   # the scalar that `forward` returns
    text: Tensor                    # mean cross-entropy over the text targets of the batch
    flow: tuple[Tensor, ...]        # mean flow-matching MSE over the latent tokens of each modality type
    per_sample_text: Tensor         # (B,) mean cross-entropy of each sample, NaN where it has no text target
    per_sample_flow: Tensor         # (B,) mean flow MSE of each sample over all its latent tokens, NaN where none
    velocity_consistency: tuple[Tensor, ...] = ()   # per modality type, when an EMA model is given
    reconstruction: tuple[Tensor, ...] = ()         # per modality type, when reconstruction_loss_weight > 0

    # the public package's names of the last two (`total`, `text` and `flow` are the same there):
    # the same tuples, or None where the term is off

    @property
    def velocity(self) -> tuple[Tensor, ...] | None:
        return self.velocity_consistency or None

    @property
    def recon(self) -> tuple[Tensor, ...] | None:
        return self.reconstruction or None


def at_least_float32(t: Tensor) -> Tensor:
    """Losses of half-precision outputs are computed in float32; float64 (gradcheck) stays float64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def text_loss_per_token(logits: Tensor, targets: Tensor) -> Tensor:
    """(T, vocab), (T,) -> (T,)"""
    return F.cross_entropy(at_least_float32(logits), targets, reduction = 'none')


def flow_loss_per_token(pred_velocity: Tensor, target_velocity: Tensor) -> Tensor:
    """(N_m, dim_latent) x 2 -> (N_m,) mean squared error over the latent dims."""
    return (at_least_float32(pred_velocity) - at_least_float32(target_velocity)).pow(2).mean(dim = -1)


def mean_or_zero(values: Tensor) -> Tensor:
    return values.mean() if values.numel() > 0 else values.new_zeros(())


def per_sample_mean(values: Tensor, sample: Tensor, num_samples: int) -> Tensor:
    """Mean of `values` grouped by `sample` index; NaN for samples with no value."""
    sums = values.new_zeros(num_samples).index_add(0, sample, values)
    counts = values.new_zeros(num_samples).index_add(0, sample, torch.ones_like(values))
    return sums / counts


def combine(
    text_losses: Tensor, text_sample: Tensor,
    flow_losses: tuple[Tensor, ...], flow_samples: tuple[Tensor, ...],
    num_samples: int, text_loss_weight: float, flow_loss_weight: float | tuple[float, ...],
) -> LossBreakdown:
    weights = flow_loss_weight if isinstance(flow_loss_weight, tuple) else (flow_loss_weight,) * len(flow_losses)

    text = mean_or_zero(text_losses)
    flow = tuple(mean_or_zero(losses) for losses in flow_losses)
    total = text_loss_weight * text + sum((w * f for w, f in zip(weights, flow)), text.new_zeros(()))

    all_flow = torch.cat(flow_losses) if len(flow_losses) > 0 else text_losses.new_zeros(0)
    all_flow_samples = torch.cat(flow_samples) if len(flow_samples) > 0 else text_sample.new_zeros(0)

    return LossBreakdown(
        total = total,
        text = text,
        flow = flow,
        per_sample_text = per_sample_mean(text_losses.detach(), text_sample, num_samples),
        per_sample_flow = per_sample_mean(all_flow.detach(), all_flow_samples, num_samples),
    )
