"""A pretrained Hugging Face causal language model as the starting point of a Transfusion.

Every peer starts the language half from a pretrained LM: LMFusion (Shi et al., 2024,
https://arxiv.org/abs/2412.15188) from Llama 3, BAGEL from Qwen2, Show-o2 from Qwen2.5. This
module maps such a model onto our transformer, and back:

    config.json  -> `TransformerConfig` (grouped-query attention, head width, rotary theta and
                    scaling, norm epsilon, biases, q / k norms, SwiGLU width, tied head), with
                    everything the LM lacks (U-ViT skips, output gates, unit-offset norms) off
    safetensors  -> our weights, read tensor by tensor (sharded or not) without building the
                    Hugging Face model, so `transformers` is not needed
    our weights  -> the Hugging Face layout again (`save_language_model`), loadable by `transformers`

The families (`FAMILIES`) share the Llama layout of tensors and differ in a few switches:

    Llama (Llama 2 / 3, and Mistral without sliding windows): `attention_bias` on q, k, v and o
    Qwen2 / Qwen2.5: biases on q, k, v only
    Qwen3: RMSNorm with learned gains on each query and key head, `attention_bias` on q, k, v and o

Vocabulary: the text ids are the LM's, [0, vocab_size); our structural tokens (SOS, EOS, META,
the shape digits, BOM / EOM per modality type) come after, their embedding and output rows
starting at the mean of the LM's rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import TransformerConfig

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
INDEX_NAME = 'model.safetensors.index.json'

# our options that a language model does not have
LANGUAGE_MODEL_LACKS = dict(
    unet_skips = False, unit_offset_norms = False, attn_gate_values = False, attn_softcap = None,
    attn_laser = False, use_value_residual = False, num_residual_streams = 1, num_residual_fracs = 1,
)

# transformer options a caller may set on top of the LM's: they leave its function unchanged
# (or are the training-time switches of this issue)
EXTRA_TRANSFORMER_OPTIONS = ('dropout', 'attn_dropout', 'use_flex_attn', 'dim_time')


# the families

@dataclass(frozen = True)
class Family:
    """What tells one family's architecture apart, as functions of its config.json."""
    name: str
    model_type: str
    qkv_bias: Callable[[dict], bool]
    out_bias: Callable[[dict], bool]
    qk_norm: bool = False


def attention_bias(hf: dict) -> bool:
    return bool(hf.get('attention_bias', False))


FAMILIES = {
    'LlamaForCausalLM': Family('Llama', 'llama', attention_bias, attention_bias),
    'MistralForCausalLM': Family('Mistral', 'mistral', attention_bias, attention_bias),
    'Qwen2ForCausalLM': Family('Qwen2', 'qwen2', lambda hf: True, lambda hf: False),
    'Qwen3ForCausalLM': Family('Qwen3', 'qwen3', attention_bias, attention_bias, qk_norm = True),
}


def unsupported(what: str, found) -> ValueError:
    return ValueError(f'language model: {what} is not supported, found {found!r} '
                      f'(supported: {", ".join(FAMILIES)} with SwiGLU (silu), full attention and '
                      f'default, linear or llama3 rotary scaling)')


def family_of(hf: dict) -> Family:
    architectures = hf.get('architectures') or []
    if len(architectures) != 1 or architectures[0] not in FAMILIES:
        raise ValueError(f'language model: unsupported architecture {architectures!r} (model_type '
                         f'{hf.get("model_type")!r}); supported: {", ".join(FAMILIES)}')
    return FAMILIES[architectures[0]]


def rotary_options(hf: dict) -> tuple[float, dict | None]:
    """(theta, our rotary_scaling) from either config.json layout: `rope_parameters` (transformers
    5) or `rope_theta` and `rope_scaling` (transformers 4)."""
    parameters = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
    theta = float(parameters.get('rope_theta', hf.get('rope_theta', 10000.)))
    kind = parameters.get('rope_type', parameters.get('type', 'default'))
    if parameters.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.)) != 1.:
        raise unsupported('a partial rotary factor', parameters.get('partial_rotary_factor', hf.get('partial_rotary_factor')))
    if kind == 'default':
        return theta, None
    if kind == 'linear':
        return theta, dict(type = 'linear', factor = parameters['factor'])
    if kind == 'llama3':
        keys = ('factor', 'low_freq_factor', 'high_freq_factor')
        context = parameters.get('original_max_position_embeddings', hf.get('max_position_embeddings'))
        return theta, dict(type = 'llama3', **{key: parameters[key] for key in keys}, original_max_position_embeddings = context)
    raise unsupported('rotary scaling', kind)


def check_full_attention(hf: dict):
    sliding = [kind for kind in hf.get('layer_types') or [] if kind != 'full_attention']
    if sliding or hf.get('use_sliding_window') or (hf.get('model_type') == 'mistral' and hf.get('sliding_window') is not None):
        raise unsupported('sliding-window attention', dict(sliding_window = hf.get('sliding_window'), layer_types = sorted(set(sliding)) or None))


def transformer_options(hf: dict) -> dict:
    """config.json of a supported causal LM -> our `TransformerConfig` options, exactly."""
    family = family_of(hf)
    if hf.get('hidden_act', 'silu') != 'silu':
        raise unsupported('the activation', hf.get('hidden_act'))
    if hf.get('mlp_bias', False):
        raise unsupported('mlp_bias', True)
    check_full_attention(hf)
    theta, scaling = rotary_options(hf)
    heads = hf['num_attention_heads']
    return dict(
        dim = hf['hidden_size'], depth = hf['num_hidden_layers'], heads = heads,
        kv_heads = hf.get('num_key_value_heads') or heads,
        dim_head = hf.get('head_dim') or hf['hidden_size'] // heads,
        dim_ff_hidden = hf['intermediate_size'],
        rotary_theta = theta, rotary_scaling = scaling,
        norm_eps = float(hf.get('rms_norm_eps', 1e-6)),
        attn_qkv_bias = family.qkv_bias(hf), attn_out_bias = family.out_bias(hf),
        qk_rmsnorm = family.qk_norm,
        tie_embeddings = bool(hf.get('tie_word_embeddings', False)),
        **LANGUAGE_MODEL_LACKS,
    )


# the tensors: one rule per tensor of ours, from one or more of theirs (joined along rows)

@dataclass(frozen = True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    rows: tuple[int, ...]       # rows of each of theirs, in order
    width: int | None           # columns of each of theirs (None: a vector)

    def shape(self, index: int) -> tuple[int, ...]:
        return (self.rows[index],) if self.width is None else (self.rows[index], self.width)


def rules(config: TransformerConfig, num_text_tokens: int) -> list[Rule]:
    """Every tensor of the text path, in the Llama layout shared by the families."""
    dim, q_rows, kv_rows, hidden = config.dim, config.heads * config.dim_head, config.num_kv_heads * config.dim_head, config.dim_hidden
    table = [Rule('token_embed.weight', ('model.embed_tokens.weight',), (num_text_tokens,), dim),
             Rule('transformer.final_norm.weight', ('model.norm.weight',), (dim,), None)]
    if not config.tie_embeddings:
        table.append(Rule('to_logits.weight', ('lm_head.weight',), (num_text_tokens,), dim))

    for i in range(config.depth):
        ours, theirs = f'transformer.blocks.{i}.', f'model.layers.{i}.'
        attn = f'{theirs}self_attn.'
        qkv = tuple(f'{attn}{name}_proj' for name in 'qkv')
        table += [
            Rule(f'{ours}attn_norm.norm.weight', (f'{theirs}input_layernorm.weight',), (dim,), None),
            Rule(f'{ours}attn.to_qkv.weight', tuple(f'{name}.weight' for name in qkv), (q_rows, kv_rows, kv_rows), dim),
            Rule(f'{ours}attn.to_out.weight', (f'{attn}o_proj.weight',), (dim,), q_rows),
            Rule(f'{ours}ff_norm.norm.weight', (f'{theirs}post_attention_layernorm.weight',), (dim,), None),
            # our proj_in is (value, gate): x * silu(gate) is HF's up_proj(x) * silu(gate_proj(x))
            Rule(f'{ours}ff.proj_in.weight', (f'{theirs}mlp.up_proj.weight', f'{theirs}mlp.gate_proj.weight'), (hidden, hidden), dim),
            Rule(f'{ours}ff.proj_out.weight', (f'{theirs}mlp.down_proj.weight',), (dim,), hidden),
        ]
        if config.attn_qkv_bias:
            table.append(Rule(f'{ours}attn.to_qkv.bias', tuple(f'{name}.bias' for name in qkv), (q_rows, kv_rows, kv_rows), None))
        if config.attn_out_bias:
            table.append(Rule(f'{ours}attn.to_out.bias', (f'{attn}o_proj.bias',), (dim,), None))
        if config.qk_rmsnorm:
            table += [Rule(f'{ours}attn.{name}_norm.weight', (f'{attn}{name}_norm.weight',), (config.dim_head,), None) for name in 'qk']
    return table


class TensorSource:
    """The tensors of a causal LM by name: a folder of safetensors (sharded or not), read
    lazily, or the state dict of a loaded model."""

    def __init__(self, source):
        if isinstance(source, (str, os.PathLike)):
            self.folder = Path(source)
            self.config = read_config(self.folder)
            self.files = tensor_files(self.folder)
            self.state = None
        else:
            if not (hasattr(source, 'config') and hasattr(source.config, 'to_dict') and hasattr(source, 'state_dict')):
                raise TypeError(f'language model: expected a folder written by save_pretrained or a loaded '
                                f'transformers PreTrainedModel, got {type(source).__name__}')
            self.folder, self.files = None, {}
            self.config = source.config.to_dict()
            if not self.config.get('architectures'):
                # a model built in memory (`LlamaForCausalLM(LlamaConfig(...))`) has no `architectures`
                # until save_pretrained records its class name: the class name is what it would record
                self.config['architectures'] = [type(source).__name__]
            self.state = source.state_dict()

    def names(self) -> set[str]:
        return set(self.state) if self.state is not None else set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        if self.state is not None:
            return tuple(self.state[name].shape)
        with safe_open(self.files[name], framework = 'pt') as file:
            return tuple(file.get_slice(name).get_shape())

    def tensor(self, name: str) -> Tensor:
        if self.state is not None:
            return self.state[name].detach()
        with safe_open(self.files[name], framework = 'pt') as file:
            return file.get_tensor(name)


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f'language model: {folder} has no {CONFIG_NAME} (expected a folder written by save_pretrained)')
    return json.loads(path.read_text())


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    if (folder / INDEX_NAME).is_file():
        weight_map = json.loads((folder / INDEX_NAME).read_text())['weight_map']
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / WEIGHTS_NAME).is_file():
        with safe_open(folder / WEIGHTS_NAME, framework = 'pt') as file:
            return {name: folder / WEIGHTS_NAME for name in file.keys()}
    found = sorted(path.name for path in folder.iterdir())
    raise FileNotFoundError(f'language model: {folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME} (only safetensors '
                            f'checkpoints are read), found {found}')


def check_tensors(tensors: TensorSource, table: list[Rule]):
    """Every tensor the config implies is there with its shape, and nothing else is."""
    expected = {name: rule.shape(index) for rule in table for index, name in enumerate(rule.theirs)}
    names = tensors.names()
    ignored = {name for name in names if name.endswith('rotary_emb.inv_freq')}      # a buffer some older checkpoints hold
    if tensors.config.get('tie_word_embeddings', False):
        ignored.add('lm_head.weight')                                                  # saved alongside a tied table by some tools
    missing = sorted(set(expected) - names)
    unexpected = sorted(names - set(expected) - ignored)
    if missing or unexpected:
        raise ValueError(f'language model: the checkpoint does not match its config.json: missing {missing[:8]}'
                         f'{" ..." if len(missing) > 8 else ""}, unexpected {unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}')
    wrong = [f'{name} {tensors.shape(name)} (config implies {shape})' for name, shape in expected.items() if tensors.shape(name) != shape]
    if wrong:
        raise ValueError(f'language model: tensors of the wrong shape for its config.json: {"; ".join(wrong[:8])}')


# loading

def from_language_model(cls, source, *, separate_modality_weights: bool = False, freeze_language_model: bool = False,
                        transformer: dict | None = None, dtype: torch.dtype | None = None, **transfusion_kwargs):
    """A Transfusion whose transformer, embedding and text head are the given causal LM's."""
    tensors = TensorSource(source)
    options = transformer_options(tensors.config)
    extra = dict(transformer or {})
    for key in extra:
        if key not in EXTRA_TRANSFORMER_OPTIONS:
            raise ValueError(f'from_language_model: the language model sets transformer.{key}; only '
                             f'{", ".join(EXTRA_TRANSFORMER_OPTIONS)} may be given, got {sorted(extra)}')
    if 'num_text_tokens' in transfusion_kwargs:
        raise ValueError(f'from_language_model: num_text_tokens is the language model\'s vocab_size '
                         f'({tensors.config.get("vocab_size")}), got {transfusion_kwargs["num_text_tokens"]!r}')
    options.update(extra, separate_modality_weights = separate_modality_weights, freeze_text_weights = freeze_language_model)

    num_text_tokens = tensors.config['vocab_size']
    config = TransformerConfig(**options)
    table = rules(config, num_text_tokens)
    check_tensors(tensors, table)

    model = cls(num_text_tokens = num_text_tokens, transformer = options, **transfusion_kwargs)
    load_text_weights(model, tensors, table)
    return model if dtype is None else model.to(dtype)


@torch.no_grad()
def load_text_weights(model, tensors: TensorSource, table: list[Rule]):
    params = dict(model.named_parameters())
    for rule in table:
        value = torch.cat([tensors.tensor(name) for name in rule.theirs])
        if rule.ours in ('token_embed.weight', 'to_logits.weight'):
            set_vocab_rows(getattr(model, rule.ours.split('.')[0]), value)
        else:
            params[rule.ours].copy_(value)
    model.transformer.copy_text_weights_to_modality()


def set_vocab_rows(table, rows: Tensor):
    """The LM's rows for the text ids; every structural token's row at their mean."""
    num_text = rows.shape[0]
    mean = rows.float().mean(dim = 0).to(table.weight.dtype)
    table.weight[:num_text].copy_(rows)
    added = table.structural if table.num_frozen > 0 else table.weight[num_text:]
    added.copy_(mean.expand_as(added))


# export

def export_family(config: TransformerConfig) -> tuple[str, Family]:
    """The architecture an exported model takes: the first family whose switches are ours."""
    differ = [key for key, value in LANGUAGE_MODEL_LACKS.items() if getattr(config, key) != value]
    if differ:
        raise ValueError(f'save_language_model: a language model has none of {", ".join(differ)}; this model sets '
                         f'{", ".join(f"{key} = {getattr(config, key)!r}" for key in differ)}')
    hf = dict(attention_bias = config.attn_qkv_bias)
    for name, family in FAMILIES.items():
        if (family.qk_norm, family.qkv_bias(hf), family.out_bias(hf)) == (config.qk_rmsnorm, config.attn_qkv_bias, config.attn_out_bias):
            return name, family
    raise ValueError(f'save_language_model: no supported family has qk_rmsnorm = {config.qk_rmsnorm}, '
                     f'attn_qkv_bias = {config.attn_qkv_bias} and attn_out_bias = {config.attn_out_bias}')


def hf_config(model, base: dict | None = None) -> dict:
    """The config.json of the exported LM: `base`'s fields (token ids, context length ...) with
    every field that shapes the network set from ours."""
    config = model.config.transformer
    architecture, family = export_family(config)
    out = dict(base or {})
    for key in ('rope_parameters', 'rope_scaling', 'rope_theta', 'layer_types', 'use_sliding_window', 'sliding_window'):
        out.pop(key, None)
    rope = dict(rope_type = 'default') if config.rotary_scaling is None else dict(
        rope_type = config.rotary_scaling['type'], **{key: value for key, value in config.rotary_scaling.items() if key != 'type'})
    out.update(
        architectures = [architecture], model_type = family.model_type, vocab_size = model.config.num_text_tokens,
        hidden_size = config.dim, intermediate_size = config.dim_hidden, num_hidden_layers = config.depth,
        num_attention_heads = config.heads, num_key_value_heads = config.num_kv_heads, head_dim = config.dim_head,
        hidden_act = 'silu', rms_norm_eps = config.norm_eps if config.norm_eps is not None else torch.finfo(torch.float32).eps,
        tie_word_embeddings = config.tie_embeddings, attention_bias = config.attn_qkv_bias,
        # both layouts: transformers 4 reads rope_theta / rope_scaling, transformers 5 rope_parameters (and converts the others)
        rope_theta = config.rotary_theta, rope_scaling = None if config.rotary_scaling is None else rope,
        rope_parameters = dict(rope, rope_theta = config.rotary_theta),
    )
    return out


def language_model_state_dict(model) -> dict[str, Tensor]:
    """The text weights of `model` under the Hugging Face names (the text path only, with
    separate modality weights; the text ids' rows of the embedding and head)."""
    config = model.config.transformer
    num_text = model.config.num_text_tokens
    params = {**dict(model.named_parameters()), 'to_logits.weight': model.to_logits.weight}
    out = {}
    for rule in rules(config, num_text):
        value = params[rule.ours].detach()
        if rule.ours in ('token_embed.weight', 'to_logits.weight'):
            value = value[:num_text]
        for name, part in zip(rule.theirs, value.split(rule.rows)):
            out[name] = part.contiguous()
    return out


def save_language_model(model, directory: str | os.PathLike, base_config: str | os.PathLike | dict | None = None,
                        dtype: torch.dtype | None = None) -> Path:
    """Writes config.json and model.safetensors of the text weights in the Hugging Face layout.
    `base_config` (the source LM's folder or config dict) supplies the fields we do not model,
    such as the token ids and the context length. Each file is written under a temporary name
    and renamed, so a folder never holds a half-written file."""
    directory = Path(directory)
    directory.mkdir(parents = True, exist_ok = True)
    base = read_config(Path(base_config)) if isinstance(base_config, (str, os.PathLike)) else base_config
    weights = {name: (value if dtype is None else value.to(dtype)).cpu() for name, value in language_model_state_dict(model).items()}
    config = hf_config(model, base)
    config['torch_dtype'] = str(next(iter(weights.values())).dtype).removeprefix('torch.')

    temporary = directory / f'{WEIGHTS_NAME}.tmp'
    save_file(weights, temporary, metadata = dict(format = 'pt'))
    os.replace(temporary, directory / WEIGHTS_NAME)
    temporary = directory / f'{CONFIG_NAME}.tmp'
    temporary.write_text(json.dumps(config, indent = 2))
    os.replace(temporary, directory / CONFIG_NAME)
    stale_index = directory / INDEX_NAME
    if stale_index.exists():
        stale_index.unlink()
    return directory
