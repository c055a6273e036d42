"""Slow, obviously-correct references for the tests."""

import math

import torch

from transfusion_pytorch.packing import PackedBatch


def reference_mask(packed: PackedBatch) -> torch.Tensor:
    """(N, N) mask built from the layout records alone, one query and key at a time."""
    owner = []  # (sample index, modality record index or None) for every token, in order
    for doc, records in enumerate(packed.layout):
        start = int(packed.cu_seqlens[doc])
        end = int(packed.cu_seqlens[doc + 1])
        which = [None] * (end - start)
        for record_index, record in enumerate(records):
            if record.kind == 'modality':
                for i in range(record.start, record.start + record.length):
                    which[i - start] = record_index
        owner += [(doc, w) for w in which]

    n = len(owner)
    mask = torch.zeros(n, n, dtype = torch.bool)
    for i in range(n):
        for j in range(n):
            same_doc = owner[i][0] == owner[j][0]
            same_modality = owner[i][1] is not None and owner[i] == owner[j]
            mask[i, j] = same_doc and (j <= i or same_modality)
    return mask


def reference_attention(q, k, v, mask):
    """(N, heads, dim_head) x 3 and an (N, N) mask -> (N, heads, dim_head), by the textbook formula."""
    scores = torch.einsum('ihd,jhd->hij', q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float('-inf'))
    return torch.einsum('hij,jhd->ihd', scores.softmax(dim = -1), v)
