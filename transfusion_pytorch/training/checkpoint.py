"""Training checkpoints: atomic, verified, the last N kept.

A checkpoint is a directory `step_00001000/` under the run's checkpoint folder:

    state/          model, optimizer and EMA, written by `torch.distributed.checkpoint` (DCP):
                    each rank writes its own shards under FSDP; DDP and single-process runs
                    go through the same path
    trainer.pt      step, scheduler, data position and every rank's RNG states (rank 0)
    manifest.json   size and SHA-256 of every other file, written last

It is written under a temporary name and renamed into place once complete, so a crash
mid-write leaves no directory that looks finished. On loading, the manifest is checked
first; a checkpoint without one, or with a file of the wrong size or checksum, raises
`CorruptCheckpoint`, and `load_latest` falls back to the one before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from . import distributed

MANIFEST = 'manifest.json'
STEP_DIR = re.compile(r'^step_(\d+)$')


class CorruptCheckpoint(RuntimeError):
    pass


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for chunk in iter(lambda: file.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path):
    files = sorted(p for p in directory.rglob('*') if p.is_file())
    manifest = {str(p.relative_to(directory)): dict(bytes = p.stat().st_size, sha256 = sha256(p)) for p in files}
    with open(directory / MANIFEST, 'w') as file:
        json.dump(manifest, file, indent = 1)
        file.flush()
        os.fsync(file.fileno())


def verify(directory: Path):
    """Raises `CorruptCheckpoint` naming what is wrong, unless every file matches the manifest."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise CorruptCheckpoint(f'checkpoint {directory} has no {MANIFEST}: it was not finished')
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise CorruptCheckpoint(f'checkpoint {directory}: {MANIFEST} is not valid JSON ({error})') from None
    for name, expected in manifest.items():
        path = directory / name
        if not path.exists():
            raise CorruptCheckpoint(f'checkpoint {directory}: {name} is missing')
        size = path.stat().st_size
        if size != expected['bytes']:
            raise CorruptCheckpoint(f'checkpoint {directory}: {name} has {size} bytes, the manifest says {expected["bytes"]} (truncated?)')
        if sha256(path) != expected['sha256']:
            raise CorruptCheckpoint(f'checkpoint {directory}: {name} does not match its SHA-256 in the manifest (corrupted)')


def list_checkpoints(root: Path) -> list[Path]:
    """Finished-looking checkpoint directories, oldest first."""
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


@contextmanager
def single_process_quiet():
    """DCP warns that it assumes a single process when there is no process group; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message = 'torch.distributed is disabled, unavailable or uninitialized')
        yield


def app_state(model, optimizer, ema) -> dict:
    """Model, optimizer and EMA state with FQN keys, sharded as the modules are (DDP's
    `module.` prefix removed), for DCP."""
    state = dict(model = get_model_state_dict(model), optimizer = get_optimizer_state_dict(model, optimizer))
    if ema is not None:
        state['ema'] = get_model_state_dict(ema)
    return state


def rng_states() -> dict:
    import random
    states = dict(torch = torch.get_rng_state(), python = random.getstate())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state()
    try:
        import numpy
        states['numpy'] = numpy.random.get_state()
    except ImportError:
        pass
    return states


def set_rng_states(states: dict):
    import random
    torch.set_rng_state(states['torch'])
    random.setstate(states['python'])
    if 'cuda' in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states['cuda'])
    if 'numpy' in states:
        import numpy
        numpy.random.set_state(states['numpy'])


def save(root: Path, step: int, model, optimizer, ema, trainer_state: dict, keep_last: int) -> Path:
    """Called on every rank. `model` is the module trained (DDP wrapper, FSDP-sharded or plain)."""
    root = Path(root)
    final, tmp = root / f'step_{step:08d}', root / f'.tmp_step_{step:08d}'
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    if rank0:
        shutil.rmtree(tmp, ignore_errors = True)
        tmp.mkdir(parents = True)
    distributed.barrier()

    with single_process_quiet():
        dcp.save(app_state(model, optimizer, ema), checkpoint_id = tmp / 'state', no_dist = not torch.distributed.is_initialized())
    rngs = distributed.all_gather_object(rng_states())

    if rank0:
        torch.save(dict(trainer_state, step = step, rng = rngs), tmp / 'trainer.pt')
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    distributed.barrier()
    return final


def load(directory: Path, model, optimizer, ema) -> dict:
    """Restores model, optimizer and EMA in place and this rank's RNG states; returns the trainer
    state (step, scheduler, data position)."""
    verify(directory)
    state = app_state(model, optimizer, ema)
    with single_process_quiet():
        dcp.load(state, checkpoint_id = directory / 'state', no_dist = not torch.distributed.is_initialized())
    set_model_state_dict(model, state['model'])
    set_optimizer_state_dict(model, optimizer, state['optimizer'])
    if ema is not None:
        set_model_state_dict(ema, state['ema'])

    trainer_state = torch.load(directory / 'trainer.pt', weights_only = False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if len(trainer_state['rng']) != (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1):
        raise ValueError(f'checkpoint {directory} was written by {len(trainer_state["rng"])} processes; resume with as many')
    set_rng_states(trainer_state['rng'][rank])
    return trainer_state


def load_latest(root: Path, model, optimizer, ema) -> dict | None:
    """Loads the newest checkpoint that verifies, warning about each newer one that does not.
    None when there is no checkpoint at all."""
    candidates = list_checkpoints(Path(root))
    for directory in reversed(candidates):
        try:
            return load(directory, model, optimizer, ema)
        except CorruptCheckpoint as error:
            warnings.warn(f'{error}; falling back to the previous checkpoint')
    if candidates:
        raise CorruptCheckpoint(f'no usable checkpoint in {root}: all {len(candidates)} failed verification')
    return None
