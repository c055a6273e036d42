import random

import pytest
import torch

from transfusion_pytorch.masks import dense_mask, padded_layout

from reference import reference_mask
from test_packing import packed_from
from conftest import random_batch


@pytest.mark.parametrize('seed', range(25))
def test_dense_mask_equals_reference(seed):
    packed = packed_from(random_batch(random.Random(seed)))
    assert torch.equal(dense_mask(packed), reference_mask(packed))


@pytest.mark.parametrize('seed', range(25))
def test_padded_mask_equals_reference(seed):
    packed = packed_from(random_batch(random.Random(seed)))
    layout = padded_layout(packed)
    reference = reference_mask(packed)

    for doc in range(packed.batch_size):
        start, end = packed.cu_seqlens[doc], packed.cu_seqlens[doc + 1]
        length = int(end - start)
        block = reference[start:end, start:end]
        if layout.mask is None:     # no modality in the batch: causal
            expected_causal = torch.ones(length, length, dtype = torch.bool).tril()
            assert torch.equal(block, expected_causal)
        else:
            assert torch.equal(layout.mask[doc, 0, :length, :length], block)
            # real queries never see padding
            assert not layout.mask[doc, 0, :length, length:].any()


def test_padded_layout_round_trips_tokens():
    packed = packed_from(random_batch(random.Random(3), max_samples = 4))
    layout = padded_layout(packed)
    values = torch.arange(packed.num_tokens)
    padded = values if layout.gather is None else values[layout.gather]
    back = padded if layout.scatter is None else padded[layout.scatter]
    assert torch.equal(back, values)


def test_no_mask_for_text_only_batches():
    packed = packed_from([[torch.tensor([1, 2, 3])], [torch.tensor([4])]])
    layout = padded_layout(packed)
    assert layout.mask is None and layout.gather is not None


def test_flex_mask_mod_equals_reference():
    pytest.importorskip('torch.nn.attention.flex_attention')
    from transfusion_pytorch.masks import flex_layout
    packed = packed_from(random_batch(random.Random(7)))
    block_mask = flex_layout(packed).block_mask
    n = packed.num_tokens
    q_idx, kv_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    zero = torch.zeros((), dtype = torch.long)
    assert torch.equal(block_mask.mask_mod(zero, zero, q_idx, kv_idx), reference_mask(packed))
