"""A readable view of a sample: its text runs and its modalities' shapes."""

from __future__ import annotations

import torch
from torch import Tensor

PREVIEW = 12        # text ids shown before '...'


def describe_text(ids: Tensor, label: str = 'text') -> str:
    values = ids.tolist()
    preview = values if len(values) <= PREVIEW else values[:PREVIEW] + ['...']
    return f'{label}: {len(values)} tokens {preview}'


def describe_sample(sample: list) -> list[str]:
    """One line per element of a sample in the list form."""
    lines = []
    for element in sample:
        if isinstance(element, tuple):
            modality_type, tensor = element
            lines.append(f'modality {modality_type}: shape {tuple(tensor.shape)}')
        elif torch.is_tensor(element) and not element.is_floating_point():
            if element.ndim == 1:
                lines.append(describe_text(element))
            else:
                lines.append(f'text?: an integer tensor of shape {tuple(element.shape)} (text in a sample is 1-d)')
        elif torch.is_tensor(element):
            lines.append(f'modality 0: shape {tuple(element.shape)}')
        else:
            lines.append(f'{type(element).__name__}: {element!r}')
    return lines


def print_modality_sample(sample: list | Tensor) -> None:
    """Prints one sample in the list form (text tensors and `(modality_type, tensor)` tuples),
    or one of the tensor forms `model(...)` takes: `Int[b n]` text rows are printed one line
    per row, any other tensor as one element."""
    if torch.is_tensor(sample) and not sample.is_floating_point() and sample.ndim == 2:
        lines = [describe_text(row, f'text row {index}') for index, row in enumerate(sample)]
    else:
        lines = describe_sample([sample] if torch.is_tensor(sample) else sample)
    for line in lines:
        print(line)
