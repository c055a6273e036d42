import pytest

from transfusion_pytorch.vocab import Vocab


@pytest.mark.parametrize('shape', [(), (1,), (8,), (8, 8), (12, 3, 107)])
def test_shape_round_trip(shape):
    vocab = Vocab(num_text_tokens = 5, num_modality_types = 2)
    tokens = vocab.encode_shape(shape)
    assert all(vocab.digit0 <= t <= vocab.sep for t in tokens)
    assert vocab.decode_shape(tokens) == shape


def test_invalid_shapes_decode_to_none():
    vocab = Vocab(num_text_tokens = 5, num_modality_types = 1)
    digit = lambda d: vocab.digit0 + d
    assert vocab.decode_shape([vocab.sep]) is None                       # empty axes
    assert vocab.decode_shape([digit(0)]) is None                        # zero-sized axis
    assert vocab.decode_shape([digit(0), digit(4)]) is None              # leading zero
    assert vocab.decode_shape([digit(4), vocab.sep]) is None             # trailing separator
    assert vocab.decode_shape([digit(4), 2]) is None                     # a text token
    assert vocab.decode_shape([digit(4), vocab.bom(0)]) is None


def test_ids_are_distinct_and_typed():
    vocab = Vocab(num_text_tokens = 7, num_modality_types = 3)
    special = [vocab.sos, vocab.eos, vocab.meta, *range(vocab.digit0, vocab.sep + 1)]
    special += [vocab.bom(m) for m in range(3)] + [vocab.eom(m) for m in range(3)]
    assert len(set(special)) == len(special) == vocab.size - 7
    assert min(special) == 7 and max(special) == vocab.size - 1
    for m in range(3):
        assert vocab.is_bom(vocab.bom(m)) and not vocab.is_eom(vocab.bom(m))
        assert vocab.is_eom(vocab.eom(m)) and not vocab.is_bom(vocab.eom(m))
        assert vocab.modality_type_of(vocab.bom(m)) == vocab.modality_type_of(vocab.eom(m)) == m
