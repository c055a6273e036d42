"""The token embedding and the output head, over the whole vocabulary (`vocab.py`: the text
ids, then the structural tokens).

Two options come from starting with a pretrained language model:

- `tied`: the head multiplies by the embedding table itself (Press & Wolf, 2017,
  https://arxiv.org/abs/1608.05859), as Qwen's small models and Llama 3.2 do. The head keeps
  a reference to the embedding rather than a parameter of its own, so the table is stored once.
- `num_frozen`: the rows of the first `num_frozen` ids (the language model's vocabulary) are
  frozen, while the rows of the structural tokens after them keep training (a frozen head
  could never learn to open a modality). The two parts are separate parameters, `weight`
  (num_frozen, dim) with requires_grad off and `structural`, so the frozen rows get neither a
  gradient nor optimizer state.

`AxialPositions` embeds a latent token's coordinates on its modality's grid (`add_pos_emb`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def split_rows(module: nn.Module, num_tokens: int, num_frozen: int):
    """Freezes `module.weight` (the first num_frozen rows) and adds the trainable rows of the
    other ids as `module.structural`."""
    module.num_tokens, module.num_frozen = num_tokens, num_frozen
    if num_frozen > 0:
        module.weight.requires_grad_(False)
        module.structural = nn.Parameter(torch.randn(num_tokens - num_frozen, module.weight.shape[1]) * 0.02)


def tables(module: nn.Module) -> tuple[Tensor, ...]:
    return (module.weight,) if module.num_frozen == 0 else (module.weight, module.structural)


class TokenEmbedding(nn.Embedding):
    """An `nn.Embedding` (so optimizers and parameter groups treat it as one) over num_tokens ids."""

    def __init__(self, num_tokens: int, dim: int, num_frozen: int = 0):
        super().__init__(num_frozen or num_tokens, dim)
        nn.init.normal_(self.weight, std = 0.02)
        split_rows(self, num_tokens, num_frozen)

    @property
    def tables(self) -> tuple[Tensor, ...]:
        """The rows of every id, in one or two parts."""
        return tables(self)

    def forward(self, ids: Tensor) -> Tensor:
        if self.num_frozen == 0:
            return F.embedding(ids, self.weight)
        is_structural = (ids >= self.num_frozen)[..., None]
        frozen = F.embedding(ids.clamp(max = self.num_frozen - 1), self.weight)
        return torch.where(is_structural, F.embedding((ids - self.num_frozen).clamp(min = 0), self.structural), frozen)

    def extra_repr(self) -> str:
        return f'{self.num_tokens}, {self.embedding_dim}' + (f', num_frozen={self.num_frozen}' if self.num_frozen else '')


class OutputHead(nn.Module):
    """(..., dim) hidden states -> (..., num_tokens) logits, bias-free."""

    def __init__(self, dim: int, num_tokens: int, num_frozen: int = 0, tied: TokenEmbedding | None = None):
        super().__init__()
        if tied is not None:
            self.num_tokens, self.num_frozen = num_tokens, num_frozen
            self.__dict__['tied'] = tied        # a reference, not a submodule: the table is saved once, as the embedding's
            return
        self.weight = nn.Parameter(torch.randn(num_frozen or num_tokens, dim) * 0.02)
        split_rows(self, num_tokens, num_frozen)

    @property
    def is_tied(self) -> bool:
        return 'tied' in self.__dict__

    @property
    def tables(self) -> tuple[Tensor, ...]:
        return self.__dict__['tied'].tables if self.is_tied else tables(self)

    def __getattr__(self, name: str):
        if name == 'weight' and 'tied' in self.__dict__:
            return self.__dict__['tied'].weight        # `head.weight` reads as the shared table
        return super().__getattr__(name)

    def forward(self, hidden: Tensor) -> Tensor:
        parts = self.tables
        if len(parts) == 1:
            return F.linear(hidden, parts[0])
        return torch.cat([F.linear(hidden, table) for table in parts], dim = -1)

    def extra_repr(self) -> str:
        return f'{self.num_tokens}' + (', tied' if self.is_tied else '') + (f', num_frozen={self.num_frozen}' if self.num_frozen else '')


class AxialPositions(nn.Module):
    """A learned embedding of a token's coordinate on each axis of its modality's grid, summed
    over the axes. Each axis has a small MLP of the coordinate, so any grid size works."""

    def __init__(self, num_axes: int, dim: int):
        super().__init__()
        self.axes = nn.ModuleList([nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim)) for _ in range(num_axes)])

    def forward(self, coords: Tensor) -> Tensor:
        """(N, num_axes) integer coordinates -> (N, dim)"""
        return sum(mlp(coords[:, axis:axis + 1].to(mlp[0].weight.dtype)) for axis, mlp in enumerate(self.axes))
