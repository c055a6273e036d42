"""Drawing and captioning with a model trained by the image-text job, and the commands

    transfusion sample RUN --prompt "a red circle at the top left" --num 8 --out grid.png
    transfusion caption RUN picture.png [more.png ...]
    transfusion eval RUN              (runs on the walk-through set: the checker's figures)

The run's data.json says how text becomes ids (the tokenizer) and latents become pictures (the
patch codec or the VAE, loaded from the recorded path or `--vae`, and checked to be the same).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..data import codecs, images, shapes, tokenizers
from ..demos.digits_eval import first_modality, text_after_modality


@dataclass
class Assets:
    """What turns text into a prompt and latents into pictures, for one run."""
    tokenizer: object
    codec: object
    shape: tuple[int, int]
    image_size: int
    max_caption_tokens: int

    @classmethod
    def of(cls, record: dict, vae: str | None = None, tokenizer: str | None = None, device = 'cpu') -> Assets:
        return cls(tokenizers.from_description(record['tokenizer'], tokenizer), codecs.from_description(record['codec'], vae, device),
                   tuple(record['shape']), record['image_size'], record['max_caption_tokens'])


# how this job samples unless told otherwise: the settings its figures were measured with (Euler,
# guidance at every step), not `sample`'s defaults, which were measured on the digits
SAMPLING = dict(ode_method = 'euler', guidance_interval = (0., 1.))


@torch.no_grad()
def draw(model, assets: Assets, prompts: list[str], modality_steps: int = 24, cfg_scale: float = 3., seed: int = 0,
         batch_size: int = 64, **sampling) -> Tensor:
    """(len(prompts), 3, h, w) pictures in [-1, 1] drawn for the prompts; `sampling`: other
    options of `model.sample` (`ode_method`, `time_shift`, `guidance_interval`, ...)."""
    sampling = {**SAMPLING, **sampling}
    pictures = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [torch.tensor(t, dtype = torch.long) for t in assets.tokenizer.encode(chunk)]
        samples = model.sample(
            [[i.to(model.device)] for i in ids], force_modality_at_start = (0, assets.shape),
            max_length = 0,                     # the forced picture is generated in full, and nothing after it
            modality_steps = modality_steps, cfg_scale = cfg_scale, seed = seed + start, return_latents = True, **sampling,
        )
        pictures.append(assets.codec.decode(torch.stack([first_modality(s) for s in samples])))
    return torch.cat(pictures)


@torch.no_grad()
def caption(model, assets: Assets, pixels: Tensor, batch_size: int = 64) -> list[str]:
    """The caption the model writes greedily after each picture, (n, 3, h, w) in [-1, 1]."""
    out = []
    for start in range(0, len(pixels), batch_size):
        latents, _ = assets.codec.encode(pixels[start:start + batch_size])       # the posterior mean
        budget = assets.max_caption_tokens + 1                                  # generated after the picture: the caption and EOS
        samples = model.sample([[latent.to(model.device)] for latent in latents], max_length = budget, text_temperature = 0.,
                               return_latents = True)
        out.extend(assets.tokenizer.decode(text_after_modality(s)).strip() for s in samples)
    return out


def shapes_match_rate(pixels: Tensor, prompts: list[str]) -> float | None:
    """For walk-through captions, the share of (n, 3, h, w) pictures the checker reads as their
    prompt; None when a prompt is not one of them."""
    if any(shapes.parse_caption(p) is None for p in prompts):
        return None
    return shapes.match_rate(images.to_uint8(pixels), prompts)


def load_picture(path: str | Path, image_size: int) -> Tensor:
    """A picture file as the data was prepared: resized and centre-cropped, (3, s, s) in [-1, 1]."""
    return images.to_tensor(images.resize_for(images.decode(lambda: Path(path)), image_size, None))


# loading a run

def is_image_text_run(path: str | Path) -> bool:
    return (Path(path) / 'data.json').exists()


def load_run(run: str | Path, ema: bool = True, vae: str | None = None, tokenizer: str | None = None):
    """(model, assets, record) of an image-text run folder."""
    from ..model import Transfusion
    run = Path(run)
    record = json.loads((run / 'data.json').read_text())
    threads = run_setting(run, 'threads', None)
    if threads > 0:
        torch.set_num_threads(threads)              # as the run trained
    model_dir = run / ('pretrained_ema' if ema else 'pretrained')
    if not (model_dir / 'config.json').exists():
        model_dir = run / 'pretrained'
    if not (model_dir / 'config.json').exists():
        from ..cli import UsageError
        raise UsageError(f'{run} has no trained model yet (no pretrained/ folder): has its training finished?')
    return Transfusion.from_pretrained(model_dir).eval(), Assets.of(record, vae, tokenizer), record


# the commands

def given_sampling(args) -> dict:
    """The sampling options given on the command line besides the steps and the scale (the run's own when not given)."""
    from ..cli import given_options
    return given_options(args, ('ode_method', 'time_shift', 'guidance_interval', 'guidance_schedule'))


def run_setting(run: str | Path, key: str, given):
    """`given` when not None, else the run's own setting in its config.toml."""
    if given is not None:
        return given
    from .image_text import load_config
    return getattr(load_config(Path(run) / 'config.toml'), key)


def command_sample(args):
    from ..cli import UsageError, output_path
    from .pictures import save_image_grid
    if args.prompt is None:
        raise UsageError('--prompt: an image-text run draws pictures for a caption; give one, e.g. --prompt "a red circle at the top left"')
    if args.max_length is not None:
        raise UsageError('--max-length is for models other than digits and image-text runs: these write one prompt and one picture')
    out = output_path(args.out or 'samples.png', image = True)
    model, assets, _ = load_run(args.model, ema = not args.no_ema, vae = args.vae)
    rows = [p.strip() for p in args.prompt.split('|') if p.strip()]          # "a|b": one row per prompt
    prompts = [p for p in rows for _ in range(args.num)]
    pixels = draw(model, assets, prompts, run_setting(args.model, 'modality_steps', args.modality_steps),
                  run_setting(args.model, 'cfg_scale', args.cfg_scale), seed = args.seed, **given_sampling(args))
    save_image_grid(pixels.reshape(len(rows), args.num, *pixels.shape[1:]), out, rows)
    rate = shapes_match_rate(pixels, prompts)
    read = f'; the checker reads {rate:.0%} of them as their prompt' if rate is not None else ''
    print(f'wrote {len(prompts)} pictures of {" | ".join(rows)} to {out}{read}')
    return out


def command_caption(args):
    from ..cli import UsageError
    missing = [p for p in args.pictures if not Path(p).is_file()]
    if missing:
        raise UsageError(f'no such picture file: {missing[0]}')
    model, assets, _ = load_run(args.model, ema = not args.no_ema, vae = args.vae)
    pixels = torch.stack([load_picture(path, assets.image_size) for path in args.pictures])
    captions = caption(model, assets, pixels)
    for path, text in zip(args.pictures, captions):
        print(f'{path}: {text}' if len(args.pictures) > 1 else text)
    return captions


def evaluate_shapes(model, assets: Assets, per_caption: int = 4, num_captions: int = 192, modality_steps: int = 24,
                    cfg_scale: float = 3., seed: int = 0, **sampling) -> dict:
    """On the walk-through set: (text to image) every caption drawn `per_caption` times and read by
    the checker; (captioning) fresh drawings, never seen in training (another seed), captioned
    greedily and compared word for word."""
    kinds = shapes.all_drawings()
    prompts = [k.caption for k in kinds for _ in range(per_caption)]
    pixels = draw(model, assets, prompts, modality_steps, cfg_scale, seed = seed, **sampling)
    readings = [shapes.read_drawing(p) for p in images.to_uint8(pixels)]
    parts = {name: sum(getattr(r, name) == getattr(shapes.parse_caption(c), name) for r, c in zip(readings, prompts)) / len(prompts)
             for name in ('shape', 'colour', 'position')}
    fresh = list(shapes.pictures(num_captions, assets.image_size, seed = 10_000 + seed))
    truth = [c for _, _, c in fresh]
    written = caption(model, assets, torch.stack([images.to_tensor(image) for _, image, _ in fresh]))
    return dict(text_to_image = shapes.match_rate(images.to_uint8(pixels), prompts), num_drawings = len(prompts),
                **{f'text_to_image_{k}': v for k, v in parts.items()},
                captioning = sum(w == t for w, t in zip(written, truth)) / len(truth), num_captions = len(truth),
                caption_examples = [dict(truth = t, written = w) for t, w in list(zip(truth, written))[:5]])


def command_eval(args):
    from ..cli import UsageError
    if args.sweep is not None:
        raise UsageError('--sweep measures digits runs (their reader and feature space); not an image-text run')
    model, assets, _ = load_run(args.model, ema = not args.no_ema)
    results = evaluate_shapes(model, assets, per_caption = args.per_caption, cfg_scale = run_setting(args.model, 'cfg_scale', args.cfg_scale),
                              seed = args.seed or 0, modality_steps = run_setting(args.model, 'modality_steps', args.modality_steps),
                              **given_sampling(args))
    print(f"text to image: {results['text_to_image']:.1%} of {results['num_drawings']} drawings read by the checker as their caption "
          f"(shape {results['text_to_image_shape']:.0%}, colour {results['text_to_image_colour']:.0%}, "
          f"position {results['text_to_image_position']:.0%})")
    print(f"captioning: {results['captioning']:.1%} of {results['num_captions']} new drawings captioned word for word right")
    out = Path(args.out) if args.out else Path(args.model) / 'eval.json'
    out.write_text(json.dumps(results, indent = 2) + '\n')
    print(f'wrote {out}')
    return results
