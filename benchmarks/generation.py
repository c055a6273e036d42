"""Generation speed, ours against the public `transfusion-pytorch==0.20.0`, side by side in one run.

    python benchmarks/generation.py

The public package lives in its own virtualenv, `.venv-reference` in the repository root,
created when absent with

    python -m venv .venv-reference && .venv-reference/bin/pip install torch==2.13.0 transfusion-pytorch==0.20.0

(torch pinned: an unpinned install pulls a CUDA build of several GB). Each package is
measured in its own subprocess (the reference with the virtualenv's python, from outside this
repository so that it imports the installed package), one after the other, with the same
thread count, the same model sizes and the same workloads:

- text: `generate_text_only` of 256 new tokens from a 1-token prompt, batch 1 -> tokens/s; the
  reference both with its key / value cache (`cache_kv = True`, its default since it gained
  one) and without (the contract's version had none);
- modality: `generate_modality_only` of a fixed shape with 16 steps, batch 4 -> samples/s;
- multimodal: `sample` of a text prompt followed by a forced modality of a fixed shape, with
  16 ODE steps and classifier-free guidance at 3 (the reference's default), stopping right
  after the modality (max_length set so in both) -> seconds per sample.

To say how close text decoding is to what this machine allows, the worker also records the
matrix products of one of our decoding steps (every `F.linear` call, through a
`TorchFunctionMode`) and replays them alone, with nothing else around them: at batch 1 they
read every weight once per token, so their time is a floor on the time per token of any
implementation of this model that computes in float32.

Weights cannot be shared (the two models are built differently); both are freshly initialised
with the same seed. Times are medians over repeats after a warm-up, then over rounds that
alternate the two packages (a shared machine changes speed from minute to minute). The load average is
printed: the machine may be shared, so compare figures taken at a low load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / '.venv-reference'
REFERENCE_PINS = ['torch==2.13.0', 'transfusion-pytorch==0.20.0']

CONFIG = dict(
    num_text_tokens = 256,
    dim_latent = 64,
    modality_default_shape = (16,),
    transformer = dict(dim = 256, depth = 4, dim_head = 64, heads = 4),
)
TEXT_TOKENS = 256
TEXT_BATCH = 1
MODALITY_BATCH = 4
MODALITY_STEPS = 16
PROMPT_LEN = 64
CFG_SCALE = 3.
# our sampler as docs/generation.md's speed figures were measured: Euler steps, guidance at every one (`sample`
# now defaults to midpoint steps and guidance for t in [0.6, 1])
OURS_SAMPLING = dict(ode_method = 'euler', guidance_interval = (0., 1.))


# the worker: runs in either environment

def timed(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(which: str, repeats: int) -> dict:
    import torch
    import transfusion_pytorch
    from transfusion_pytorch import Transfusion

    torch.set_num_threads(int(os.environ.get('BENCH_THREADS', 2)))
    torch.manual_seed(0)
    model = Transfusion(**CONFIG).eval()
    shape = CONFIG['modality_default_shape']
    n = math.prod(shape)
    prompt_text = torch.randint(0, CONFIG['num_text_tokens'], (PROMPT_LEN,))
    start_text = torch.randint(0, CONFIG['num_text_tokens'], (TEXT_BATCH, 1))

    if which == 'ours':
        def text():
            return model.generate_text_only(start_text, TEXT_TOKENS + 1)

        def modality():
            return model.generate_modality_only(batch_size = MODALITY_BATCH, modality_type = 0, modality_steps = MODALITY_STEPS,
                                                ode_method = OURS_SAMPLING['ode_method'])

        # the forced modality is generated in full, and nothing after it: the sample ends with it
        def multimodal():
            return model.sample([prompt_text], max_length = 0, force_modality_at_start = (0, shape),
                                modality_steps = MODALITY_STEPS, cfg_scale = CFG_SCALE, **OURS_SAMPLING)
    else:
        def text():
            return model.generate_text_only(start_text, TEXT_TOKENS + 1, cache_kv = True)

        def modality():
            return model.generate_modality_only(batch_size = MODALITY_BATCH, modality_type = 0, modality_steps = MODALITY_STEPS)

        # the reference counts generated tokens (modality tokens included) and stops past max_length
        def multimodal():
            return model.sample_one([prompt_text], max_length = n - 1, force_modality_at_start = (0, shape),
                                    modality_steps = MODALITY_STEPS, cfg_scale = CFG_SCALE, cache_kv = True)

        def text_uncached():
            return model.generate_text_only(start_text, TEXT_TOKENS + 1, cache_kv = False)

    with torch.no_grad():
        generated = text()
        assert generated.shape == (TEXT_BATCH, TEXT_TOKENS), generated.shape
        sample = multimodal()
        modalities = [x for x in sample if not torch.is_tensor(x) or x.is_floating_point()]
        assert len(modalities) == 1, f'{which}: expected exactly one modality, got {len(modalities)}'

        text_s = timed(text, repeats, warmup = 0)              # warmed up by the checks above
        modality_s = timed(modality, repeats)
        multimodal_s = timed(multimodal, repeats, warmup = 0)
        extra = dict(text_uncached_tokens_per_s = TEXT_BATCH * TEXT_TOKENS / timed(text_uncached, repeats)) if which == 'reference' \
            else dict(text_floor_tokens_per_s = TEXT_BATCH / matmul_floor(model, start_text, repeats))

    return dict(
        **extra,
        which = which,
        package = str(Path(transfusion_pytorch.__file__).parent),
        torch = torch.__version__,
        threads = torch.get_num_threads(),
        text_tokens_per_s = TEXT_BATCH * TEXT_TOKENS / text_s,
        modality_samples_per_s = MODALITY_BATCH / modality_s,
        multimodal_s_per_sample = multimodal_s,
    )


def matmul_floor(model, start_text, repeats: int) -> float:
    """Seconds per decoding step of the matrix products alone: the `F.linear` calls of one
    cached text step (batch of `start_text`'s rows), replayed back to back on fresh inputs."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from transfusion_pytorch.backends import CachedBackend

    class RecordLinear(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args = (), kwargs = None):
            kwargs = kwargs or {}
            if func is F.linear:
                bias = args[2] if len(args) > 2 else kwargs.get('bias')
                self.calls.append((args[0].shape, args[1], bias))
            return func(*args, **kwargs)

    backend = CachedBackend(model, start_text.shape[0], 8)
    backend.decode(start_text)                                  # the prompt
    with RecordLinear() as record:
        backend.decode(start_text)                              # one decoding step: one token per row
    calls = [(torch.randn(shape), weight, bias) for shape, weight, bias in record.calls]

    def replay():
        for _ in range(100):
            for x, weight, bias in calls:
                F.linear(x, weight, bias)

    return timed(replay, repeats) / 100


# the driver

def ensure_reference_venv() -> Path:
    python = VENV / 'bin' / 'python'
    if not python.exists():
        print(f'creating {VENV} with {" ".join(REFERENCE_PINS)} ...', flush = True)
        subprocess.run([sys.executable, '-m', 'venv', str(VENV)], check = True)
        subprocess.run([str(VENV / 'bin' / 'pip'), 'install', *REFERENCE_PINS], check = True)
    return python


def run_worker(python: str, which: str, repeats: int, threads: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key != 'PYTHONPATH'}
    env.update(BENCH_THREADS = str(threads), OMP_NUM_THREADS = str(threads), MKL_NUM_THREADS = str(threads))
    with tempfile.TemporaryDirectory() as cwd:      # outside the repository: the reference imports its own package
        out = subprocess.run([python, str(Path(__file__).resolve()), '--worker', which, '--repeats', str(repeats)],
                             cwd = cwd, env = env, check = True, capture_output = True, text = True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of_rounds(results: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in results) if isinstance(value, float) else value
            for key, value in results[0].items()}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f'{one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min) on {os.cpu_count()} cores'


def main():
    parser = argparse.ArgumentParser(description = __doc__.split('\n')[0])
    parser.add_argument('--repeats', type = int, default = 3)
    parser.add_argument('--threads', type = int, default = 2)
    parser.add_argument('--rounds', type = int, default = 2,
                        help = 'rounds of (ours, reference), alternated so that a shared machine slowing down hurts both alike; '
                               'each figure is the median over the rounds')
    parser.add_argument('--worker', choices = ['ours', 'reference'], help = argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.repeats)))
        return

    reference_python = ensure_reference_venv()
    print(f'load average before: {load()}', flush = True)
    rounds = {'ours': [], 'reference': []}
    for _ in range(args.rounds):
        for which, python in (('ours', sys.executable), ('reference', str(reference_python))):
            rounds[which].append(run_worker(python, which, args.repeats, args.threads))
            print(f'{which}: {json.dumps(rounds[which][-1])}\nload average: {load()}', flush = True)
    ours, reference = (median_of_rounds(rounds[which]) for which in ('ours', 'reference'))

    assert ours['package'].startswith(str(ROOT)), ours['package']
    assert not reference['package'].startswith(str(ROOT / 'transfusion_pytorch')), reference['package']

    model = CONFIG['transformer']
    print(f"\nmodel: dim {model['dim']}, depth {model['depth']}, heads {model['heads']} x {model['dim_head']}, "
          f"{CONFIG['num_text_tokens']} text tokens, latents {CONFIG['dim_latent']} x {CONFIG['modality_default_shape']}; "
          f"torch {ours['torch']} / {reference['torch']}, {args.threads} threads, median of {args.repeats} repeats, median of {args.rounds} rounds")
    rows = [
        (f'text tokens/s, generate_text_only, {TEXT_TOKENS} tokens, batch {TEXT_BATCH}', 'text_tokens_per_s', True),
        (f'the same, 0.20.0 without its KV cache (cache_kv = False)', ('text_tokens_per_s', 'text_uncached_tokens_per_s'), True),
        (f'modality samples/s, generate_modality_only, batch {MODALITY_BATCH}, {MODALITY_STEPS} steps', 'modality_samples_per_s', True),
        (f's per multimodal sample, {PROMPT_LEN}-token prompt + modality, cfg {CFG_SCALE:g}', 'multimodal_s_per_sample', False),
    ]
    print(f"\n| {'measure':<70} | {'ours':>9} | {'0.20.0':>9} | {'speed-up':>8} |")
    print(f"| {'-' * 70} | {'-' * 9}: | {'-' * 9}: | {'-' * 8}: |")
    for label, key, higher_is_better in rows:
        a, b = (ours[key], reference[key]) if isinstance(key, str) else (ours[key[0]], reference[key[1]])
        ratio = a / b if higher_is_better else b / a
        print(f'| {label:<70} | {a:>9.3f} | {b:>9.3f} | {ratio:>7.1f}x |')

    floor = ours['text_floor_tokens_per_s']
    target = 10 * reference['text_tokens_per_s']
    print(f"\nthe machine's bound for text: one step's matrix products alone run at {floor:.0f} steps/s "
          f"({1e3 / floor:.2f} ms); ours decodes at {ours['text_tokens_per_s'] / floor:.0%} of that, 0.20.0 (cached) at "
          f"{reference['text_tokens_per_s'] / floor:.0%}; 10x 0.20.0 ({target:.0f} tokens/s) would leave "
          f"{1e3 / target - 1e3 / floor:.2f} ms per token for everything but the matrix products")


if __name__ == '__main__':
    main()
