"""Helpers shared by tests that look at what autograd keeps."""

import torch


def saved_storage_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
