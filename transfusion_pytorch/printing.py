"""A readable view of a sample: its text runs and its modalities' shapes."""

from __future__ import annotations

import torch
from torch import Tensor


def describe_sample(sample: list) -> list[str]:
    lines = []
    for element in sample:
        if isinstance(element, tuple):
            modality_type, tensor = element
            lines.append(f'modality {modality_type}: shape {tuple(tensor.shape)}')
        elif torch.is_tensor(element) and not element.is_floating_point():
            ids = element.tolist()
            preview = ids if len(ids) <= 12 else ids[:12] + ['...']
            lines.append(f'text: {len(ids)} tokens {preview}')
        elif torch.is_tensor(element):
            lines.append(f'modality 0: shape {tuple(element.shape)}')
        else:
            lines.append(f'{type(element).__name__}: {element!r}')
    return lines


def print_modality_sample(sample: list | Tensor) -> None:
    """Prints one sample in the list form (text tensors and `(modality_type, tensor)` tuples)."""
    if torch.is_tensor(sample):
        sample = [sample]
    for line in describe_sample(sample):
        print(line)
