import random

import pytest
import torch

from transfusion_pytorch.inputs import ModalitySpec, normalize_samples
from transfusion_pytorch.packing import IGNORE, pack, unpack
from transfusion_pytorch.vocab import Vocab

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, random_batch

VOCAB = Vocab(NUM_TEXT_TOKENS, len(DIM_LATENTS))
SPECS = tuple(ModalitySpec(d) for d in DIM_LATENTS)


def packed_from(batch):
    return pack(normalize_samples(batch, NUM_TEXT_TOKENS, SPECS), VOCAB)


def as_pairs(sample):
    return [element if isinstance(element, tuple) else ('text', element) for element in sample]


@pytest.mark.parametrize('seed', range(20))
def test_unpack_returns_the_inputs(seed):
    batch = random_batch(random.Random(seed))
    unpacked = unpack(packed_from(batch))

    assert len(unpacked) == len(batch)
    for original, restored in zip(batch, unpacked):
        assert len(original) == len(restored)
        for (kind_a, a), (kind_b, b) in zip(as_pairs(original), as_pairs(restored)):
            assert kind_a == kind_b
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_layout_of_one_sample():
    text, image = torch.tensor([3, 4]), torch.randn(2, 3, DIM_LATENTS[1])
    packed = packed_from([[text, (1, image), torch.tensor([5])]])
    v = VOCAB

    expected_tokens = [v.sos, 3, 4, v.meta, v.digit0 + 2, v.sep, v.digit0 + 3, v.bom(1), *[0] * 6, v.eom(1), 5, v.eos]
    assert packed.tokens.tolist() == expected_tokens

    # every latent token shares one rotary position; positions go on after the span
    assert packed.position.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, *[8] * 6, 9, 10, 11]
    assert packed.span.tolist() == [-1] * 8 + [0] * 6 + [-1] * 3
    assert packed.modality_type.tolist() == [-1] * 8 + [1] * 6 + [-1] * 3

    # text targets: text, META, shape digits, BOM and EOS are predicted; latents and EOM are not
    targets = packed.text_target.tolist()
    assert targets[:7] == expected_tokens[1:8]
    assert targets[7:14] == [IGNORE] * 7             # BOM -> first latent, latents -> next latent / EOM
    assert targets[14:16] == [5, v.eos]              # EOM -> text, text -> EOS
    assert targets[16] == IGNORE                     # nothing after EOS

    assert torch.equal(packed.latents[1], image.reshape(6, -1))
    assert packed.latent_index[1].tolist() == list(range(8, 14))
    assert packed.latent_coords[1].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_targets_never_cross_samples():
    batch = [[torch.tensor([1, 2])], [torch.tensor([3])]]
    packed = packed_from(batch)
    v = VOCAB
    assert packed.tokens.tolist() == [v.sos, 1, 2, v.eos, v.sos, 3, v.eos]
    assert packed.text_target.tolist() == [1, 2, v.eos, IGNORE, 3, v.eos, IGNORE]
    assert packed.doc.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert packed.cu_seqlens.tolist() == [0, 4, 7]


def test_span_bookkeeping():
    batch = [[(0, torch.randn(3, 6)), torch.tensor([1]), (1, torch.randn(1, 2, 4))], [(1, torch.randn(2, 2, 4))]]
    packed = packed_from(batch)
    assert packed.span_type.tolist() == [0, 1, 1]
    assert packed.span_doc.tolist() == [0, 0, 1]
    assert packed.span_rank.tolist() == [0, 1, 0]
    assert packed.span_length.tolist() == [3, 2, 4]
    for start, length, span_id in zip(packed.span_start.tolist(), packed.span_length.tolist(), range(3)):
        assert (packed.span[start:start + length] == span_id).all()
        assert (packed.span == span_id).sum() == length


def test_raw_text_rows_are_not_framed():
    rows = torch.randint(0, NUM_TEXT_TOKENS, (2, 5))
    packed = pack([[normalize_samples([[row]], NUM_TEXT_TOKENS, SPECS)[0][0]] for row in rows], VOCAB, wrap = False)
    assert torch.equal(packed.tokens, rows.reshape(-1))
    expected = torch.cat([torch.cat((row[1:], torch.tensor([IGNORE]))) for row in rows])
    assert torch.equal(packed.text_target, expected)
