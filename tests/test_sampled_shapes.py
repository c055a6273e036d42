"""Shapes that the model writes while sampling, and the shapes that a call asks for, with and
without learned down / up blocks (`pre_post_transformer_enc_dec`): a shape that cannot be used
falls back to the default with a warning, or ends the row; never a crash of the batch, never a
huge allocation. The model writes what a script makes it write (`Scripted` pushes its logits)."""

import re
import warnings

import pytest
import torch
from torch import nn

from transfusion_pytorch import Transfusion
from transfusion_pytorch.pre_post import PrePost

from conftest import DIM_LATENTS
from test_generation import run, untrained_but_not_trivial

pytestmark = pytest.mark.usefixtures('one_thread')

DIM_IMAGE = 8


def image_model(default_shape = (4, 4), **kwargs) -> Transfusion:
    """The issue's model: one channel-first image type whose learned blocks halve each axis."""
    torch.manual_seed(0)
    return Transfusion(num_text_tokens = 16, dim_latent = DIM_IMAGE, channel_first_latent = True, modality_default_shape = default_shape,
                       transformer = dict(dim = 32, depth = 1, dim_head = 16, heads = 2),
                       pre_post_transformer_enc_dec = (nn.Conv2d(DIM_IMAGE, 32, 2, stride = 2), nn.ConvTranspose2d(32, DIM_IMAGE, 2, stride = 2)),
                       **kwargs).eval()


def writes(model, shape_text: str, modality_type: int = 0, before = (3,), after = (5,)) -> list:
    """A script: text, META, the shape tokens of `shape_text`, BOM; then text and EOS."""
    vocab = model.vocab
    return [*before, vocab.meta, *vocab.encode_shape_text(shape_text), vocab.bom(modality_type), None, *after, vocab.eos]


def kinds(sample) -> list:
    """'text' or ('modality', type, the modality's full shape) per element."""
    return [('modality', x[0], tuple(x[1].shape)) if isinstance(x, tuple) else 'text' for x in sample]


def sample_quietly(*args, **kwargs) -> tuple[list, list[str]]:
    with warnings.catch_warnings(record = True) as caught:
        warnings.simplefilter('always')
        samples = run(*args, **kwargs)
    return samples, [str(w.message) for w in caught]


# item 1: a written shape that the down / up blocks cannot take

@pytest.mark.parametrize('shape_text, why', [
    ('3,3', r'its up block restores its tokens of shape \(1, 1\) as \(2, 2\)'),
    ('1,1', "its down block fails on it .*Kernel size can't be greater than actual input size"),
    ('99999999,99999999', r'as \(99999998, 99999998\)'),       # 3e17 bytes, were it allocated
    ('100000000,100000000', 'a shape that does not fit'),    # round-trips, far too long
])
def test_a_written_shape_the_blocks_cannot_take_falls_back(shape_text, why):
    model = image_model()
    scripts = [writes(model, shape_text), writes(model, '2,4')]
    for use_cache in (True, False):
        (bad, good), messages = sample_quietly(model, [None, None], scripts, max_length = 40, use_cache = use_cache)
        assert kinds(bad) == ['text', ('modality', 0, (DIM_IMAGE, 4, 4)), 'text']        # the default shape, channel first
        assert bad[0].tolist() == [3] and bad[2].tolist() == [5]
        assert kinds(good) == ['text', ('modality', 0, (DIM_IMAGE, 2, 4)), 'text']       # the other row is untouched
        assert len(messages) == 1 and 'using modality_default_shape (4, 4)' in messages[0]
        assert re.search(why, messages[0]), messages[0]


def test_the_issue_example_samples():
    # this model, free, writes (1890904444, 612200) first: 3.7e16 bytes had the check run its down
    # block on a real latent; then shapes of the wrong number of axes, odd, or no shape at all
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens = 16, dim_latent = 8, channel_first_latent = True, modality_default_shape = (4, 4),
                        transformer = dict(dim = 32, depth = 2, dim_head = 16, heads = 2),
                        pre_post_transformer_enc_dec = (nn.Conv2d(8, 32, 2, stride = 2), nn.ConvTranspose2d(32, 8, 2, stride = 2)))
    with warnings.catch_warnings(record = True) as caught:
        warnings.simplefilter('always')
        sample = model.sample(seed = 7, max_length = 64, modality_steps = 1)
    assert kinds(sample) == ['text', *[('modality', 0, (8, 4, 4)), 'text'] * 3]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and 'a shape that does not fit (1890904444, 612200)' in messages[0]


def test_an_invalid_written_shape_is_an_error_with_the_fallback_off():
    model = image_model(fallback_to_default_shape_if_invalid = False)
    with pytest.raises(ValueError, match = r'invalid shape \(3, 3\) for modality type 0 \(its up block restores .*\), and fallback_to_default_shape_if_invalid is off'):
        run(model, [None], [writes(model, '3,3')], max_length = 40)


def test_shapes_are_probed_once_without_allocating_or_changing_buffers():
    encoder = nn.Sequential(nn.Conv2d(DIM_IMAGE, 32, 2, stride = 2), nn.BatchNorm2d(32))
    pre_post = PrePost(encoder, nn.ConvTranspose2d(32, DIM_IMAGE, 2, stride = 2), DIM_IMAGE, 32, channel_first = True, modality_type = 0)
    calls = []
    encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].device.type))
    pre_post.train()

    assert pre_post.round_trip_problem((10 ** 8, 10 ** 8)) is None         # 3e17 bytes as a real latent
    assert pre_post.round_trip_problem((3, 5)) == 'its up block restores its tokens of shape (1, 2) as (2, 4)'
    assert pre_post.token_shape((10 ** 8, 10 ** 8)) == (5 * 10 ** 7, 5 * 10 ** 7)
    assert pre_post.round_trip_problem((3, 5)) is not None and pre_post.token_shape((4, 6)) == (2, 3)
    assert calls == ['meta', 'meta', 'meta']                                # once per shape, on the meta device
    assert torch.equal(encoder[1].running_mean, torch.zeros(32)) and int(encoder[1].num_batches_tracked) == 0


def test_a_block_that_cannot_run_on_meta_is_probed_for_real_when_small():
    class ReadsValues(nn.Module):           # .item() has no meta implementation
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(DIM_IMAGE, 32, 2, stride = 2)

        def forward(self, x):
            return self.conv(x) * (1. + 0. * x.sum().item())

    pre_post = PrePost(ReadsValues(), nn.ConvTranspose2d(32, DIM_IMAGE, 2, stride = 2), DIM_IMAGE, 32, channel_first = True, modality_type = 0)
    assert pre_post.round_trip_problem((4, 6)) is None and pre_post.token_shape((4, 6)) == (2, 3)
    assert 'too large to probe for real' in pre_post.round_trip_problem((10 ** 5, 10 ** 5))


def test_a_shape_asked_for_that_the_blocks_cannot_take_is_an_error_at_the_call():
    model = image_model()
    vocab = model.vocab
    cases = [
        (dict(force_modality_at_start = (0, (3, 3))), r'force_modality_at_start: a modality of type 0 cannot be generated with the shape \(3, 3\): its up block'),
        (dict(fixed_modality_shape = (5, 5)), r'fixed_modality_shape \(5, 5\) suits no modality type: for type 0, its up block'),
        (dict(force_modality_at_start = 0, fixed_modality_shape = (5, 5)), r'fixed_modality_shape: a modality of type 0 cannot be generated with the shape \(5, 5\)'),
        (dict(prompt = [torch.tensor([vocab.meta, *vocab.encode_shape((1, 1)), vocab.bom(0)])]), r'the prompt: a modality of type 0 cannot be generated with the shape \(1, 1\): its down block fails'),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match = message):
            model.sample(max_length = 8, **options)
    with pytest.raises(ValueError, match = r'fixed_modality_shape: a modality of type 0 cannot be generated with the shape \(3, 3\)'):
        model.generate_modality_only(fixed_modality_shape = (3, 3))
    with pytest.raises(ValueError, match = r'modality_default_shape: a modality of type 0 cannot be generated with the shape \(3, 5\)'):
        image_model(default_shape = (3, 5)).sample(max_length = 8, force_modality_at_start = 0)


# item 8: no default shape to fall back to

def test_a_row_whose_shape_cannot_be_used_ends_and_the_batch_goes_on():
    # type 0: any number of axes, no default shape; type 1: 2 axes, no default shape
    model = untrained_but_not_trivial(modality_num_dim = (None, 2), modality_default_shape = None)
    vocab = model.vocab
    scripts = [
        [4, vocab.meta, vocab.digit0, vocab.digit0 + 3, vocab.bom(0), None, 7, vocab.eos],     # '03': no shape
        writes(model, '2', modality_type = 1),                                              # one axis for a type of two
        writes(model, '2,3', modality_type = 0),                                            # usable
        writes(model, '99,99', modality_type = 1),                                          # does not fit
    ]
    samples, messages = sample_quietly(model, [None] * 4, scripts, max_length = 24)
    assert [kinds(s) for s in samples] == [['text'], ['text'], ['text', ('modality', 0, (2, 3, DIM_LATENTS[0])), 'text'], ['text']]
    assert [s[0].tolist() for s in samples] == [[4], [3], [3], [3]]        # the unfinished header dropped
    assert len(messages) == 3 and all('the row ends there, as modality_default_shape cannot stand in (it has none)' in m for m in messages)
    assert 'a shape that does not fit (99, 99)' in messages[2]

    model.config = model.config.__class__(**{**model.config.__dict__, 'fallback_to_default_shape_if_invalid': False})
    with pytest.raises(ValueError, match = 'fallback_to_default_shape_if_invalid is off'):
        run(model, [None], scripts[:1], max_length = 24)


def test_a_default_shape_the_blocks_cannot_take_ends_the_row():
    model = image_model(default_shape = (3, 5))
    (sample, other), messages = sample_quietly(model, [None, None], [writes(model, '1,1'), writes(model, '2,2')], max_length = 24)
    assert kinds(sample) == ['text'] and kinds(other) == ['text', ('modality', 0, (DIM_IMAGE, 2, 2)), 'text']
    assert len(messages) == 1 and 'modality_default_shape cannot stand in (its up block restores' in messages[0]


def test_a_written_shape_needing_more_noise_than_given_falls_back():
    model = untrained_but_not_trivial()
    noise = torch.randn(2, 2, DIM_LATENTS[1])
    (sample,), messages = sample_quietly(model, [None], [writes(model, '3,3', modality_type = 1)], max_length = 40, init_modality_noise = noise)
    assert kinds(sample) == ['text', ('modality', 1, (2, 2, DIM_LATENTS[1])), 'text']
    assert len(messages) == 1 and 'init_modality_noise of shape (2, 2, 4) holds too little noise for it' in messages[0]


# item 9: a fixed shape counts the tokens after the down block

def test_fixed_modality_shape_counts_tokens_after_the_down_block():
    model = image_model()
    vocab = model.vocab
    # META, '4,4' (3 tokens), BOM, 2 x 2 tokens, EOM: 10 tokens (16 latent cells)
    (sample,), messages = sample_quietly(model, [None], [[vocab.meta, vocab.bom(0), None, 3]], max_length = 10, fixed_modality_shape = (4, 4))
    assert kinds(sample) == ['text', ('modality', 0, (DIM_IMAGE, 4, 4)), 'text'] and messages == []
    (short,), _ = sample_quietly(model, [None], [[vocab.meta, vocab.bom(0), None, 3]], max_length = 9, fixed_modality_shape = (4, 4))
    assert kinds(short) == ['text'] and short[0].tolist() == []


def test_fixed_modality_shape_starts_only_the_types_it_suits():
    model = untrained_but_not_trivial()         # type 0: 1 axis, type 1: 2 axes
    vocab = model.vocab
    (sample,), messages = sample_quietly(model, [None], [[vocab.meta, vocab.bom(0), None, 3, vocab.eos]], max_length = 40, fixed_modality_shape = (3, 1))
    assert kinds(sample) == ['text', ('modality', 1, (3, 1, DIM_LATENTS[1])), 'text'] and messages == []      # BOM_0 was pushed, BOM_1 is the only choice
    with pytest.raises(ValueError, match = r'fixed_modality_shape \(1, 1, 1\) suits no modality type: for type 0, modality type 0 takes 1 axis'):
        model.sample(max_length = 8, fixed_modality_shape = (1, 1, 1))


def test_training_names_an_encoder_that_fails_on_a_latent():
    model = image_model()
    with pytest.raises(ValueError, match = r"the pre-transformer encoder of modality type 0 fails on a latent of shape \(1, 1\): RuntimeError: .*Kernel size can't be greater"):
        model([[torch.tensor([1]), (0, torch.randn(DIM_IMAGE, 1, 1))]])
