"""Saving and loading a trained model without the training code.

A pretrained directory holds

    config.json         the model's `TransfusionConfig`, as JSON
    model.safetensors   the weights of everything except the encoders and decoders
    codecs.pt           only when the model has modality encoders / decoders or learned
                        pre/post-transformer down/up blocks: those modules themselves,
                        pickled with `torch.save` (the down/up blocks' trained weights are
                        in model.safetensors too, and loaded from there)

Encoders and decoders are arbitrary user modules (a VAE, a conv stack), so their structure
cannot be rebuilt from a config: they are pickled whole, which needs their classes importable
when loading and, like any pickle, trust in the file. Pass `modality_encoder=` /
`modality_decoder=` to `from_pretrained` to supply them yourself instead; `codecs.pt` is then
not read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
CODECS_NAME = 'codecs.pt'
FORMAT_VERSION = 1
CODEC_PREFIXES = ('modality_encoders.', 'modality_decoders.')


def has_codecs(model) -> bool:
    return any(not isinstance(m, nn.Identity) for m in (*model.modality_encoders, *model.modality_decoders, *model.pre_post))


def pre_post_pairs(model) -> tuple:
    return tuple(None if isinstance(m, nn.Identity) else (m.encoder, m.decoder) for m in model.pre_post)


def save_pretrained(model, directory: str | Path, state_dict: dict | None = None) -> Path:
    """Writes `model` to `directory`. `state_dict` (full, unsharded) replaces `model.state_dict()`,
    for models whose parameters are sharded (the trainer gathers it first)."""
    directory = Path(directory)
    directory.mkdir(parents = True, exist_ok = True)
    state_dict = model.state_dict() if state_dict is None else state_dict

    config = dict(format = 'transfusion-pytorch', version = FORMAT_VERSION, config = model.config.to_dict())
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent = 2))

    weights = {key: value.detach().cpu().contiguous() for key, value in state_dict.items() if not key.startswith(CODEC_PREFIXES)}
    save_file(weights, directory / WEIGHTS_NAME, metadata = dict(format = 'pt'))

    codecs_path = directory / CODECS_NAME
    if has_codecs(model):
        codecs = dict(modality_encoder = tuple(model.modality_encoders), modality_decoder = tuple(model.modality_decoders))
        codecs = {name: tuple(None if isinstance(m, nn.Identity) else m for m in modules) for name, modules in codecs.items()}
        torch.save(dict(**codecs, pre_post_transformer_enc_dec = pre_post_pairs(model)), codecs_path)
    elif codecs_path.exists():
        codecs_path.unlink()

    return directory


def as_tuples(value):
    """JSON turns tuples into lists; the config wants tuples back."""
    if isinstance(value, list):
        return tuple(as_tuples(v) for v in value)
    if isinstance(value, dict):
        return {key: as_tuples(v) for key, v in value.items()}
    return value


def from_pretrained(cls, directory: str | Path, *, modality_encoder = None, modality_decoder = None,
                    pre_post_transformer_enc_dec = None, map_location = 'cpu'):
    directory = Path(directory)
    if not (directory / CONFIG_NAME).exists():
        raise FileNotFoundError(f'{directory} is not a pretrained Transfusion directory: it has no {CONFIG_NAME}')

    saved = json.loads((directory / CONFIG_NAME).read_text())
    if saved.get('format') != 'transfusion-pytorch' or saved.get('version') != FORMAT_VERSION:
        raise ValueError(f'{directory / CONFIG_NAME}: expected format transfusion-pytorch version {FORMAT_VERSION}, got {saved.get("format")!r} version {saved.get("version")!r}')

    kwargs = as_tuples(saved['config'])
    supplied = (modality_encoder, modality_decoder, pre_post_transformer_enc_dec)
    if all(module is None for module in supplied) and (directory / CODECS_NAME).exists():
        codecs = torch.load(directory / CODECS_NAME, map_location = map_location, weights_only = False)
        modality_encoder, modality_decoder = codecs['modality_encoder'], codecs['modality_decoder']
        pre_post_transformer_enc_dec = codecs.get('pre_post_transformer_enc_dec')

    model = cls(**kwargs, modality_encoder = modality_encoder, modality_decoder = modality_decoder,
                pre_post_transformer_enc_dec = pre_post_transformer_enc_dec)

    weights = load_file(directory / WEIGHTS_NAME, device = str(map_location))
    missing, unexpected = model.load_state_dict(weights, strict = False)
    missing = [key for key in missing if not key.startswith(CODEC_PREFIXES)]
    if missing or unexpected:
        raise ValueError(f'{directory / WEIGHTS_NAME} does not match the config: missing {missing}, unexpected {unexpected}')

    return model.to(map_location)
