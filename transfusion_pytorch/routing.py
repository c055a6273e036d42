"""Modality-specific weights in one transformer (`separate_modality_weights`).

Mixture-of-Transformers (Liang et al., 2024, https://arxiv.org/abs/2411.04996) and LMFusion
(Shi et al., 2024, https://arxiv.org/abs/2412.15188) give the latent tokens their own copy of
every weight of a block (attention projections, feed-forward, norms) while all tokens still
attend to each other in one attention over the shared sequence. Started from a language model,
the text tokens keep its weights and the latent tokens learn their own, initialised from them.

The transformer keeps its residual stream in routed order, the text rows first and the latent
rows after them, so that each weighted step runs its two copies on two contiguous slices; only
attention needs the sequence's own order, and gathers into it and back once per layer.
With every row on one path (a text-only batch, a decoding step, a modality being denoised on
its own) the order is the sequence's and nothing is gathered.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


class Routing:
    """Which rows take the text weights (first path) and which the modality weights (second)."""

    def __init__(self, is_modality: Tensor, num_modality: int | None = None):
        """is_modality: (N,) bool, in the sequence's order. `num_modality`: how many are set, when
        the caller knows it on the host (a packed batch does); else it is read from the device."""
        self.num_rows = is_modality.shape[0]
        self.num_text = self.num_rows - (int(is_modality.sum()) if num_modality is None else num_modality)
        self.is_identity = self.num_text in (0, self.num_rows)
        if not self.is_identity:
            self.order = torch.argsort(is_modality.to(torch.int8), stable = True)       # routed row -> sequence row
            self.inverse = torch.empty_like(self.order)
            self.inverse[self.order] = torch.arange(self.num_rows, device = self.order.device)

    def to_routed(self, t: Tensor) -> Tensor:
        """(N, ...) in the sequence's order -> in routed order."""
        return t if self.is_identity else t[self.order]

    def to_sequence(self, t: Tensor) -> Tensor:
        """(N, ...) in routed order -> in the sequence's order."""
        return t if self.is_identity else t[self.inverse]

    def apply(self, x: Tensor, text_fn: Callable, modality_fn: Callable):
        """text_fn on the text rows and modality_fn on the modality rows of x (N, ...) in routed
        order, their outputs joined in that order. Functions may return a tensor or a tuple of them."""
        if self.num_text == self.num_rows:
            return text_fn(x)
        if self.num_text == 0:
            return modality_fn(x)
        text, modality = text_fn(x[:self.num_text]), modality_fn(x[self.num_text:])
        if isinstance(text, tuple):
            return tuple(torch.cat(pair) for pair in zip(text, modality))
        return torch.cat((text, modality))


def route(routing: Routing | None, x: Tensor, text_fn: Callable, modality_fn: Callable | None = None):
    """text_fn on every row when the weights are shared (no routing), else `Routing.apply`."""
    return text_fn(x) if routing is None else routing.apply(x, text_fn, modality_fn)
