"""Classifier-free guidance (Ho & Salimans, 2022, https://arxiv.org/abs/2207.12598).

The condition of a modality is the text around it. The unconditional version of a sample is
the same sample with its text removed: SOS, then each modality with its own header
(META, shape, BOM) and EOM, in order, then EOS. This is a sequence that `pack` lays out like
any other, so neither packing nor the losses know about guidance, and no extra token is
needed. (Replacing each text token by a null token, as the reference package does, would keep
the positions but teach the model nothing a shorter sequence does not.)

- training: `drop_text_conditions` replaces each sample, with probability `prob_uncond`, by
  its unconditional version, before packing. Samples without a modality or without text have
  nothing to drop and are left as they are, so that text-only data never teaches the model
  to stop right after SOS;
- sampling: `unconditional_items` gives the unconditional version of a generation sequence;
  `GuidedBackend` keeps it in a second set of cache rows and mixes the two velocities,
  v = v_uncond + scale * (v_cond - v_uncond).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import Latents, Request
from .inputs import Modality, Sample, Text
from .vocab import Vocab


# training

def unconditional_sample(sample: Sample) -> Sample:
    return [segment for segment in sample if not isinstance(segment, Text)]


def can_drop(sample: Sample) -> bool:
    has_modality = any(isinstance(segment, Modality) for segment in sample)
    has_text = any(isinstance(segment, Text) and segment.ids.numel() > 0 for segment in sample)
    return has_modality and has_text


def drop_text_conditions(samples: list[Sample], prob_uncond: float, generator: torch.Generator | None = None) -> tuple[list[Sample], Tensor]:
    """Replaces each sample that has both text and a modality by its unconditional version with
    probability `prob_uncond`. Returns the samples and which were replaced, (B,) bool."""
    if not 0. <= prob_uncond <= 1.:
        raise ValueError(f'prob_uncond must lie in [0, 1], got {prob_uncond}')
    draws = torch.rand(len(samples), generator = generator) < prob_uncond
    dropped = torch.tensor([bool(draw) and can_drop(sample) for draw, sample in zip(draws, samples)], dtype = torch.bool)
    return [unconditional_sample(s) if drop else s for s, drop in zip(samples, dropped.tolist())], dropped


# sampling

def unconditional_items(items: list, vocab: Vocab) -> list:
    """The unconditional version of a generation sequence (SOS first): SOS, and each modality
    with its header and EOM, text left out. A trailing header (META, shape, BOM) whose
    latents are not there yet is kept, as is a trailing block of latents without its EOM."""
    out, header = [], None
    for item in items:
        if isinstance(item, Latents):
            out.extend([*header, item])
            header = None
        elif item == vocab.meta:
            header = [item]
        elif header is not None:
            header.append(item)
        elif item == vocab.sos or vocab.is_eom(item):
            out.append(item)
    if header is not None and len(header) > 1 and vocab.is_bom(header[-1]):
        out.extend(header)
    return out


def mix(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    return uncond + scale * (cond - uncond)


class GuidedBackend:
    """Wraps two backends of the same kind, one per branch. Each row's conditional sequence is
    the one the sampler builds; its unconditional version is brought up to date in the second
    backend's rows, in one chunk, when a modality's header is complete (the prompt's and the
    earlier committed modalities come along then), and its noised latents are evaluated in both branches at every ODE stage. Text steps run
    the conditional branch only."""

    def __init__(self, cond_backend, uncond_backend, scale: float, vocab: Vocab):
        self.cond, self.uncond, self.scale, self.vocab = cond_backend, uncond_backend, scale, vocab
        self.items: list[list] = []         # per row, the conditional sequence so far
        self.synced: list[int] = []         # per row, how many unconditional items the second backend holds

    def rewind(self, row: int, num: int):
        self.cond.rewind(row, num)
        del self.items[row][len(self.items[row]) - num:]

    def uncond_request(self, row: int, request: Request | None) -> Request | None:
        if request is None:
            return None
        if not request.keep:
            return request                  # noised latents: the same in both branches
        self.items[row].extend(request.items)
        if all(isinstance(item, int) and item < self.vocab.num_text_tokens for item in request.items):
            return None                     # plain text: nothing of the unconditional sequence changes
        target = unconditional_items(self.items[row], self.vocab)
        if not (isinstance(target[-1], int) and self.vocab.is_bom(target[-1])):
            return None                     # synced lazily, once a modality is about to be denoised
        new, self.synced[row] = target[self.synced[row]:], len(target)
        return Request(new)

    def step(self, requests: list[Request | None]) -> list[Tensor | None]:
        if len(self.items) == 0:
            self.items, self.synced = [[] for _ in requests], [0] * len(requests)

        uncond_requests = [self.uncond_request(row, request) for row, request in enumerate(requests)]
        outputs = self.cond.step(requests)
        if all(request is None for request in uncond_requests):
            return outputs
        uncond_outputs = self.uncond.step(uncond_requests)

        for row, request in enumerate(requests):
            if request is not None and not request.keep and isinstance(request.items[-1], Latents):
                outputs[row] = mix(outputs[row], uncond_outputs[row], self.scale)
        return outputs
