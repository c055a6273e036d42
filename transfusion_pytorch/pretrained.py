"""Saving and loading a trained model without the training code.

A pretrained directory holds

    config.json         the model's `TransfusionConfig` (every key, defaults included), as JSON, which
                        codecs were saved and the `format_version` of its defaults (`versions.py`: a
                        key it lacks takes the default of its version, with a note)
    model.safetensors   the weights of everything except the encoders and decoders
    codecs.pt           only when the model has modality encoders / decoders or learned
                        pre/post-transformer down/up blocks: those modules themselves,
                        pickled with `torch.save` (the down/up blocks' trained weights are
                        in model.safetensors too, and loaded from there)

Encoders and decoders are arbitrary user modules (a VAE, a conv stack), so their structure
cannot be rebuilt from a config: they are pickled whole, which needs their classes importable
when loading and, like any pickle, trust in the file. `from_pretrained` takes
`modality_encoder=`, `modality_decoder=` and `pre_post_transformer_enc_dec=` to supply them
yourself: what is passed replaces what was saved, per modality type and per part, and the rest
comes from `codecs.pt`, which is read only when something saved is not supplied.

Shared tensors (an up block's weight tied to the down block's, one (encoder, decoder) pair
used for two types, the output head tied to the embedding) are saved once, as
`safetensors.torch.save_model` does: each set of names for one tensor is written under one
name, and the others are recorded in the file's metadata as `name -> kept name`. Loading ties
them again. The directory is written under a temporary name next to it and renamed into
place, so a failure, or a process killed halfway, never leaves a half-written model behind.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import TransfusionConfig, per_type
from .pre_post import PrePost, pairs_per_type
from .versions import FORMAT_VERSION, changed_since, check_version

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
CODECS_NAME = 'codecs.pt'
CODEC_PREFIXES = ('modality_encoders.', 'modality_decoders.')
CODEC_PARTS = ('modality_encoder', 'modality_decoder', 'pre_post_transformer_enc_dec')

logger = logging.getLogger(__name__)


# saving

def codecs_per_type(model) -> dict[str, tuple]:
    """The model's codecs as `from_pretrained` takes them: per part, one module (a pair for the
    down / up blocks) or None per modality type."""
    unless_identity = lambda modules: tuple(None if isinstance(m, nn.Identity) else m for m in modules)
    return dict(
        modality_encoder = unless_identity(model.modality_encoders),
        modality_decoder = unless_identity(model.modality_decoders),
        pre_post_transformer_enc_dec = tuple((m.encoder, m.decoder) if isinstance(m, PrePost) else None for m in model.pre_post),
    )


def without_shared_memory(state_dict: dict) -> tuple[dict, dict]:
    """(tensors to write, aliases): safetensors refuses tensors that share memory. Names of one
    and the same tensor (same storage, offset, shape and stride) are written once, under the
    first name in sorted order, as `safetensors.torch.save_model` chooses; the others become
    aliases `name -> kept name`. Different views of one storage are written as copies."""
    by_storage = defaultdict(list)
    for name, tensor in state_dict.items():
        key = (tensor.device, tensor.untyped_storage().data_ptr()) if tensor.numel() > 0 else ('empty', name)
        by_storage[key].append(name)

    kept, aliases = {}, {}
    for names in by_storage.values():
        views = {}
        for name in sorted(names):
            tensor = state_dict[name]
            view = (tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
            if view in views:
                aliases[name] = views[view]
            else:
                views[view] = name
        copy = len(views) > 1
        for name in views.values():
            tensor = state_dict[name].detach()
            kept[name] = (tensor.clone() if copy else tensor).cpu().contiguous()
    return kept, aliases


def save_pretrained(model, directory: str | Path, state_dict: dict | None = None) -> Path:
    """Writes `model` to `directory`, atomically. `state_dict` (full, unsharded) replaces
    `model.state_dict()`, for models whose parameters are sharded (the trainer gathers it first).
    An existing directory is replaced only if it holds nothing but a saved model."""
    directory = Path(directory)
    check_replaceable(directory)
    state_dict = model.state_dict() if state_dict is None else state_dict
    codecs = codecs_per_type(model)

    def write(folder: Path):
        saved_codecs = {part: [module is not None for module in modules] for part, modules in codecs.items()}
        config = dict(format = 'transfusion-pytorch', format_version = FORMAT_VERSION, config = model.config.to_dict(), codecs = saved_codecs)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent = 2))

        weights, aliases = without_shared_memory({k: v for k, v in state_dict.items() if not k.startswith(CODEC_PREFIXES)})
        save_file(weights, folder / WEIGHTS_NAME, metadata = dict(aliases, format = 'pt'))

        if any(module is not None for modules in codecs.values() for module in modules):
            torch.save(codecs, folder / CODECS_NAME)        # one pickle: modules shared between parts stay shared

    write_atomically(directory, write)
    return directory


def check_replaceable(directory: Path):
    if directory.exists() and not directory.is_dir():
        raise ValueError(f'save_pretrained: {directory} exists and is not a directory')
    if directory.is_dir():
        others = sorted(p.name for p in directory.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME, CODECS_NAME))
        if others:
            raise ValueError(f'save_pretrained: {directory} holds files that are not part of a saved model ({", ".join(others[:5])}); '
                             f'it would be replaced as a whole: choose a new or empty directory')


def write_atomically(directory: Path, write):
    """Runs `write(folder)` on a temporary directory next to `directory`, then renames it into
    place; an existing `directory` is moved aside first and removed last. Whatever fails leaves
    `directory` as it was (or, killed between the two renames, the previous model in `.NAME.old`)."""
    directory = directory.resolve()
    directory.parent.mkdir(parents = True, exist_ok = True)
    for stale in directory.parent.glob(f'.{directory.name}.tmp-*'):     # left by a killed writer
        shutil.rmtree(stale, ignore_errors = True)
    tmp = directory.parent / f'.{directory.name}.tmp-{os.getpid()}'
    old = directory.parent / f'.{directory.name}.old'
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.iterdir():
            with open(path, 'rb') as file:
                os.fsync(file.fileno())
        if directory.exists():
            shutil.rmtree(old, ignore_errors = True)
            os.replace(directory, old)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors = True)
        raise
    shutil.rmtree(old, ignore_errors = True)


# loading

def as_tuples(value):
    """JSON turns tuples into lists; the config wants tuples back."""
    if isinstance(value, list):
        return tuple(as_tuples(v) for v in value)
    if isinstance(value, dict):
        return {key: as_tuples(v) for key, v in value.items()}
    return value


def with_old_defaults(kwargs: dict, version: int, path: Path) -> dict:
    """The saved config, where it lacks a key whose default changed after its version, with the old
    default: the model keeps the behaviour it was saved with (noted)."""
    for change in changed_since(version, {field.name for field in dataclasses.fields(TransfusionConfig)}):
        if change.key not in kwargs:
            kwargs = dict(kwargs, **{change.key: change.old})
            warnings.warn(f'{path} (format version {version}) records no {change.key}: the model keeps {change.key} = '
                          f'{change.old!r}, the default when it was saved (the default is now {change.new!r}: {change.why}); '
                          f'to opt in, set "{change.key}": {json.dumps(change.new)} in its config', stacklevel = 3)
    return kwargs


def passed_per_type(passed: dict, num_types: int) -> dict[str, tuple]:
    """What the caller passed, per part, as one module (pair) or None per type."""
    return dict(
        modality_encoder = per_type(passed['modality_encoder'], num_types, 'modality_encoder', lambda v: v is None or isinstance(v, nn.Module), 'a module or None'),
        modality_decoder = per_type(passed['modality_decoder'], num_types, 'modality_decoder', lambda v: v is None or isinstance(v, nn.Module), 'a module or None'),
        pre_post_transformer_enc_dec = pairs_per_type(passed['pre_post_transformer_enc_dec'], num_types),
    )


def merged_codecs(directory: Path, saved_parts: dict | None, passed: dict, map_location) -> dict[str, tuple]:
    """Per part and type: the module passed, else the one saved in codecs.pt. codecs.pt is read
    only when it holds something that was not passed (folders without the `codecs` entry in
    config.json: whenever something is missing)."""
    num_types = len(next(iter(passed.values())))
    if saved_parts is None:
        needed = (directory / CODECS_NAME).exists() and any(m is None for modules in passed.values() for m in modules)
    else:
        needed = any(was_saved and passed[part][m] is None for part in CODEC_PARTS for m, was_saved in enumerate(saved_parts.get(part, ())))

    saved = {part: (None,) * num_types for part in CODEC_PARTS}
    if needed:
        try:
            loaded = torch.load(directory / CODECS_NAME, map_location = map_location, weights_only = False)
        except (ImportError, AttributeError, OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:
            raise ValueError(
                f'{directory / CODECS_NAME}: the saved encoders / decoders / down-up blocks cannot be loaded ({error}); '
                f'pass them as modality_encoder=, modality_decoder=, pre_post_transformer_enc_dec='
            ) from error
        saved.update({part: tuple(loaded.get(part) or saved[part]) for part in CODEC_PARTS})

    replaced = [f'{part}[{m}]' for part in CODEC_PARTS for m in range(num_types) if passed[part][m] is not None and saved[part][m] is not None]
    if replaced:
        logger.info('from_pretrained(%s): the modules passed replace the saved %s', directory, ', '.join(replaced))
    return {part: tuple(p if p is not None else s for p, s in zip(passed[part], saved[part])) for part in CODEC_PARTS}


def tie_aliases(model: nn.Module, aliases: dict[str, str]):
    """Makes each aliased parameter or buffer the very tensor of the name it was saved under,
    as it was when saved (a no-op where the model already shares them)."""
    for name, kept in aliases.items():
        prefix, _, leaf = name.rpartition('.')
        owner = model.get_submodule(prefix)
        if leaf in owner._parameters:
            setattr(owner, leaf, model.get_parameter(kept))
        elif leaf in owner._buffers:
            owner._buffers[leaf] = model.get_buffer(kept)


def dead_projection_keys(model, keys) -> set[str]:
    """Folders written before a type with down / up blocks stopped making its (never used)
    linear projections hold their weights; they are skipped."""
    prefixes = tuple(f'{name}.{m}.' for m, block in enumerate(model.pre_post) if isinstance(block, PrePost)
                     for name in ('latent_to_model', 'model_to_velocity'))
    return {key for key in keys if prefixes and key.startswith(prefixes)}


def from_pretrained(cls, directory: str | Path, *, modality_encoder = None, modality_decoder = None,
                    pre_post_transformer_enc_dec = None, map_location = 'cpu'):
    """The model saved in `directory`, in eval mode (as `transformers` returns it): condition
    dropout and dropout are off until you call `.train()`. Modules passed replace the saved
    ones per modality type and part (logged at INFO level); the rest are the saved ones."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).exists():
        raise FileNotFoundError(f'{directory} is not a pretrained Transfusion directory: it has no {CONFIG_NAME}')

    path = directory / CONFIG_NAME
    saved = json.loads(path.read_text())
    if saved.get('format') != 'transfusion-pytorch':
        raise ValueError(f'{path}: expected format transfusion-pytorch, got {saved.get("format")!r}')
    # written before versions were recorded (then with "version": 1, the only layout there was): version 0
    version = check_version(saved.get('format_version', 0), str(path))
    kwargs = with_old_defaults(as_tuples(saved['config']), version, path)
    num_types = len(kwargs['dim_latent'])
    passed = passed_per_type(dict(modality_encoder = modality_encoder, modality_decoder = modality_decoder,
                                  pre_post_transformer_enc_dec = pre_post_transformer_enc_dec), num_types)
    codecs = merged_codecs(directory, saved.get('codecs'), passed, map_location)
    model = cls(**kwargs, **{part: modules if any(m is not None for m in modules) else None for part, modules in codecs.items()})

    weights_path = directory / WEIGHTS_NAME
    with safe_open(weights_path, framework = 'pt') as file:
        aliases = {name: kept for name, kept in (file.metadata() or {}).items() if name != 'format'}
    weights = load_file(weights_path, device = str(map_location))
    aliases = {name: kept for name, kept in aliases.items() if kept in weights}
    tie_aliases(model, aliases)

    dead = dead_projection_keys(model, weights)
    missing, unexpected = model.load_state_dict({k: v for k, v in weights.items() if k not in dead}, strict = False)
    missing = [key for key in missing if not key.startswith(CODEC_PREFIXES) and key not in aliases]
    if missing or unexpected:
        raise ValueError(f'{weights_path} does not match the config: missing {missing}, unexpected {unexpected}')

    return model.to(map_location).eval()
