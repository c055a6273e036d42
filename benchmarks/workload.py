"""The benchmark workloads: model configurations and batches, built deterministically from a
seed with torch and the standard library only, so that this package and the public one (which
run in different virtualenvs, with the same torch) train on bit-identical inputs.

Token counting, the same for both packages: the tokens a user gives, i.e. text ids plus latent
tokens (prod of each modality's shape). The structural tokens that each implementation adds on
its own (SOS / EOS, modality begin / end markers, shape tokens) are not counted.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

NUM_TEXT_TOKENS = 256
DIM = 512
DEPTH = 8
DIM_LATENT = 384


@dataclass(frozen = True)
class Case:
    name: str
    description: str
    num_samples: int
    text_tokens: int            # total text ids in the batch
    modality_tokens: int        # total latent tokens in the batch
    modalities_per_sample: tuple[int, int] = (1, 3)
    num_types: int = 1
    text_rows: bool = False     # text given as one Int[b n] tensor (language pretraining rows)
    all_text: bool = False      # the sample lengths of the modality batch, given as text only

    @property
    def tokens(self) -> int:
        return self.text_tokens + self.modality_tokens


CASES = {case.name: case for case in (
    Case('multimodal', '8 samples, text and modality runs interleaved', 8, 1100, 1700),
    Case('text-same-count', 'the multimodal batch lengths, all text', 8, 1100, 1700, all_text = True),
    Case('text-4x512', 'text alone, Int[4, 512]', 4, 2048, 0, text_rows = True),
    Case('short-32', '32 short interleaved samples', 32, 1200, 1800, modalities_per_sample = (1, 1)),
    Case('long-2', '2 long interleaved samples, same tokens', 2, 1200, 1800, modalities_per_sample = (8, 8)),
    Case('types-4', 'the multimodal layout, 4 modality types', 8, 1100, 1700, num_types = 4),
)}


def model_kwargs(case: Case) -> dict:
    """The keyword arguments given to `Transfusion(...)` of either package: the contract's first
    configuration, with one latent width and default shape per modality type."""
    k = case.num_types
    return dict(
        num_text_tokens = NUM_TEXT_TOKENS,
        dim_latent = DIM_LATENT if k == 1 else (DIM_LATENT,) * k,
        modality_default_shape = (4,) if k == 1 else ((4,),) * k,
        transformer = dict(dim = DIM, depth = DEPTH),
    )


def split(rng: random.Random, total: int, parts: int, minimum: int = 1) -> list[int]:
    """`total` as `parts` positive integers that vary by about +-50% around the mean."""
    weights = [rng.uniform(0.5, 1.5) for _ in range(parts)]
    sizes = [max(minimum, int(total * w / sum(weights))) for w in weights]
    sizes[sizes.index(max(sizes))] += total - sum(sizes)
    assert sum(sizes) == total and min(sizes) >= minimum
    return sizes


def make_batch(case: Case, seed: int = 0):
    """The batch of a case, in the contract's input forms: a list of samples, each a list of
    1-d long text tensors and `(modality_type, Float[n, dim_latent])` modalities, or, for
    `text_rows`, one Int[b n] tensor."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)

    if case.text_rows:
        return torch.randint(0, NUM_TEXT_TOKENS, (case.num_samples, case.text_tokens // case.num_samples), generator = generator)

    text_per_sample = split(rng, case.text_tokens, case.num_samples, minimum = 4)
    modality_per_sample = split(rng, case.modality_tokens, case.num_samples, minimum = 4)
    span = 0
    batch = []
    for text_total, modality_total in zip(text_per_sample, modality_per_sample):
        if case.all_text:
            batch.append([torch.randint(0, NUM_TEXT_TOKENS, (text_total + modality_total,), generator = generator)])
            continue
        num_modalities = rng.randint(*case.modalities_per_sample)
        texts = split(rng, text_total, num_modalities + 1)
        lengths = split(rng, modality_total, num_modalities)
        sample = [torch.randint(0, NUM_TEXT_TOKENS, (texts[0],), generator = generator)]
        for length, text in zip(lengths, texts[1:]):
            sample.append((span % case.num_types, torch.randn(length, DIM_LATENT, generator = generator)))
            sample.append(torch.randint(0, NUM_TEXT_TOKENS, (text,), generator = generator))
            span += 1
        batch.append(sample)
    return batch


def count_tokens(batch) -> tuple[int, int]:
    """(text tokens, modality tokens) as the user gives them."""
    if torch.is_tensor(batch):
        return batch.numel(), 0
    text = modality = 0
    for sample in batch:
        for element in sample:
            if torch.is_tensor(element):
                text += element.numel()
            else:
                modality += element[1][..., 0].numel()
    return text, modality


def fingerprint(batch) -> str:
    """A hash of the batch's values, printed by both sides to show that they trained on the same data."""
    digest = hashlib.sha256()
    elements = [batch] if torch.is_tensor(batch) else [element for sample in batch for element in sample]
    for element in elements:
        if not torch.is_tensor(element):
            digest.update(bytes([element[0]]))
            element = element[1]
        digest.update(element.contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]
