"""Training checkpoints: atomic, verified, the last N kept.

A checkpoint is a directory `step_00001000/` under the run's checkpoint folder:

    state/          model, optimizer and EMA, written by `torch.distributed.checkpoint` (DCP):
                    each rank writes its own shards under FSDP; DDP and single-process runs
                    go through the same path
    trainer.pt      step and scheduler, and every rank's own state: its data position and RNG
                    states, gathered to rank 0, which writes the file
    manifest.json   size and SHA-256 of every other file, written last

Each rank resumes from its own data position: the ranks' positions drift apart (a streaming
loader's batches hold different numbers of samples), so one rank's position would make the
others skip or repeat samples. A checkpoint resumes only with as many processes as wrote it.

Parameters that the EMA shares with the model (frozen ones, see `ema.py`) are saved once, under
the model, and restored into the EMA from there.

It is written under a temporary name and renamed into place once complete, so a crash
mid-write leaves no directory that looks finished. On loading, the manifest is checked
first; a checkpoint without one, with a file of the wrong size or checksum or one that cannot
be read, raises `CorruptCheckpoint`, and `load_latest` falls back to the one before. With no
usable checkpoint left it raises `CorruptCheckpoint` naming what was wrong with each (the
command line reports it as one line).
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
REQUIRED = ('trainer.pt', 'state/.metadata')


class CheckpointError(RuntimeError):
    """A run's checkpoints cannot be resumed; the message says why and what to do. The command
    line reports it as one line."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint that is unfinished, damaged or unreadable."""


class CheckpointMismatch(CheckpointError, ValueError):
    """A good checkpoint that this run cannot resume (another number of processes)."""


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
    for name in REQUIRED:
        if name not in manifest:
            raise CorruptCheckpoint(f'checkpoint {directory}: {MANIFEST} does not list {name}')
    for name, expected in manifest.items():
        path = directory / name
        if not path.exists():
            raise CorruptCheckpoint(f'checkpoint {directory}: {name} is missing')
        size = path.stat().st_size
        if size != expected['bytes']:
            raise CorruptCheckpoint(f'checkpoint {directory}: {name} has {size} bytes, the manifest says {expected["bytes"]} (truncated?)')
        try:
            digest = sha256(path)
        except OSError as error:
            raise CorruptCheckpoint(f'checkpoint {directory}: {name} cannot be read ({error.strerror or error})') from None
        if digest != expected['sha256']:
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
    `module.` prefix removed), for DCP. The EMA's state leaves out the parameters it shares
    with the model (`EMA.shared`): they are saved once, under the model."""
    state = dict(model = get_model_state_dict(model), optimizer = get_optimizer_state_dict(model, optimizer))
    if ema is not None:
        shared = {f'module.{name}' for name in ema.shared}
        state['ema'] = {key: value for key, value in get_model_state_dict(ema).items() if key not in shared}
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


def save(root: Path, step: int, model, optimizer, ema, trainer_state: dict, keep_last: int, rank_state: dict | None = None) -> Path:
    """Called on every rank. `model` is the module trained (DDP wrapper, FSDP-sharded or plain);
    `trainer_state` is the same on every rank, `rank_state` (the data position) this rank's own."""
    root = Path(root)
    final, tmp = root / f'step_{step:08d}', root / f'.tmp_step_{step:08d}'
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    if rank0:
        shutil.rmtree(tmp, ignore_errors = True)
        tmp.mkdir(parents = True)
    distributed.barrier()

    with single_process_quiet():
        dcp.save(app_state(model, optimizer, ema), checkpoint_id = tmp / 'state', no_dist = not torch.distributed.is_initialized())
    ranks = distributed.all_gather_object(dict(rank_state or {}, rng = rng_states()))

    if rank0:
        torch.save(dict(trainer_state, step = step, ranks = ranks), tmp / 'trainer.pt')
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    distributed.barrier()
    return final


def read_trainer_state(directory: Path) -> dict:
    """trainer.pt, with `ranks`: one dict per rank (its RNG states, its data position)."""
    try:
        state = torch.load(directory / 'trainer.pt', weights_only = False)
    except Exception as error:      # whatever a damaged pickle raises (zip, unpickling, EOF, OS errors): the file is unusable
        raise CorruptCheckpoint(f'checkpoint {directory}: trainer.pt cannot be read ({type(error).__name__}: {error})') from None
    if not isinstance(state, dict) or 'step' not in state or not ('ranks' in state or 'rng' in state):
        raise CorruptCheckpoint(f'checkpoint {directory}: trainer.pt does not hold a trainer state')
    if 'ranks' not in state:        # written before each rank's data position was saved: rank 0's, given to all
        data = state.pop('data', None)
        state['ranks'] = [dict(rng = rng, data = data) for rng in state.pop('rng')]
    return state


def load(directory: Path, model, optimizer, ema) -> dict:
    """Restores model, optimizer and EMA in place and this rank's RNG states; returns the trainer
    state (step, scheduler) with this rank's own entries (its data position). Nothing is
    restored from a checkpoint that fails verification."""
    verify(directory)
    trainer_state = read_trainer_state(directory)
    ranks = trainer_state.pop('ranks')
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if len(ranks) != world_size:
        raise CheckpointMismatch(f'checkpoint {directory} was written by {len(ranks)} processes and this run has {world_size}: '
                                 f'resume with {len(ranks)} (each process resumes from its own data position)')

    state = app_state(model, optimizer, ema)
    with single_process_quiet():
        dcp.load(state, checkpoint_id = directory / 'state', no_dist = not torch.distributed.is_initialized())
    set_model_state_dict(model, state['model'])
    set_optimizer_state_dict(model, optimizer, state['optimizer'])
    if ema is not None:
        shared = {f'module.{name}': state['model'][name] for name in ema.shared if name in state['model']}
        set_model_state_dict(ema, dict(state['ema'], **shared))

    own = dict(ranks[torch.distributed.get_rank() if torch.distributed.is_initialized() else 0])
    set_rng_states(own.pop('rng'))
    return dict(trainer_state, **own)


def load_latest(root: Path, model, optimizer, ema) -> dict | None:
    """Loads the newest checkpoint that verifies, warning about each newer one that does not.
    None when there is no checkpoint at all; `CorruptCheckpoint` naming each one's fault when
    none is usable."""
    candidates, faults = list_checkpoints(Path(root)), []
    for directory in reversed(candidates):
        try:
            state = load(directory, model, optimizer, ema)
        except CorruptCheckpoint as error:
            faults.append(str(error))
            continue
        for fault in faults:
            warnings.warn(f'{fault}; falling back to the previous checkpoint')
        return state
    if candidates:
        raise CorruptCheckpoint(f'no usable checkpoint in {root}, all {len(candidates)} are damaged ({"; ".join(faults)}): '
                                f'move them away (or delete them) to start the run over')
    return None
