"""A pretrained Hugging Face causal LM as the starting point (issue 14), against `transformers`
itself on tiny random Llama, Qwen2 and Qwen3 models (see lm_helpers.py for what each covers)."""

import json

import pytest
import torch

from transfusion_pytorch import Transfusion
from transfusion_pytorch.backends import CachedBackend
from transfusion_pytorch.rotary import inverse_frequencies
from transfusion_pytorch.training.trainer import param_groups

from lm_helpers import FAMILIES, VOCAB, build_language_model

transformers = pytest.importorskip('transformers')

DIM_LATENT = 6
OPTIONS = dict(dim_latent = DIM_LATENT, modality_default_shape = (3,))


@pytest.fixture(scope = 'module')
def language_models(tmp_path_factory):
    """family -> (folder, loaded transformers model)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    built = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        built[family] = (folder, build_language_model(family, folder))
    torch.set_num_threads(threads)
    return built


def text_rows(batch = 2, length = 40, seed = 1):
    """Random rows, longer than the 16 positions after which Llama 3 scaling changes frequencies."""
    return torch.randint(0, VOCAB, (batch, length), generator = torch.Generator().manual_seed(seed))


def mixed_batch(seed = 0):
    generator = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, VOCAB, (n,), generator = generator)
    return [
        [text(5), (0, torch.randn(3, DIM_LATENT, generator = generator)), text(4)],
        [(0, torch.randn(2, DIM_LATENT, generator = generator)), text(6)],
    ]


def assert_close_relative(ours, theirs, tolerance = 1e-4):
    error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert error <= tolerance, f'relative error {error:.2e}'


def text_logits(model, rows):
    with torch.no_grad():
        return model(rows, return_loss = False)[..., :VOCAB]


# the text behaves as the language model

@pytest.mark.parametrize('separate', [False, True])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_logits_equal_the_language_model(language_models, family, separate, one_thread):
    folder, hf = language_models[family]
    model = Transfusion.from_language_model(folder, separate_modality_weights = separate, **OPTIONS).eval()
    rows = text_rows()
    with torch.no_grad():
        expected = hf(rows).logits
    logits = model(rows, return_loss = False)
    assert logits.shape == (2, 40, model.vocab.size)
    assert_close_relative(logits[..., :VOCAB], expected)


def test_a_loaded_model_gives_the_same_model_as_its_folder(language_models, one_thread):
    folder, hf = language_models['qwen2']
    from_folder = Transfusion.from_language_model(folder, **OPTIONS)
    from_model = Transfusion.from_language_model(hf, **OPTIONS)
    for (name, a), (_, b) in zip(from_folder.state_dict().items(), from_model.state_dict().items()):
        if not name.startswith(('latent_to_model', 'model_to_velocity', 'pos_embs', 'transformer.to_time_embed')):
            assert torch.equal(a, b), name


@pytest.mark.parametrize('family', ['llama', 'qwen2'])
def test_a_model_built_in_memory_is_taken_by_its_class_name(family, one_thread):
    """`LlamaForCausalLM(LlamaConfig(...))`, never saved, has `config.architectures = None`."""
    from lm_helpers import COMMON
    config_name, model_name, options = FAMILIES[family]
    torch.manual_seed(0)
    hf = getattr(transformers, model_name)(getattr(transformers, config_name)(**COMMON, **options)).eval()
    assert not hf.config.architectures
    model = Transfusion.from_language_model(hf, **OPTIONS).eval()
    rows = text_rows()
    with torch.no_grad():
        expected = hf(rows).logits
    assert_close_relative(text_logits(model, rows), expected)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_greedy_decoding_matches_the_language_model(language_models, family, one_thread):
    folder, hf = language_models[family]
    model = Transfusion.from_language_model(folder, separate_modality_weights = family == 'qwen3', **OPTIONS)
    prompt = text_rows(3, 12)[:, 2:9]                   # sliced from a batch: not contiguous
    with torch.no_grad():
        expected = hf.generate(prompt, attention_mask = torch.ones_like(prompt), max_new_tokens = 20, do_sample = False, pad_token_id = 0)
    expected = expected[:, prompt.shape[1]:]
    cached = model.generate_text_only(prompt, 27, temperature = 0.)
    uncached = model.generate_text_only(prompt, 27, temperature = 0., use_cache = False)
    assert torch.equal(cached, expected), (cached, expected)
    assert torch.equal(uncached, expected)


def test_a_bfloat16_model_is_close_to_the_language_model(language_models, one_thread):
    folder, hf = language_models['llama']
    model = Transfusion.from_language_model(folder, dtype = torch.bfloat16, **OPTIONS)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    rows = text_rows()
    with torch.no_grad():
        expected = hf(rows).logits
    assert_close_relative(text_logits(model, rows).float(), expected, tolerance = 5e-2)


def test_the_kv_cache_holds_key_value_heads_only(language_models):
    model = Transfusion.from_language_model(language_models['qwen3'][0], **OPTIONS)
    cache = CachedBackend(model, batch_size = 2, max_len = 10).cache
    assert model.config.transformer.num_kv_heads == 1
    assert cache.keys.shape == (2, 2, 1, 11, 32)        # (depth, batch, kv heads, slots, head dim): 1 head, not 4


def test_llama3_rotary_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = LlamaConfig(hidden_size = 256, num_attention_heads = 2, rope_parameters = dict(
        rope_type = 'llama3', rope_theta = 500000., factor = 8., low_freq_factor = 1., high_freq_factor = 4.,
        original_max_position_embeddings = 8192))
    expected, _ = ROPE_INIT_FUNCTIONS['llama3'](config, 'cpu')
    scaling = dict(type = 'llama3', factor = 8., low_freq_factor = 1., high_freq_factor = 4., original_max_position_embeddings = 8192)
    ours = inverse_frequencies(128, 500000., scaling)
    assert torch.equal(ours, expected)
    assert not torch.equal(ours, inverse_frequencies(128, 500000.))     # the scaling changes some frequencies


# vocabulary

@pytest.mark.parametrize('family', ['llama', 'qwen2'])
@pytest.mark.parametrize('freeze', [False, True])
def test_structural_tokens_start_at_the_mean_row(language_models, family, freeze):
    folder, hf = language_models[family]
    model = Transfusion.from_language_model(folder, freeze_language_model = freeze, **OPTIONS)
    vocab = model.vocab
    assert vocab.num_text_tokens == VOCAB and vocab.sos == VOCAB        # text ids are the LM's, ours come after
    for ours, theirs in ((model.token_embed, hf.model.embed_tokens.weight), (model.to_logits, hf.lm_head.weight)):
        text_rows_, structural = ours.tables if freeze else (ours.weight[:VOCAB], ours.weight[VOCAB:])
        assert torch.equal(text_rows_, theirs)
        assert structural.shape[0] == vocab.size - VOCAB
        torch.testing.assert_close(structural, theirs.mean(dim = 0).expand_as(structural))
    assert model.to_logits.is_tied == (family == 'qwen2')


# training

@pytest.mark.parametrize('separate', [False, True])
def test_a_mixed_batch_trains(language_models, separate, one_thread):
    model = Transfusion.from_language_model(language_models['llama'][0], separate_modality_weights = separate, **OPTIONS)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1, decay_all = False), lr = 3e-3)
    batch, losses = mixed_batch(), []
    torch.manual_seed(0)
    for _ in range(25):
        loss, breakdown = model(batch, return_breakdown = True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append((loss.item(), sum(breakdown.flow).item()))
    assert losses[-1][0] < 0.7 * losses[0][0], losses
    assert sum(flow for _, flow in losses[-5:]) < sum(flow for _, flow in losses[:5]), losses


@pytest.mark.parametrize('separate', [False, True])
def test_a_frozen_language_model_keeps_its_text_behaviour(language_models, separate, one_thread):
    folder, hf = language_models['qwen3']
    model = Transfusion.from_language_model(folder, freeze_language_model = True, separate_modality_weights = separate, **OPTIONS)
    rows = text_rows(2, 12)
    before = text_logits(model, rows)
    initial = {name: value.clone() for name, value in model.state_dict().items()}

    groups = param_groups(model, 0.1, decay_all = False)
    optimizer = torch.optim.AdamW(groups, lr = 1e-2)
    for step in range(4):
        loss = model(mixed_batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert torch.equal(text_logits(model, rows), before)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    trained = {id(p) for group in groups for p in group['params']}
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None and id(p) not in trained and p not in optimizer.state, name
            assert torch.equal(p, initial[name]), name
    language_model = {id(p) for module in model.transformer.text_modules() for p in module.parameters()}
    language_model |= {id(model.token_embed.weight), id(model.to_logits.weight)}
    assert {id(p) for p in model.parameters() if not p.requires_grad} == language_model
    assert 'token_embed.weight' in frozen and 'transformer.blocks.0.attn.to_qkv.bias' in frozen
    moved = [name for name, value in model.state_dict().items() if not torch.equal(value, initial[name])]
    assert 'token_embed.structural' in moved and 'latent_to_model.0.weight' in moved
    if separate:
        assert 'transformer.blocks.1.attn.modality_to_qkv.weight' in moved and 'transformer.blocks.1.modality_ff.proj_in.weight' in moved
    else:
        assert 'transformer.blocks.1.attn_norm.to_modulation.weight' in moved
    assert torch.equal(model.generate_text_only(rows[:, :4], 12, temperature = 0.),
                       hf.generate(rows[:, :4], attention_mask = torch.ones_like(rows[:, :4]), max_new_tokens = 8, do_sample = False, pad_token_id = 0)[:, 4:])


# saving

@pytest.mark.parametrize('family, options', [
    ('qwen2', dict()),                                                          # tied head
    ('llama', dict(separate_modality_weights = True, freeze_language_model = True)),
])
def test_save_and_load_round_trip(language_models, family, options, tmp_path, one_thread):
    model = Transfusion.from_language_model(language_models[family][0], **options, **OPTIONS).eval()
    with torch.no_grad():
        for p in model.parameters():            # every weight apart from where loading puts it (modality copies, structural rows)
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path)
    loaded = Transfusion.from_pretrained(tmp_path).eval()

    assert loaded.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in model.parameters()]
    assert loaded.to_logits.is_tied == model.to_logits.is_tied
    if loaded.to_logits.is_tied:                # an EMA copy ties its own head to its own embedding
        ema = loaded.create_ema()
        assert ema.module.to_logits.tables[0] is ema.module.token_embed.weight
    torch.manual_seed(0)
    a = model(mixed_batch())
    torch.manual_seed(0)
    assert torch.equal(loaded(mixed_batch()), a)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_text_weights_export_back_to_transformers(language_models, family, tmp_path, one_thread):
    folder, hf = language_models[family]
    model = Transfusion.from_language_model(folder, separate_modality_weights = True, **OPTIONS)
    optimizer = torch.optim.AdamW(model.parameters(), lr = 1e-2)
    for step in range(2):                       # trained, so that the export is not the source again
        loss = model(mixed_batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.save_language_model(tmp_path, base_config = folder)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(exported) is type(hf)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['max_position_embeddings'] == hf.config.max_position_embeddings       # kept from the base config

    rows = text_rows()
    with torch.no_grad():
        theirs = exported(rows).logits
        source = hf(rows).logits
    assert_close_relative(text_logits(model, rows), theirs)
    assert not torch.allclose(theirs, source, atol = 1e-3)        # training moved them


# what is not supported, or does not match, is an error that says so

def edited_copy(folder, tmp_path, edit_config = None, edit_tensors = None):
    """A copy of a one-file LM folder, its config.json and tensors edited."""
    from safetensors.torch import load_file, save_file
    config = json.loads((folder / 'config.json').read_text())
    tensors = load_file(folder / 'model.safetensors')
    if edit_config:
        edit_config(config)
    if edit_tensors:
        edit_tensors(tensors)
    (tmp_path / 'config.json').write_text(json.dumps(config))
    save_file(tensors, tmp_path / 'model.safetensors')
    return tmp_path


@pytest.mark.parametrize('edit, error, message', [
    (lambda c: c.update(architectures = ['GPT2LMHeadModel']), ValueError, "unsupported architecture ['GPT2LMHeadModel']"),
    (lambda c: c.update(use_sliding_window = True, layer_types = ['sliding_attention'] * 2), ValueError, 'sliding-window attention is not supported'),
    (lambda c: c.update(rope_parameters = dict(rope_type = 'yarn', rope_theta = 1e6, factor = 4.)), ValueError, "rotary scaling is not supported, found 'yarn'"),
    (lambda c: c.update(hidden_act = 'gelu'), ValueError, "the activation is not supported, found 'gelu'"),
    (lambda c: c.update(intermediate_size = 81), ValueError, 'model.layers.0.mlp.gate_proj.weight (80, 64) (config implies (81, 64))'),
    (lambda c: c.update(num_hidden_layers = 3), ValueError, "missing ['model.layers.2.input_layernorm.weight'"),
])
def test_an_unsupported_or_mismatched_config_is_named(language_models, tmp_path, edit, error, message):
    folder = edited_copy(language_models['qwen2'][0], tmp_path, edit_config = edit)
    with pytest.raises(error) as caught:
        Transfusion.from_language_model(folder, **OPTIONS)
    assert message in str(caught.value)


def test_missing_or_extra_tensors_are_named(language_models, tmp_path):
    def drop_and_add(tensors):
        del tensors['model.layers.1.self_attn.k_proj.bias']
        tensors['model.layers.0.mlp.extra.weight'] = torch.zeros(2)
    folder = edited_copy(language_models['qwen2'][0], tmp_path, edit_tensors = drop_and_add)
    with pytest.raises(ValueError, match = r"does not match its config.json: missing \['model.layers.1.self_attn.k_proj.bias'\], "
                                           r"unexpected \['model.layers.0.mlp.extra.weight'\]"):
        Transfusion.from_language_model(folder, **OPTIONS)


def test_bad_sources_and_options_are_named(language_models, tmp_path):
    folder = language_models['qwen2'][0]
    with pytest.raises(FileNotFoundError, match = 'has no config.json'):
        Transfusion.from_language_model(tmp_path, **OPTIONS)
    (tmp_path / 'config.json').write_text((folder / 'config.json').read_text())
    (tmp_path / 'pytorch_model.bin').write_bytes(b'')
    with pytest.raises(FileNotFoundError, match = r"neither model.safetensors nor model.safetensors.index.json .* found \['config.json', 'pytorch_model.bin'\]"):
        Transfusion.from_language_model(tmp_path, **OPTIONS)
    with pytest.raises(TypeError, match = 'expected a folder written by save_pretrained or a loaded transformers PreTrainedModel, got int'):
        Transfusion.from_language_model(3, **OPTIONS)
    with pytest.raises(ValueError, match = r'the language model sets transformer.heads; only dropout, attn_dropout, use_flex_attn, dim_time may be given'):
        Transfusion.from_language_model(folder, transformer = dict(heads = 2), **OPTIONS)
    with pytest.raises(ValueError, match = r"num_text_tokens is the language model's vocab_size \(96\), got 10"):
        Transfusion.from_language_model(folder, num_text_tokens = 10, **OPTIONS)


def test_only_a_language_model_shape_exports(tmp_path):
    from conftest import tiny_model
    with pytest.raises(ValueError, match = r'a language model has none of unet_skips, unit_offset_norms, attn_gate_values; this model sets unet_skips = True'):
        tiny_model().save_language_model(tmp_path)
    assert not (tmp_path / 'config.json').exists()


@pytest.mark.parametrize('options, message', [
    (dict(heads = 4, kv_heads = 3), 'transformer.kv_heads must divide heads = 4, got 3'),
    (dict(kv_heads = 0), 'transformer.kv_heads must be a positive int or None, got 0'),
    (dict(dim_ff_hidden = 1.5), 'transformer.dim_ff_hidden must be a positive int or None, got 1.5'),
    (dict(norm_eps = 0.), 'transformer.norm_eps must be a positive float or None, got 0.0'),
    (dict(rotary_scaling = dict(type = 'yarn', factor = 2.)), "transformer.rotary_scaling must be None or a dict whose 'type' is one of ['linear', 'llama3']"),
    (dict(rotary_scaling = dict(type = 'linear')), "transformer.rotary_scaling of type 'linear' takes the keys ['factor', 'type'], got ['type']"),
    (dict(rotary_scaling = dict(type = 'linear', factor = -1)), 'transformer.rotary_scaling: every value must be a positive number'),
])
def test_bad_language_model_options_are_named(options, message):
    from conftest import tiny_model
    with pytest.raises(ValueError) as caught:
        tiny_model(transformer = dict(dim = 32, depth = 1, dim_head = 8, heads = 2) | options)
    assert message in str(caught.value)


def test_mistral_without_sliding_windows_is_llama(tmp_path, one_thread):
    from transformers import MistralConfig, MistralForCausalLM
    from lm_helpers import COMMON
    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(**COMMON, num_key_value_heads = 2, sliding_window = None)).eval()
    hf.save_pretrained(tmp_path / 'full')
    model = Transfusion.from_language_model(tmp_path / 'full', **OPTIONS)
    rows = text_rows()
    with torch.no_grad():
        assert_close_relative(text_logits(model, rows), hf(rows).logits)

    MistralForCausalLM(MistralConfig(**COMMON, sliding_window = 16)).save_pretrained(tmp_path / 'windowed')
    with pytest.raises(ValueError, match = "sliding-window attention is not supported, found {'sliding_window': 16"):
        Transfusion.from_language_model(tmp_path / 'windowed', **OPTIONS)
