"""`sample(max_length = N)`: N is the budget of tokens generated after the prompt, the public
package's meaning, and it is never exceeded (the public package returns one token more, and
finishes a modality past it). Generated tokens are all the tokens a row grows by: text, EOS,
and each modality's META, shape, BOM, latent and EOM tokens. What the caller asks for is
outside the budget and always generated: the prompt, however long, and a modality the prompt
opens or `force_modality_at_start` asks for. `max_total_length` bounds the whole row. The KV
cache holds the longest request and the budget."""

import pytest
import torch

from transfusion_pytorch import generation
from transfusion_pytorch.backends import sequence_length
from transfusion_pytorch.generation import make_backend
from transfusion_pytorch.sampler import SampleOptions, requested_length, start_items
from transfusion_pytorch.prompts import normalize

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, tiny_model

PROMPTS = dict(
    none = None,
    empty = [],
    one_token = [torch.tensor([3])],
    modality = [(0, torch.randn(2, DIM_LATENTS[0]))],
    long = [torch.randint(0, NUM_TEXT_TOKENS, (60,)), (1, torch.randn(3, 3, DIM_LATENTS[1]))],
)


@pytest.fixture(scope = 'module')
def model():
    torch.manual_seed(0)
    model = tiny_model(transformer = dict(dim = 16, depth = 1, dim_head = 8, heads = 2, dim_time = 16))
    with torch.no_grad():       # an untrained model that still writes META, shapes and EOS now and then
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def prompt_length(model, prompt, **options) -> int:
    """SOS, the prompt and any modality asked for, as the sampler lays them out."""
    return requested_length(model, *start_items(model, normalize(model, prompt, 'prompt'), SampleOptions(**options)))


def sampled_sequences(model, monkeypatch, *args, **kwargs) -> list:
    """The item sequences behind `model.sample(...)`, as the sampler built them."""
    sequences = []
    original = generation.to_output
    def spy(model, items, return_latents):
        sequences.append(list(items))
        return original(model, items, return_latents)
    monkeypatch.setattr(generation, 'to_output', spy)
    model.sample(*args, **kwargs)
    return sequences


@pytest.mark.parametrize('prompt', list(PROMPTS))
@pytest.mark.parametrize('max_length', [1, 2, 3, 6, 13, 30])
def test_sample_never_exceeds_max_length(model, prompt, max_length, monkeypatch):
    sequences = sampled_sequences(model, monkeypatch, [PROMPTS[prompt] or []] * 6, max_length = max_length, seed = 0,
                                  modality_steps = 1, text_min_p = None)
    generated = [sequence_length(items) - prompt_length(model, PROMPTS[prompt]) for items in sequences]
    # EOS included, when sampled; 0 where the model wrote META first and the row ended before its
    # modality fitted (the unfinished header is dropped)
    assert all(0 <= n <= max_length for n in generated), generated
    assert max(generated) == max_length or max_length > 6              # the bound is reached


def test_long_prompt_is_never_an_error(model, monkeypatch):
    # the case: a prompt longer than max_length (captioning an image with a short budget)
    image = (1, torch.randn(4, 4, DIM_LATENTS[1]))
    for prompt in ([image], [torch.randint(0, NUM_TEXT_TOKENS, (100,))]):
        sequences = sampled_sequences(model, monkeypatch, prompt, max_length = 3, seed = 0, text_min_p = None)
        assert 0 <= sequence_length(sequences[0]) - prompt_length(model, prompt) <= 3
        monkeypatch.undo()
    sample = model.sample(prompt = image, max_length = 3, seed = 0, text_min_p = None)
    assert torch.equal(sample[1][1], image[1]) and len(sample[2]) <= 3      # [empty text, the image, its caption]


@pytest.mark.parametrize('max_total_length', [20, 25, 40])
def test_max_total_length_bounds_the_whole_row(model, max_total_length, monkeypatch):
    prompts = [[], PROMPTS['one_token'], [torch.randint(0, NUM_TEXT_TOKENS, (18,))]]
    sequences = sampled_sequences(model, monkeypatch, prompts, max_length = 10, max_total_length = max_total_length,
                                  seed = 0, modality_steps = 1, text_min_p = None)
    for prompt, items in zip(prompts, sequences):
        start = prompt_length(model, prompt)
        assert sequence_length(items) <= min(start + 10, max_total_length)
    with pytest.raises(ValueError, match = r'max_total_length = 5 is less than the 19 tokens that prompt 2 asks for'):
        model.sample(prompts, max_total_length = 5)
    with pytest.raises(ValueError, match = r'max_total_length = 28 is less than the 29 tokens that prompt 2 asks for'):
        model.sample(prompts, max_total_length = 28, force_modality_at_start = (1, (2, 2)))       # 19 + 10


@pytest.mark.parametrize('max_length', [0, 1, 4, 9])
def test_the_modality_asked_for_is_outside_the_budget(model, max_length, monkeypatch):
    # force_modality_at_start: its 10 tokens (META 2 , 2 BOM, 4 latents, EOM) are always generated,
    # and max_length more at most after them
    options = dict(max_length = max_length, seed = 1, modality_steps = 1, text_min_p = None)
    forced = dict(force_modality_at_start = (1, (2, 2)), fixed_modality_shape = (2, 2))
    sequences = sampled_sequences(model, monkeypatch, [[]] * 4, **forced, **options)
    assert prompt_length(model, [], **forced) == 1 + 10
    for items in sequences:
        assert 0 <= sequence_length(items) - 11 <= max_length
    monkeypatch.undo()
    for sample in model.sample(batch_size = 4, **forced, **options):
        assert isinstance(sample[1], tuple) and sample[1][1].shape == (2, 2, DIM_LATENTS[1])

    # the same for a prompt that opens a modality with its BOM (type 1, default shape (2, 2))
    bom = torch.tensor(model.som_ids[1])
    sample = model.sample([bom], **options)
    assert isinstance(sample[1], tuple) and sample[1][1].shape == (2, 2, DIM_LATENTS[1])
    assert model.pack([sample]).num_tokens - 2 - 10 <= max_length         # less SOS and EOS
    if max_length == 0:
        assert len(sample) == 3 and len(sample[0]) == len(sample[2]) == 0


def test_kv_cache_holds_the_longest_prompt_and_the_budget(model):
    prompts = [normalize(model, p, 'prompt') for p in (PROMPTS['long'], PROMPTS['one_token'])]
    longest = prompt_length(model, PROMPTS['long'])
    forced = dict(force_modality_at_start = (1, (2, 2)))
    for options, capacity in [
        (dict(max_length = 7), longest + 7),
        (dict(max_length = 7, max_total_length = longest + 3), longest + 3),
        (dict(max_length = 7, **forced), longest + 10 + 7),
    ]:
        backend = make_backend(model, prompts, SampleOptions(cfg_scale = 1., **options))
        assert backend.cache.max_len == capacity
        guided = make_backend(model, prompts, SampleOptions(cfg_scale = 3., **options))      # both branches' caches
        assert guided.cond.cache.max_len == guided.uncond.cache.max_len == capacity


def test_generate_text_only_returns_exactly_the_tokens_asked_for(model):
    prompt = torch.randint(0, NUM_TEXT_TOKENS, (2, 3))
    for seq_len in (3, 4, 10):
        out = model.generate_text_only(prompt, seq_len, seed = 0)
        assert out.shape == (2, seq_len - 3)
