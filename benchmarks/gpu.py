"""Every GPU figure of issue 21 in one command: checks, MFU table, profile, eager side by side,
the walk-through, decoding and images.

    python benchmarks/gpu.py --out gpu.json                       # CUDA: all of it, at most 8 minutes on an H100 / H200
    python benchmarks/gpu.py --public-wheels DIR --out gpu.json   # the same, 0.20.0 installed from wheels (no network)
    python benchmarks/gpu.py --profile                            # the checks, the MFU table and its kernel tables only
    python benchmarks/gpu.py --dry-run --out dry.json             # CPU: every section at tiny sizes, in about a minute
    python benchmarks/gpu.py --download-public-wheels DIR         # where PyPI can be reached: 0.20.0's wheels for --public-wheels

The sections, in order (`--sections` picks some):

1. checks (`gpu_training.py`): compiled flex attention against SDPA, forward and backward; a
   block traces to one graph; one block mask per forward pass; the compiled, padded model
   against the eager one under bf16; no recompile for other batch lengths;
2. table (`gpu_training.py`): the image-text model (dim 1024, depth 16) and the Llama-3.2-1B
   shape on 16k-token batches, compiled, bf16 autocast, flex attention, with checkpointing
   none / full / selective: tokens/s, MFU against the measured bf16 matmul rate, peak memory;
3. profile (`gpu_profile.py`): for each model's first row, torch.profiler's kernels over a few
   steps after the measured ones, by kind (matmuls, attention forward / backward, index /
   scatter, aten elementwise & reductions, inductor-fused elementwise, other): ms per step and
   share; and the sparsity of the block mask of the batch;
4. eager (`gpu_eager.py`): eager training against the public package 0.20.0 (multimodal) and
   against `transformers`' LlamaForCausalLM (text only), each side in its own process: tokens/s,
   peak memory and their ratios;
5. walkthrough, decoding (`gpu_small.py`): the README walk-through's steps/s;
   `generate_text_only` steps/s (batch 8, 16-token prompt, 240 new tokens) and
   `generate_modality_only(batch_size = 16)` images/s on the 320M side-by-side model.

Time: each section and each table row has an estimated cost on an H100 / H200 (ESTIMATE_S); one
starts only while it and the required items after it (`Run`) fit in `--budget` seconds (450), so
the run ends within 8 minutes; what did not fit is listed. Every section prints its elapsed time.

A failed check or a section that raised does not stop the run; it ends with exit status 1 and
lists them. `--out` writes every figure as JSON, with the machine, torch version and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

# the benchmarks' modules, and this repository's package before any installed one
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import gpu_eager                                     # noqa: E402
import gpu_profile                                   # noqa: E402
import gpu_report                                    # noqa: E402
import gpu_small                                     # noqa: E402
import gpu_training                                  # noqa: E402
from gpu_common import ROOT                          # noqa: E402

SECTIONS = ('checks', 'table', 'profile', 'eager', 'walkthrough', 'decoding')
# seconds on an H100 / H200, first estimates (compiles included); the run prints what each took
ESTIMATE_S = dict(checks = 60, eager = 120, walkthrough = 45, decoding = 30, image_text = 30, llama = 45)


class Run:
    """The report being built, the clock and the budget. The checks, the table's rows of the
    first checkpointing mode (the figures of issue 21's targets) and the sections after the
    table are required: whatever starts leaves the time they are estimated to need. The other
    rows take what is left."""

    def __init__(self, args, device):
        self.args, self.device, self.start = args, device, time.perf_counter()
        self.report = dict(machine = machine(device, args), command = ' '.join(['python', 'benchmarks/gpu.py', *sys.argv[1:]]),
                           budget_s = args.budget, elapsed_s = {}, skipped = [], errors = {}, checks = gpu_training.CHECKS,
                           previous = gpu_report.PREVIOUS)
        self.required = {name: ESTIMATE_S[name] for name in ('checks',) if name in args.sections}
        if 'table' in args.sections:
            self.required.update({f'table: {model} / {args.modes[0]}': ESTIMATE_S[model] for model in args.models})
        self.required.update({name: ESTIMATE_S[name] for name in ('eager', 'walkthrough', 'decoding') if name in args.sections})

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def starts(self, what: str, cost: float) -> bool:
        """Whether `what`, of `cost` seconds, and the required items not yet run end within the
        budget; if not, it is skipped."""
        self.required.pop(what, None)
        if self.elapsed() + cost + sum(self.required.values()) <= self.args.budget:
            return True
        self.skip(what)
        return False

    @contextmanager
    def section(self, name: str):
        """Runs the body unless it does not fit; records its time, or its error and goes on."""
        if not self.starts(name, ESTIMATE_S[name]):
            yield False
            return
        print(f'\n== {name} ==', flush = True)
        start = time.perf_counter()
        try:
            yield True
        except Exception:
            self.report['errors'][name] = traceback.format_exc()
            print(f'  [ERROR] {name}:\n{traceback.format_exc()}', flush = True)
        self.report['elapsed_s'][name] = time.perf_counter() - start
        print(f'  ({name}: {self.report["elapsed_s"][name]:.1f} s; {self.elapsed():.0f} s in all)', flush = True)

    def skip(self, what: str):
        self.report['skipped'].append(what)
        print(f'\n== {what}: skipped, over --budget ({self.elapsed():.0f} s of {self.args.budget:.0f} s spent) ==', flush = True)


def machine(device, args) -> dict:
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd = ROOT, capture_output = True, text = True).stdout.strip()
    except OSError:
        commit = ''
    return dict(device = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU ({os.cpu_count()} cores)',
                torch = torch.__version__, cuda = torch.version.cuda, python = platform.python_version(), commit = commit or None,
                package = str(Path(sys.modules['transfusion_pytorch'].__file__).parent),
                date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec = 'seconds'), dry_run = args.dry_run)


def table(run: Run, shapes: dict, backend: str, use_flex: bool, folder: Path):
    """Checks, then the rows in mode order; the first row of each model is profiled when asked."""
    args, device = run.args, run.device
    if 'checks' in args.sections:
        with run.section('checks') as go:
            if go:
                gpu_training.run_checks(shapes['image_text'], device, backend, use_flex, folder)
    if 'table' not in args.sections:
        return
    start = time.perf_counter()
    peak = gpu_training.matmul_peak(device)
    run.report['machine']['bf16_matmul_tflops'] = peak / 1e12
    rows, profiles = run.report.setdefault('table', []), run.report.setdefault('profile', {})
    print(f'\n== table == (bf16 autocast, {backend}, {"flex attention" if use_flex else "SDPA"}; bf16 matmul peak {peak / 1e12:.1f} TFLOP/s)')
    for mode in args.modes:
        for name in args.models:
            what = f'table: {name} / {mode}'
            if not run.starts(what, ESTIMATE_S[name]):
                continue
            profile_steps = args.profile_steps if 'profile' in args.sections and name not in profiles else 0
            row_start = time.perf_counter()
            try:
                row = gpu_training.measure(name, shapes[name], mode, device, backend, use_flex, args.steps, args.warmup, peak, folder,
                                           profile_steps)
            except Exception:
                run.report['errors'][what] = traceback.format_exc()
                print(f'  [ERROR] {what}:\n{traceback.format_exc()}', flush = True)
                continue
            if 'profile' in row:
                profiles[name] = row.pop('profile')
                gpu_profile.print_profile(name, profiles[name])
            rows.append(row)
            run.report['elapsed_s'][what] = time.perf_counter() - row_start
            print(f'  ({what}: {run.report["elapsed_s"][what]:.1f} s; {run.elapsed():.0f} s in all)', flush = True)
    run.report['elapsed_s']['table'] = time.perf_counter() - start


def parse_value(text: str):
    """'False' -> False, '2' -> 2, '0.5' -> 0.5, anything else stays a string."""
    try:
        return json.loads(text.lower() if text.lower() in ('true', 'false', 'null') else text)
    except ValueError:
        return text


def parse_args(argv = None):
    parser = argparse.ArgumentParser(description = __doc__.split('\n\n')[0])
    parser.add_argument('--dry-run', action = 'store_true', help = 'CPU, tiny sizes, the aot_eager backend: every section, quickly')
    parser.add_argument('--out', type = Path, help = 'write every figure here as JSON')
    parser.add_argument('--sections', nargs = '+', default = list(SECTIONS), choices = SECTIONS)
    parser.add_argument('--profile', action = 'store_true', help = 'the checks, the table and its kernel tables only')
    parser.add_argument('--models', nargs = '+', default = list(gpu_training.FULL), choices = list(gpu_training.FULL))
    parser.add_argument('--modes', nargs = '+', default = list(gpu_training.MODES), choices = gpu_training.MODES,
                        help = 'activation checkpointing modes, in this order')
    parser.add_argument('--tokens', type = int, help = 'packed tokens per batch of the table (default: 16384; 400 with --dry-run)')
    parser.add_argument('--steps', type = int, help = 'measured steps per table row (default 5; 1 with --dry-run)')
    parser.add_argument('--warmup', type = int, help = 'warm-up steps per table row, the compile included (default 2; 1 with --dry-run)')
    parser.add_argument('--profile-steps', type = int, help = 'steps profiled per model (default 2; 1 with --dry-run)')
    parser.add_argument('--backend', help = 'torch.compile backend (default: inductor; aot_eager with --dry-run)')
    parser.add_argument('--budget', type = float, help = 'seconds: nothing starts that would end past them (default 450; none with --dry-run)')
    parser.add_argument('--public-wheels', help = f'a folder of wheels of transfusion-pytorch 0.20.0 and its requirements (or ${gpu_eager.WHEELS_ENV})')
    parser.add_argument('--public-python', help = 'an interpreter that imports transfusion-pytorch 0.20.0 (its own virtualenv)')
    parser.add_argument('--download-public-wheels', type = Path, metavar = 'DIR', help = 'write the wheels for --public-wheels into DIR and exit')
    parser.add_argument('--eager-decode-option', metavar = 'KEY=VALUE',
                        help = 'the generate_text_only keyword that turns the fast decode path off (default: gpu_small.EAGER_DECODE)')
    args = parser.parse_args(argv)
    if args.profile:
        args.sections = ['checks', 'table', 'profile']
    if 'profile' in args.sections and 'table' not in args.sections:
        args.sections.append('table')           # the profile is of the table's steps
    tiny = args.dry_run
    for name, full, dry in (('steps', 5, 1), ('warmup', 2, 1), ('profile_steps', 2, 1)):
        if getattr(args, name) is None:
            setattr(args, name, dry if tiny else full)
    if args.budget is None:
        args.budget = float('inf') if tiny else 450.
    if args.public_wheels and not Path(args.public_wheels).is_dir():
        parser.error(f'--public-wheels: {args.public_wheels} is not a folder')
    args.eager_decode = gpu_small.EAGER_DECODE
    if args.eager_decode_option:
        key, sep, value = args.eager_decode_option.partition('=')
        if not sep or not key.isidentifier():
            parser.error(f'--eager-decode-option: expected KEY=VALUE, such as static_decode=False, got {args.eager_decode_option!r}')
        args.eager_decode = {key: parse_value(value)}
    return args


def main(argv = None):
    args = parse_args(argv)
    if args.download_public_wheels:
        print('\n'.join(gpu_eager.download_public_wheels(args.download_public_wheels)))
        print(f'-> {args.download_public_wheels}; then: python benchmarks/gpu.py --public-wheels {args.download_public_wheels}')
        return 0
    if args.dry_run:
        device, shapes, backend = torch.device('cpu'), gpu_training.TINY, args.backend or 'aot_eager'
        torch.set_num_threads(1)                        # tiny models run fastest on one thread
        os.environ['OMP_NUM_THREADS'] = '1'             # and so do the workers
    else:
        if not torch.cuda.is_available():
            sys.exit('benchmarks/gpu.py needs a CUDA device (or --dry-run)')
        device, shapes, backend = torch.device('cuda'), gpu_training.FULL, args.backend or 'inductor'
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.tokens is not None:
        shapes = {name: replace(shape, tokens = args.tokens) for name, shape in shapes.items()}
    # one compiled graph per model and checkpointing mode, all on `Module._call_impl`
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    warnings.filterwarnings('ignore', message = '.*flex_attention.*')

    run = Run(args, device)
    with tempfile.TemporaryDirectory() as folder:
        table(run, shapes, backend, device.type == 'cuda', Path(folder))
        if 'eager' in args.sections:
            with run.section('eager') as go:
                if go:
                    run.report['eager'] = gpu_eager.side_by_side(device, args.dry_run, args, Path(folder))
        if 'walkthrough' in args.sections:
            with run.section('walkthrough') as go:
                if go:
                    run.report['walkthrough'] = gpu_small.walkthrough(args.dry_run)
                    print(f'  walk-through: {run.report["walkthrough"]["steps_per_s"]:,.1f} steps/s', flush = True)
        if 'decoding' in args.sections:
            with run.section('decoding') as go:
                if go:
                    run.report['decoding'] = gpu_small.decoding(device, args.dry_run, args.eager_decode)
    run.report['total_s'] = run.elapsed()
    run.report['targets'] = gpu_report.targets(run.report)
    run.report['failed_checks'] = [c['message'] for c in gpu_training.CHECKS if not c['ok']]
    gpu_report.print_summary(run.report)
    if args.out:
        args.out.parent.mkdir(parents = True, exist_ok = True)
        args.out.write_text(json.dumps(run.report, indent = 1))
        print(f'wrote {args.out}')
    return 1 if run.report['failed_checks'] or run.report['errors'] else 0


if __name__ == '__main__':
    sys.exit(main())
