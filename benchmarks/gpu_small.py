"""Small models and generation on one GPU (issue 21, items 2 and 4):

- the walk-through: the README's coloured-shapes commands (`transfusion shapes`, `transfusion
  prepare --image-size 24 --patch 4`, `transfusion train --job image_text --dim 128 --depth 4
  --heads 4 --dim-head 32 --max-tokens 1024 --warmup-steps 100 --ema-beta 0.99 --sample-every
  500 --threads 1`) with fewer steps and drawings, in a process of its own; steps/s is read off
  the training loop itself (a callback's clock), over the steps after the first fifth, so it
  holds everything a user's run does per step: the loader, the host syncs, EMA, logging;
- decoding: `generate_text_only` as users call it (its defaults: on CUDA whatever fast path the
  library takes by default) on the side-by-side's 320M model (`gpu_eager.MULTIMODAL`), batch 8,
  a 16-token prompt, 240 new tokens, bf16 autocast: steps/s and new tokens/s;
- images: `generate_modality_only(batch_size = 16)` on the same model: images/s.

EAGER_DECODE is the hook for the static-cache / CUDA-graph decode path: the keyword argument of
`generate_text_only` that turns it off, `static_decode = False` (another with
`--eager-decode-option KEY=VALUE`). The eager call is timed too and its tokens are checked equal
to the default call's.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_training                                  # noqa: E402
from transfusion_pytorch import Transfusion          # noqa: E402
from gpu_common import run_worker, timed, worker_main   # noqa: E402
from gpu_eager import MULTIMODAL, transfusion_kwargs     # noqa: E402

# the `generate_text_only` keyword that turns the static-cache / CUDA-graph decode path off (on by
# default with CUDA; docs/decoding.md): the eager call is timed too and its tokens checked equal
EAGER_DECODE: dict | None = dict(static_decode = False)

WALKTHROUGH = dict(
    full = dict(drawings = 1000, steps = 300),
    tiny = dict(drawings = 48, steps = 6),
)
DECODING = dict(
    full = dict(batch = 8, prompt = 16, new = 240, images = 16, repeats = 2),
    tiny = dict(batch = 2, prompt = 4, new = 6, images = 2, repeats = 1),
)


# the walk-through, in its own process

def walkthrough_worker(spec: dict) -> dict:
    from transfusion_pytorch import cli
    from transfusion_pytorch.jobs import image_text
    folder, steps = Path(spec['folder']), spec['steps']
    cli.main(['shapes', str(folder / 'shapes'), '--num', str(spec['drawings']), '--size', '24'])
    cli.main(['prepare', str(folder / 'shapes'), '--out', str(folder / 'prepared'), '--image-size', '24', '--patch', '4'])
    clock = []
    config = image_text.ImageTextConfig(data = str(folder / 'prepared'), name = 'shapes', out_root = str(folder / 'runs'), dim = 128, depth = 4,
                                        heads = 4, dim_head = 32, steps = steps, max_tokens = 1024, warmup_steps = 100, ema_beta = 0.99,
                                        sample_every = 500, threads = 1)
    torch.set_num_threads(1)
    image_text.run_job(config, callbacks = [lambda trainer, step: clock.append(time.perf_counter())])
    skip = max(1, steps // 5)
    seconds = clock[-1] - clock[skip - 1]
    metrics = [json.loads(line) for line in (folder / 'runs' / 'shapes' / 'metrics.jsonl').read_text().splitlines()]
    rates = [m['tokens_per_s'] for m in metrics if 'tokens_per_s' in m][1:] or [m['tokens_per_s'] for m in metrics if 'tokens_per_s' in m]
    return dict(steps = steps, measured_steps = steps - skip, steps_per_s = (steps - skip) / seconds, ms_per_step = 1e3 * seconds / (steps - skip),
                tokens_per_s = sum(rates) / len(rates), device = 'cuda' if torch.cuda.is_available() else 'cpu')


def walkthrough(dry_run: bool) -> dict:
    size = WALKTHROUGH['tiny' if dry_run else 'full']
    with tempfile.TemporaryDirectory() as folder:
        result = run_worker(Path(__file__), dict(size, folder = folder, kind = 'walkthrough'))
    return dict(result, config = size)


# decoding and images, in this process

def decode_model(device, dry_run: bool):
    config = MULTIMODAL['tiny' if dry_run else 'full']
    torch.manual_seed(0)
    with torch.device(device):
        model = Transfusion(**transfusion_kwargs(config, device.type == 'cuda'))
    return model.eval(), config


def decoding(device, dry_run: bool, eager_option: dict | None) -> dict:
    """Steps/s of `generate_text_only` as called by default, and images/s of
    `generate_modality_only`; with `eager_option`, the eager path too, and its tokens against
    the default call's."""
    model, config = decode_model(device, dry_run)
    size = DECODING['tiny' if dry_run else 'full']
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config['vocab'], (size['batch'], size['prompt']), generator = generator).to(device)

    # the default call as users make it; on a CPU (the dry run) the static path, which is on by
    # default with CUDA only, is asked for, so that its code runs here too
    default = dict(static_decode = True) if device.type == 'cpu' else {}

    def decode(bf16: bool = True, **options):
        with torch.no_grad(), torch.autocast(device.type, dtype = torch.bfloat16, enabled = bf16):
            return model.generate_text_only(prompt, size['prompt'] + size['new'], seed = 0, **(options or default))

    def images():
        with torch.no_grad(), torch.autocast(device.type, dtype = torch.bfloat16):
            return model.generate_modality_only(batch_size = size['images'], seed = 0)

    seconds, all_seconds = timed(decode, device, size['repeats'])
    out = dict(config = dict(size, params = sum(p.numel() for p in model.parameters())), seconds = all_seconds,
               steps_per_s = size['new'] / seconds, new_tokens_per_s = size['batch'] * size['new'] / seconds)
    if eager_option is None:
        out['eager'] = ('not measured: no keyword to turn the fast decode path off is known (gpu_small.EAGER_DECODE, '
                        '--eager-decode-option KEY=VALUE)')
    else:
        eager_seconds, _ = timed(lambda: decode(**eager_option), device, 1)
        out['eager'] = dict(option = eager_option, steps_per_s = size['new'] / eager_seconds)
        # equal tokens are checked in float32: under bf16 the two paths sum attention in other
        # orders, and a random model's near-flat logits turn such rounding into other draws
        out['tokens_equal_eager'] = gpu_training.check(torch.equal(decode(False), decode(False, **eager_option)),
                                                       f'decoding: the default call\'s tokens = those of the eager call ({eager_option}), float32')
        fast, slow = decode(), decode(**eager_option)
        out['bf16_tokens_agreeing'] = (fast == slow).float().mean().item()
    image_seconds, _ = timed(images, device, size['repeats'])
    out['images_per_s'] = size['images'] / image_seconds
    print(f'  decoding: {out["steps_per_s"]:,.1f} steps/s, {out["new_tokens_per_s"]:,.0f} new tokens/s '
          f'(batch {size["batch"]}, {size["prompt"]}-token prompt, {size["new"]} new tokens, {out["config"]["params"] / 1e6:,.0f}M parameters); '
          f'generate_modality_only(batch_size = {size["images"]}): {out["images_per_s"]:,.1f} images/s', flush = True)
    return out


def run(spec: dict) -> dict:
    return walkthrough_worker(spec)


if __name__ == '__main__':
    worker_main(run)
