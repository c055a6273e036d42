"""The training objective of a `Transfusion` model on a packed batch, in order:

    time per modality span   (`span_times`: given, from a function of the span counts, or drawn)
    noise each span at its time on the straight path, run the model   (`predict`)
    text cross-entropy + flow-matching MSE, weighted   (`losses.py`)
    + velocity consistency against an EMA model (Yang et al., 2024), when one is given
    + reconstruction through the modality decoders, when `reconstruction_loss_weight > 0`

and what the model's output means (a velocity, or with `model_output_clean` the clean latent,
`output_to_velocity`), and the text head's logits for evaluation (`text_logits`).

Functions of the model, which keeps thin methods of the same names (`model.span_times`,
`model.predict`, `model.compute_loss`, ...); the model builds and routes, this module decides
what it is trained towards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import flow
from .inputs import Text, check_text, describe
from .losses import LossBreakdown, at_least_float32, combine, flow_loss_per_token, mean_or_zero, text_loss_per_token
from .packing import PackedBatch, pack


CLEAN_OUTPUT_MIN_REMAINING_TIME = 0.05


@dataclass
class Prediction:
    hidden: Tensor                      # (N, dim) hidden states
    noised: tuple[Tensor, ...]          # per type, (R_m, dim_latent) noised latent rows x_t
    row_times: tuple[Tensor, ...]       # per type, (R_m, 1) time of each row
    velocities: tuple[Tensor, ...]      # per type, (R_m, dim_latent) predicted velocities


def training_loss(model, modalities, times, num_modalities_to_times_fn, modality_type, ema_model, delta_time,
                  prob_uncond: float | None) -> LossBreakdown:
    """`model.forward`'s loss: the batch packed (with condition dropout in training mode), its
    times and noise drawn, then `compute_loss`."""
    prob_uncond = (model.config.prob_uncond if model.training else 0.) if prob_uncond is None else prob_uncond
    packed = model.pack(modalities, modality_type, prob_uncond = prob_uncond)
    times = span_times(model, packed, times, num_modalities_to_times_fn)
    noise = tuple(torch.randn_like(latents, dtype = torch.float32) for latents in packed.latents)
    return model.compute_loss(packed, times, noise, ema_model = ema_model, delta_time = delta_time)


def span_times(
    model, packed: PackedBatch,
    times: Tensor | None = None,
    num_modalities_to_times_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """(S,) the time of each modality span: from `times` (B, max modalities per sample),
    from `num_modalities_to_times_fn(num_modalities: (B,)) -> (B, max)`, or drawn from
    `time_distribution` (logit-normal by default, or uniform) on [0, 1], mapped onto
    [min_time_before_text, 1] for a modality that text follows. Transfusion
    (Zhou et al., 2024, section 4.3) limits the noise of an image that precedes its caption
    to half the schedule, so that the caption is learnt from a picture it can still see."""
    device = model.device
    if times is None and num_modalities_to_times_fn is not None:
        num_modalities = torch.zeros(packed.batch_size, dtype = torch.long, device = device).index_add(
            0, packed.span_doc, torch.ones_like(packed.span_doc))
        times = num_modalities_to_times_fn(num_modalities)

    if times is None:
        config = model.config
        times = flow.training_times(packed.num_spans, config.time_distribution, config.time_logit_mean, config.time_logit_std,
                                    device = device)
        low = config.min_time_before_text
        return torch.where(packed.span_before_text, low + (1. - low) * times, times) if low > 0 else times

    times = torch.as_tensor(times, dtype = torch.float32, device = device)
    most = int(packed.span_rank.max()) + 1 if packed.num_spans > 0 else 0
    if times.ndim != 2 or times.shape[0] != packed.batch_size or times.shape[1] < most:
        raise ValueError(f'`times` must have shape (batch, max modalities per sample) = ({packed.batch_size}, >= {most}), got {tuple(times.shape)}')
    span_times = times[packed.span_doc, packed.span_rank]
    outside = ~((span_times >= 0) & (span_times <= 1))          # NaN compares false: it is outside too
    if outside.any():
        span = int(outside.nonzero()[0])
        doc, rank = int(packed.span_doc[span]), int(packed.span_rank[span])
        raise ValueError(f'`times` must lie in [0, 1] (0 is noise, 1 is data), got {float(span_times[span])} at times[{doc}, {rank}]')
    return span_times


def predict(model, packed: PackedBatch, span_times: Tensor, noise: tuple[Tensor, ...]) -> Prediction:
    """Runs the model on a batch whose modalities are noised with `noise` at `span_times`."""
    row_times = tuple(span_times[rows][:, None] for rows in packed.latent_span)              # (R_m, 1)
    noised = tuple(flow.interpolate(n, x1, t) for n, x1, t in zip(noise, packed.latents, row_times))

    hidden = model.hidden_states(packed, noised, span_times)

    velocities = []
    for m, (index, x_t, t) in enumerate(zip(packed.latent_index, noised, row_times)):
        if index.numel() == 0:
            velocities.append(x_t)
            continue
        output = model.tokens_to_output(m, hidden[index], model.span_shapes(packed, m))
        velocities.append(model.output_to_velocity(at_least_float32(output), x_t, t))

    return Prediction(hidden, noised, row_times, tuple(velocities))


def compute_loss(
    model, packed: PackedBatch, span_times: Tensor, noise: tuple[Tensor, ...],
    ema_model: nn.Module | None = None, delta_time: float = 1e-3,
) -> LossBreakdown:
    """The loss for given times and noise: deterministic, for tests and custom training loops."""
    config = model.config
    prediction = model.predict(packed, span_times, noise)
    hidden = prediction.hidden

    text_index = packed.text_index
    text_losses = text_loss_per_token(model.to_logits(hidden[text_index]), packed.text_target[text_index])

    targets = tuple(flow.velocity_target(n, x1) for n, x1 in zip(noise, packed.latents))
    flow_losses = tuple(flow_loss_per_token(v, target) for v, target in zip(prediction.velocities, targets))
    row_docs = tuple(packed.span_doc[rows] for rows in packed.latent_span)

    breakdown = combine(
        text_losses, packed.doc[text_index], flow_losses, row_docs,
        packed.batch_size, config.text_loss_weight, config.flow_loss_weight,
    )

    if ema_model is not None:
        consistency = velocity_consistency_losses(packed, span_times, noise, prediction, ema_model, delta_time)
        breakdown.velocity_consistency = consistency
        breakdown.total = breakdown.total + config.velocity_consistency_loss_weight * sum(consistency)

    if config.reconstruction_loss_weight > 0:
        reconstruction = reconstruction_losses(model, packed, prediction)
        breakdown.reconstruction = reconstruction
        breakdown.total = breakdown.total + config.reconstruction_loss_weight * sum(reconstruction)

    return breakdown


def output_to_velocity(config, output: Tensor, noised: Tensor, times: Tensor) -> Tensor:
    """The model's output rows -> velocity rows. With `model_output_clean` the output is the
    clean latent x1, and v = (x1 - x_t) / (1 - t), with 1 - t kept above 0.05 (Li & He,
    "Back to Basics: Let Denoising Generative Models Denoise", 2025)."""
    if not config.model_output_clean:
        return output
    return (output - noised) / (1. - times).clamp(min = CLEAN_OUTPUT_MIN_REMAINING_TIME)


def text_logits(model, text: Tensor) -> Tensor:
    """(b, n) raw text rows, as `model(text)` trains them (no SOS / EOS) -> (b, n, vocab size)
    logits: position i predicts token i + 1 (`forward(..., return_loss = False)`, for
    evaluation and perplexity)."""
    if not torch.is_tensor(text) or text.is_floating_point() or text.ndim != 2 or text.numel() == 0:
        raise ValueError(f'`modalities`: return_loss = False takes Int[b n] text rows (b, n > 0), got {describe(text)}')
    samples = [[Text(row)] for row in check_text(text, model.config.num_text_tokens, '`modalities`')]
    packed = pack(samples, model.vocab, wrap = False).to(model.device)
    hidden = model.hidden_states(packed, packed.latents, torch.ones(0, device = model.device))
    return model.to_logits(hidden).view(*text.shape, -1)


# auxiliary losses

def velocity_consistency_losses(packed, span_times, noise, prediction, ema_model, delta_time) -> tuple[Tensor, ...]:
    """Consistency flow matching (Yang et al., 2024): the velocity at (x_t, t) should match
    the EMA model's at (x_{t + dt}, t + dt) on the same straight path. The EMA side is a
    fixed target; the gradient flows through this model's velocity."""
    ema_model = getattr(ema_model, 'ema_model', ema_model)      # an `EMA` wrapper or a plain model
    later_times = (span_times + delta_time).clamp(max = 1.)
    with torch.no_grad():
        ema_velocities = ema_model.predict(packed, later_times, noise).velocities
    return tuple(
        mean_or_zero(flow_loss_per_token(v, target))
        for v, target in zip(prediction.velocities, ema_velocities)
    )


def reconstruction_losses(model, packed: PackedBatch, prediction: Prediction) -> tuple[Tensor, ...]:
    """The predicted clean latent x1 = x_t + (1 - t) v, decoded, against the modality as it
    was given (before its encoder), or against the decoded clean latent where the type has no
    encoder. One mean-squared error per modality type, averaged over its modalities."""
    losses = []
    for m in range(model.num_modality_types):
        records = packed.spans_of_type(m)
        if len(records) == 0:
            losses.append(prediction.hidden.new_zeros(()))
            continue

        x_t, t, v = prediction.noised[m], prediction.row_times[m], prediction.velocities[m]
        predicted_clean = x_t + (1. - t) * v
        span_ids = [index for index, record in enumerate(packed.span_records) if record.modality_type == m]

        offset, per_modality = 0, []
        for span_id, record in zip(span_ids, records):
            rows = math.prod(record.shape)
            decoded = model.decode_latent(m, predicted_clean[offset:offset + rows].reshape(*record.shape, -1))
            target = reconstruction_target(model, m, packed, span_id, packed.latents[m][offset:offset + rows].reshape(*record.shape, -1))
            per_modality.append(F.mse_loss(decoded.float(), target.float()))
            offset += rows
        losses.append(torch.stack(per_modality).mean())
    return tuple(losses)


def reconstruction_target(model, modality_type: int, packed: PackedBatch, span_id: int, clean: Tensor) -> Tensor:
    """The modality as given, before its encoder; else (no encoder, or no raw kept) the clean latent decoded."""
    raw = packed.raw[span_id] if span_id < len(packed.raw) else None
    if raw is not None and not isinstance(model.modality_encoders[modality_type], nn.Identity):
        return raw.to(model.device)
    with torch.no_grad():
        return model.decode_latent(modality_type, clean)

