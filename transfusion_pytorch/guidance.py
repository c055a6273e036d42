"""Classifier-free guidance (Ho & Salimans, 2022, https://arxiv.org/abs/2207.12598).

The condition of a modality is the text before it. The unconditional version of a sample
drops that condition and nothing else: every text segment that comes before the sample's last
modality is removed; SOS, each modality with its own header (META, shape, BOM) and EOM, the
text after the last modality and EOS stay, in order. So

    text -> image            SOS [image] EOS (EOS not a target, below)
    image -> text            unchanged: nothing comes before the image (a caption is kept)
    text -> image -> text    SOS [image] text EOS: the caption after the image is kept
    t1 -> A -> t2 -> B -> t3  SOS [A] [B] t3 EOS: t1 conditions A, and t1 t2 condition B

The text after a modality is what the model should say about it, not a condition of it:
dropping it would teach that a modality may be followed by EOS, and a captioning model would
learn to stop after an image. For the same reason, when a dropped sample ends with its
modality (text -> image), the EOS after it is not a target (`without_eos_after_modality`):
`SOS [image] EOS` is a sequence the data never has, and learning it would compete with the
captions that do follow `SOS [image]`. With several modalities, the text between two of them
is both a caption of the first and a condition of the second; it is dropped, so that each
modality of a dropped sample is denoised after exactly the unconditional prefix that guided
sampling gives it (SOS, the earlier modalities with their headers, its own header). The rule
is one function of the sequence, used on both sides:

- training: `drop_text_conditions` replaces each sample, with probability `prob_uncond`, by
  `unconditional_sample(sample)`, before packing, so neither packing nor the losses know about
  guidance (the EOS target above is the one change made after packing) and no extra token is
  needed. A sample with no text before its last modality
  (text only, a modality only, a caption after an image) has nothing to drop and is left as
  it is. (Replacing each text token by a null token, as the reference package does, would keep
  the positions but teach the model nothing a shorter sequence does not);
- sampling: `unconditional_items` is the same rule on a generation sequence; `GuidedBackend`
  keeps its result in a second set of cache rows and mixes the two velocities,
  v = v_uncond + w(t) (v_cond - v_uncond). When a modality is denoised, its header is the
  last in the sequence, so its unconditional prefix holds no text at all.

The weight w(t) (`Guidance`) is `cfg_scale` inside an interval of times and 1 (the conditional
velocity alone) outside it, after Kynkäänniemi et al., "Applying Guidance in a Limited Interval
Improves Sample and Distribution Quality in Diffusion Models", 2024
(https://arxiv.org/abs/2404.07724): guidance at high noise pulls every sample towards the same
few modes of its class and costs diversity, and at low noise it no longer changes what is drawn.
Outside the interval the unconditional branch is not evaluated at all. With the `linear`
schedule, w rises inside the interval from 1 at its noisy end to `cfg_scale` at its clean end,
the "increasing" schedule of Wang et al., "Analysis of Classifier-Free Guidance Weight
Schedulers", 2024 (https://arxiv.org/abs/2404.13040).

Time convention: t = 0 is noise and t = 1 data, x_t = t x1 + (1 - t) x0. The paper states its
interval as noise levels sigma of EDM, x = y + sigma n; dividing x_t by t gives
x1 + ((1 - t) / t) x0, so sigma = (1 - t) / t and t = 1 / (1 + sigma). Its interval
sigma in (0.28, 5.42] (EDM2 on ImageNet-512) is t in [0.16, 0.78). The data scale differs
between latent spaces, so such an interval carries over as a starting point for a sweep only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .backends import Latents, Request
from .config import is_number
from .inputs import Modality, Sample, Text
from .packing import IGNORE, PackedBatch, text_positions
from .vocab import Vocab


# training

def last_modality_index(sample: Sample) -> int | None:
    return max((index for index, segment in enumerate(sample) if isinstance(segment, Modality)), default = None)


def unconditional_sample(sample: Sample) -> Sample:
    """The sample without the text before its last modality (the module docstring's rule)."""
    last = last_modality_index(sample)
    if last is None:
        return list(sample)
    return [segment for index, segment in enumerate(sample) if index > last or isinstance(segment, Modality)]


def can_drop(sample: Sample) -> bool:
    """Whether the sample has a condition to drop: some text before its last modality."""
    last = last_modality_index(sample)
    return last is not None and any(isinstance(segment, Text) and segment.ids.numel() > 0 for segment in sample[:last])


def drop_text_conditions(samples: list[Sample], prob_uncond: float, generator: torch.Generator | None = None) -> tuple[list[Sample], Tensor]:
    """Replaces each sample that has a condition to drop by its unconditional version with
    probability `prob_uncond`. Returns the samples and which were replaced, (B,) bool."""
    if not 0. <= prob_uncond <= 1.:
        raise ValueError(f'prob_uncond must lie in [0, 1], got {prob_uncond}')
    draws = torch.rand(len(samples), generator = generator) < prob_uncond
    dropped = torch.tensor([bool(draw) and can_drop(sample) for draw, sample in zip(draws, samples)], dtype = torch.bool)
    return [unconditional_sample(s) if drop else s for s, drop in zip(samples, dropped.tolist())], dropped


def without_eos_after_modality(packed: PackedBatch, samples: list[Sample], dropped: Tensor) -> PackedBatch:
    """`packed` (of `samples`, framed by SOS / EOS) with no EOS target in the dropped samples
    that end with a modality: the position before EOS (that modality's EOM) predicts nothing."""
    docs = [doc for doc, (sample, drop) in enumerate(zip(samples, dropped.tolist())) if drop and isinstance(sample[-1], Modality)]
    if len(docs) == 0:
        return packed
    text_target = packed.text_target.clone()
    text_target[packed.cu_seqlens[1:][docs] - 2] = IGNORE
    return replace(packed, text_target = text_target, text_index = text_positions(text_target))


# sampling

def unconditional_items(items: list, vocab: Vocab) -> list:
    """The unconditional version of a generation sequence (SOS first), by the training rule:
    the text before the last modality is removed, everything from that modality's META on is
    kept as it is (its header, complete or being written, its latents, EOM, the text after it).
    Before it, SOS, each modality's header and latents, and EOM are kept; a META whose
    modality never came is left out, as `pack` would never have written it."""
    starts = [index for index, item in enumerate(items) if isinstance(item, int) and item == vocab.meta]
    if len(starts) == 0:
        return list(items)                  # no modality: nothing to drop, as in training

    out, header = [], None
    for item in items[:starts[-1]]:
        if isinstance(item, Latents):
            out.extend([*header, item])
            header = None
        elif item == vocab.meta:
            header = [item]
        elif header is not None:
            header.append(item)
        elif item == vocab.sos or vocab.is_eom(item):
            out.append(item)
    return out + list(items[starts[-1]:])


def mix(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    return uncond + scale * (cond - uncond)


GUIDANCE_SCHEDULES = ('constant', 'linear')
DEFAULT_CFG_SCALE = 3.


def default_cfg_scale(model) -> float:
    """The guidance scale of `sample` when none is given: 3 for a model built to train with
    condition dropout (`prob_uncond > 0`), whose unconditional branch has been taught; 1 (no
    guidance) for one built without, whose unconditional branch is untrained. With the default
    interval (0.6, 1) this is the point the digits sweep measured best (docs/generation.md)."""
    return DEFAULT_CFG_SCALE if model.config.prob_uncond > 0 else 1.


@dataclass(frozen = True, kw_only = True)
class Guidance:
    """The guidance weight w(t) of each ODE stage (module docstring). The fields are the options
    of `sample` of the same meaning, and errors name those options."""
    cfg_scale: float = 1.                           # w inside the interval (at its clean end for `linear`)
    guidance_interval: tuple[float, float] = (0., 1.)   # (t_lo, t_hi): guided for t_lo <= t <= t_hi
    guidance_schedule: str = 'constant'             # 'constant': w = cfg_scale; 'linear': from 1 at t_lo to cfg_scale at t_hi

    def __post_init__(self):
        if not is_number(self.cfg_scale):
            raise ValueError(f'cfg_scale must be a finite number (1: no guidance), got {self.cfg_scale!r}')
        interval = self.guidance_interval
        if not (isinstance(interval, (tuple, list)) and len(interval) == 2 and all(is_number(t) for t in interval)
                and 0. <= interval[0] < interval[1] <= 1.):
            raise ValueError('guidance_interval must be two times (t_lo, t_hi) with 0 <= t_lo < t_hi <= 1 (t = 0 is noise, '
                             f't = 1 data), got {interval!r}')
        if self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f'guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {self.guidance_schedule!r}')
        object.__setattr__(self, 'guidance_interval', (float(interval[0]), float(interval[1])))

    @property
    def off(self) -> bool:
        """Whether w is 1 at every t, so that the unconditional branch is never needed."""
        return self.cfg_scale == 1.

    def weight(self, t: float) -> float:
        """w(t); 1 means the conditional velocity alone."""
        low, high = self.guidance_interval
        if not low <= t <= high:
            return 1.
        if self.guidance_schedule == 'constant':
            return float(self.cfg_scale)
        return 1. + (self.cfg_scale - 1.) * (t - low) / (high - low)


class GuidedBackend:
    """Wraps two backends of the same kind, one per branch. Each row's conditional sequence is
    the one the sampler builds; the second backend's rows hold its unconditional version. An ODE
    stage whose weight w(t) is not 1 is evaluated in both branches and mixed; any other step
    (text, a stage outside the guidance interval) runs the conditional branch alone. The
    unconditional rows are brought up to date in one chunk just before their first guided
    stage after a change (the prompt, the modalities committed since, the new header), so a
    modality denoised without guidance costs the unconditional branch nothing."""

    def __init__(self, cond_backend, uncond_backend, guidance: Guidance, vocab: Vocab):
        self.cond, self.uncond, self.guidance, self.vocab = cond_backend, uncond_backend, guidance, vocab
        self.items: list[list] = []         # per row, the conditional sequence so far
        self.synced: list[int] = []         # per row, how many unconditional items the second backend holds

    def rewind(self, row: int, num: int):
        self.cond.rewind(row, num)
        del self.items[row][len(self.items[row]) - num:]

    def guided(self, request: Request | None) -> bool:
        return (request is not None and not request.keep and isinstance(request.items[-1], Latents)
                and self.guidance.weight(request.time) != 1.)

    def sync_request(self, row: int) -> Request | None:
        """The unconditional items the second backend lacks before a guided stage of `row`."""
        target = unconditional_items(self.items[row], self.vocab)
        new, self.synced[row] = target[self.synced[row]:], len(target)
        return Request(new) if len(new) > 0 else None

    def step(self, requests: list[Request | None]) -> list[Tensor | None]:
        if len(self.items) == 0:
            self.items, self.synced = [[] for _ in requests], [0] * len(requests)
        for row, request in enumerate(requests):
            if request is not None and request.keep:
                self.items[row].extend(request.items)

        outputs = self.cond.step(requests)
        guided = [self.guided(request) for request in requests]
        if not any(guided):
            return outputs

        syncs = [self.sync_request(row) if is_guided else None for row, is_guided in enumerate(guided)]
        if any(sync is not None for sync in syncs):
            self.uncond.step(syncs)
        uncond_outputs = self.uncond.step([request if is_guided else None for request, is_guided in zip(requests, guided)])

        for row, (request, is_guided) in enumerate(zip(requests, guided)):
            if is_guided:
                outputs[row] = mix(outputs[row], uncond_outputs[row], self.guidance.weight(request.time))
        return outputs
