"""`sample(max_length = N)` never returns a sequence longer than N tokens, counted as its
docstring defines them: SOS, the prompt, structure tokens (META, shape, BOM, EOM, EOS) and
latent tokens included. (The reference package returns one token more.)"""

import pytest
import torch

from transfusion_pytorch import generation
from transfusion_pytorch.backends import sequence_length

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, tiny_model

PROMPTS = dict(
    none = None,
    empty = [],
    one_token = [torch.tensor([3])],
    modality = [(0, torch.randn(2, DIM_LATENTS[0]))],
)


@pytest.fixture(scope = 'module')
def model():
    torch.manual_seed(0)
    model = tiny_model(transformer = dict(dim = 16, depth = 1, dim_head = 8, heads = 2, dim_time = 16))
    with torch.no_grad():       # an untrained model that still writes META, shapes and EOS now and then
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def returned_length(model, sample) -> int:
    """The length of a returned sample as `pack` lays it out, less the EOS it appends."""
    return model.pack([sample]).num_tokens - 1


@pytest.mark.parametrize('prompt', list(PROMPTS))
@pytest.mark.parametrize('max_length', [2, 3, 6, 13, 30])
def test_sample_never_exceeds_max_length(model, prompt, max_length, monkeypatch):
    prompt_length = model.pack([PROMPTS[prompt]]).num_tokens - 2 if PROMPTS[prompt] else 0     # less SOS and EOS
    if 1 + prompt_length > max_length:
        pytest.skip('the prompt alone is longer than max_length (an error, tested in test_inputs.py)')

    sequences = []
    original = generation.to_output
    def spy(model, items, return_latents):
        sequences.append(list(items))
        return original(model, items, return_latents)
    monkeypatch.setattr(generation, 'to_output', spy)

    samples = model.sample([PROMPTS[prompt] or []] * 6, max_length = max_length, seed = 0, modality_steps = 1, text_min_p = None)

    for items, sample in zip(sequences, samples):
        assert sequence_length(items) <= max_length, items                # SOS, prompt, generated, EOS if sampled
        assert returned_length(model, sample) <= max_length
    assert any(sequence_length(items) == max_length for items in sequences) or max_length > 6     # the bound is reached


def test_sample_with_forced_and_fixed_shape_modalities_fits(model):
    for max_length in (11, 12, 15, 20):     # the forced modality takes 11: SOS, META 2 , 2 BOM, 4 latents, EOM
        samples = model.sample(batch_size = 4, max_length = max_length, seed = 1, modality_steps = 1,
                               force_modality_at_start = (1, (2, 2)), fixed_modality_shape = (2, 2), text_min_p = None)
        for sample in samples:
            assert returned_length(model, sample) <= max_length


def test_generate_text_only_returns_exactly_the_tokens_asked_for(model):
    prompt = torch.randint(0, NUM_TEXT_TOKENS, (2, 3))
    for seq_len in (3, 4, 10):
        out = model.generate_text_only(prompt, seq_len, seed = 0)
        assert out.shape == (2, seq_len - 3)
