import random
import warnings

import pytest
import torch

from transfusion_pytorch.attention import attend
from transfusion_pytorch.masks import build_layout, flex_layout, padded_layout, per_sample_layout

from reference import reference_attention, reference_mask
from test_packing import packed_from
from conftest import random_batch


def qkv(n, heads = 2, dim_head = 8):
    return tuple(torch.randn(n, heads, dim_head, dtype = torch.float64) for _ in range(3))


@pytest.mark.parametrize('layout', [padded_layout, per_sample_layout])
@pytest.mark.parametrize('seed', range(10))
def test_sdpa_agrees_with_reference(seed, layout):
    packed = packed_from(random_batch(random.Random(seed)))
    q, k, v = qkv(packed.num_tokens)
    expected = reference_attention(q, k, v, reference_mask(packed))
    out = attend(q, k, v, layout(packed))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize('layout', [padded_layout, per_sample_layout])
def test_sdpa_text_only_agrees_with_reference(layout):
    packed = packed_from([[torch.tensor([1, 2, 3, 4])], [torch.tensor([5])], [torch.tensor([6, 7])]])
    q, k, v = qkv(packed.num_tokens)
    torch.testing.assert_close(attend(q, k, v, layout(packed)), reference_attention(q, k, v, reference_mask(packed)))


def test_samples_of_unequal_lengths_are_attended_one_by_one():
    """Padding to the longest sample would nearly double the work here: each sample is
    attended by itself, with no mask where it holds text only."""
    packed = packed_from([[torch.arange(12)], [torch.tensor([1]), (0, torch.randn(2, 6)), torch.tensor([2])], [torch.tensor([3, 4])]])
    layout = build_layout(packed)
    assert layout.samples is not None and [(s.start, s.end) for s in layout.samples] == [(0, 14), (14, 24), (24, 28)]
    assert layout.samples[0].mask is None and layout.samples[1].mask is not None and layout.samples[2].mask is None
    equal = packed_from([[torch.arange(5)], [torch.arange(5)]])
    assert build_layout(equal).samples is None                  # no padding to save: one padded call


@pytest.mark.parametrize('seed', range(3))
def test_flex_agrees_with_reference(seed):
    packed = packed_from(random_batch(random.Random(seed)))
    q, k, v = (t.float() for t in qkv(packed.num_tokens))
    expected = reference_attention(q, k, v, reference_mask(packed))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')     # flex attention warns that it runs uncompiled on CPU
        out = attend(q, k, v, flex_layout(packed))
    torch.testing.assert_close(out, expected, atol = 1e-5, rtol = 1e-4)


def test_backends_give_the_same_gradients():
    packed = packed_from(random_batch(random.Random(11)))
    q, k, v = (t.float().requires_grad_() for t in qkv(packed.num_tokens))
    grads = []
    for layout in (padded_layout(packed), per_sample_layout(packed), None):
        out = attend(q, k, v, layout) if layout is not None else reference_attention(q, k, v, reference_mask(packed))
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for padded, per_sample, reference in zip(*grads):
        torch.testing.assert_close(padded, reference, atol = 1e-5, rtol = 1e-4)
        torch.testing.assert_close(per_sample, reference, atol = 1e-5, rtol = 1e-4)


@pytest.mark.parametrize('softcap', [None, 5.])
@pytest.mark.parametrize('layout', [padded_layout, per_sample_layout, flex_layout])
def test_grouped_query_attention_equals_repeated_key_value_heads(layout, softcap):
    """kv_heads key / value heads, each shared by heads / kv_heads consecutive query heads (the
    Llama / Qwen convention): the same as repeating each of them for its group."""
    packed = packed_from(random_batch(random.Random(4)))
    q, (k, v) = qkv(packed.num_tokens, heads = 4)[0], qkv(packed.num_tokens, heads = 2)[:2]
    q, k, v = (t.float() for t in (q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        grouped = attend(q, k, v, layout(packed), softcap = softcap)
        repeated = attend(q, k.repeat_interleave(2, dim = 1), v.repeat_interleave(2, dim = 1), layout(packed), softcap = softcap)
    torch.testing.assert_close(grouped, repeated, atol = 1e-5, rtol = 1e-4)
    if softcap is None:
        torch.testing.assert_close(grouped, reference_attention(q, k.repeat_interleave(2, dim = 1), v.repeat_interleave(2, dim = 1),
                                                                reference_mask(packed)), atol = 1e-5, rtol = 1e-4)


def test_per_sample_attention_backward_concatenates_once():
    """Each sample's queries, keys and values are pieces of one split, so the backward pass
    concatenates their gradients once; a slice per sample would scatter each into a zero
    tensor the size of the whole sequence (samples x sequence of memory traffic per layer)."""
    packed = packed_from([[torch.arange(12)], [torch.tensor([1]), (0, torch.randn(2, 6)), torch.tensor([2])], [torch.tensor([3, 4])]])
    q, k, v = (t.float().requires_grad_() for t in qkv(packed.num_tokens))
    out = attend(q, k, v, per_sample_layout(packed))
    names, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    assert 'SplitWithSizesBackward0' in names
    assert not {'SliceBackward0', 'SelectBackward0'} & names, names
