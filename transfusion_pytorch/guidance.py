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
  v = v_uncond + scale * (v_cond - v_uncond). When a modality is denoised, its header is the
  last in the sequence, so its unconditional prefix holds no text at all.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .backends import Latents, Request
from .inputs import Modality, Sample, Text
from .packing import IGNORE, PackedBatch
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
    return replace(packed, text_target = text_target)


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
