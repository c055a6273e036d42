"""The next-token sampler: a pure function of logits, an allowed-token mask and a generator.

Order: tokens outside `allowed` are removed, then temperature, top-k, and min-p (Nguyen et
al., "Min P Sampling", 2024, https://arxiv.org/abs/2407.01082: keep the tokens whose
probability is at least min_p times that of the most likely one). Temperature 0 is greedy.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_token(
    logits: Tensor,                     # (B, vocab)
    allowed: Tensor | None = None,      # (B, vocab) or (vocab,) bool
    temperature: float = 1.,
    top_k: int | None = None,
    min_p: float | None = 0.1,
    generators: list[torch.Generator | None] | None = None,     # one per row, for reproducibility
) -> Tensor:
    """(B,) sampled token ids."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float('-inf'))

    if temperature == 0.:
        return logits.argmax(dim = -1)

    logits = logits / temperature

    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim = -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))

    if min_p is not None and min_p > 0.:
        probs = logits.softmax(dim = -1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim = -1, keepdim = True), float('-inf'))

    probs = logits.softmax(dim = -1)
    generators = generators if generators is not None else [None] * probs.shape[0]
    # one draw per row, each from its own generator, so a row samples the same alone or in a batch;
    # a generator draws on its own device (`seed` makes CPU ones, and CUDA's multinomial refuses
    # them), so a seed gives the same tokens from the same probabilities on any device
    return torch.cat([draw(row, gen) for row, gen in zip(probs, generators)])


def draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """(1,) one token drawn from `probs` (vocab,) with `generator`, on the generator's device."""
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs[None], 1, generator = generator)[0]
    return torch.multinomial(probs[None].to(generator.device), 1, generator = generator)[0].to(probs.device)
