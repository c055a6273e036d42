"""What the command line's parts share: its error type, the parser that turns argparse's errors
into it, the option types and option groups of `sample` / `eval` / `caption`, and the checked
--out path. `cli.py` (the commands and the parser) and `jobs/` (the image-text and data
commands) both import it; it imports neither, so the imports of the package run one way."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config_files import write_text_atomic


class UsageError(Exception):
    """Something asked of the CLI that cannot be done: one line on stderr and exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse's own errors (a missing argument, a number that is not one) as UsageError, so
    that they read as one line like every other error of the CLI."""

    def error(self, message: str):
        raise UsageError(f'{message} (see {self.prog} --help)')


def int_at_least(minimum: int):
    """An argparse type: an int >= `minimum`, or an error naming the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected an int >= {minimum}, got {text!r}') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'expected an int >= {minimum}, got {value}')
        return value
    return parse


positive_int = int_at_least(1)


def output_path(text: str, image: bool = False) -> Path:
    """The --out file, checked before any work: not a folder, under no file, an image format
    matplotlib writes (for images). Its missing folders are made now, so that a folder that
    cannot be made fails before the work rather than after it."""
    out = Path(text)
    if out.is_dir():
        raise UsageError(f'--out: {out} is a folder; give a file name')
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise UsageError(f'--out: {blocking} is a file, so {out} cannot be written')
    if image:
        from matplotlib.backend_bases import FigureCanvasBase
        formats = sorted(FigureCanvasBase.get_supported_filetypes())
        if out.suffix.lower().lstrip('.') not in formats:
            raise UsageError(f"--out: an image needs one of the suffixes {', '.join('.' + f for f in formats)}, got {out.name!r}")
    try:
        out.parent.mkdir(parents = True, exist_ok = True)
    except OSError as error:
        raise UsageError(f'--out: cannot make the folder {out.parent} ({error.strerror or error})') from None
    return out


def write_json(path: Path, value):
    path.parent.mkdir(parents = True, exist_ok = True)
    write_text_atomic(path, json.dumps(value, indent = 2) + '\n')
    print(f'wrote {path}')


# options of `sample` and `eval` that decide how a modality is sampled (digits_eval.Sampling)
SAMPLING_OPTIONS = ('modality_steps', 'ode_method', 'time_shift', 'cfg_scale', 'guidance_interval', 'guidance_schedule')


def given_options(args, keys: tuple[str, ...] = SAMPLING_OPTIONS) -> dict:
    """The sampling options given on the command line, by their `sample` names."""
    return {key: getattr(args, key) for key in keys if getattr(args, key) is not None}


def interval(text: str) -> tuple[float, float]:
    from .demos.digits_sweep import parse_interval
    try:
        return parse_interval(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected t_lo:t_hi (two numbers), got {text!r}') from None


def add_sampling_options(parser, default_steps: str):
    from .demos.digits_eval import Sampling
    default = Sampling()
    parser.add_argument('--modality-steps', type = positive_int, help = f'ODE steps per modality (default: {default_steps})')
    parser.add_argument('--ode-method', help = f'the ODE solver (default {default.ode_method})')
    parser.add_argument('--time-shift', type = float, help = f'time grid shift towards noise (default {default.time_shift:g})')
    parser.add_argument('--cfg-scale', type = float, help = f'classifier-free guidance scale (default {default.cfg_scale:g}, image-text runs: '
                                                            "the run's cfg_scale; 1 is off)")
    parser.add_argument('--guidance-interval', type = interval, metavar = 'T_LO:T_HI',
                        help = 'the times where guidance applies, t = 0 noise, t = 1 data (default {:g}:{:g})'.format(*default.guidance_interval))
    parser.add_argument('--guidance-schedule', help = f'constant, or linear (from no guidance at t_lo to cfg_scale at t_hi; default {default.guidance_schedule})')


def add_run_options(parser):
    """Options of `sample`, `eval` and `caption` for where a run's parts are and how it runs."""
    parser.add_argument('--vae', help = 'image-text runs: the VAE folder, if it moved since prepare')
    parser.add_argument('--tokenizer', help = 'image-text runs: the tokenizer folder, if it moved since prepare')
    parser.add_argument('--threads', type = positive_int, help = "torch CPU threads (default: the run's threads setting, else the torch default)")
