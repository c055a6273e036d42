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

from ..config_files import ConfigError
from ..data import codecs, images, shapes, tokenizers
from ..demos.digits_eval import first_modality, text_after_modality


@dataclass
class Assets:
    """What turns text into a prompt and latents into pictures, for one run."""
    tokenizer: object
    codec: object
    shape: tuple[int, int]                  # the latent shape drawn unless another is asked for: the most common one
    image_size: int
    max_caption_tokens: int
    shapes: tuple[tuple[int, int], ...] = ()    # every latent shape the run trained on (its buckets)

    @classmethod
    def of(cls, record: dict, vae: str | None = None, tokenizer: str | None = None, device = 'cpu') -> Assets:
        """The run's tokenizer and codec from their recorded folders, or from `tokenizer` / `vae`
        when given (a folder that moved); a folder that is not there is a ConfigError naming the
        option to pass."""
        shapes = tuple(tuple(s) for s in record.get('shapes', [record['shape']]))
        return cls(load_asset(tokenizers.from_description, record['tokenizer'], tokenizer, 'tokenizer'),
                   load_asset(codecs.from_description, record['codec'], vae, 'vae', device),
                   tuple(record['shape']), record['image_size'], record['max_caption_tokens'], shapes)

    @property
    def stride(self) -> int:
        """Pixels per latent cell along each side."""
        return self.codec.stride

    def latent_shape(self, size: str) -> tuple[int, int]:
        """'WIDTHxHEIGHT' in pixels -> the latent shape (h, w), one the run trained on."""
        trained = ', '.join(f'{w * self.stride}x{h * self.stride}' for h, w in self.shapes)
        try:
            width, height = (int(n) for n in size.lower().split('x'))
        except ValueError:
            raise ConfigError(f'--shape: expected WIDTHxHEIGHT in pixels, such as {trained.split(",")[0]}, got {size!r}') from None
        if width % self.stride or height % self.stride or (height // self.stride, width // self.stride) not in self.shapes:
            raise ConfigError(f'--shape {size}: this run was trained on pictures of {trained} pixels (width x height; its '
                              f'{"buckets" if len(self.shapes) > 1 else "one size"}), so it draws those; give one of them')
        return height // self.stride, width // self.stride


def load_asset(load, description: dict, given: str | None, option: str, *args):
    """`load(description, given, ...)`, its errors one line naming the folder and the option: a
    missing folder, one that does not load, another tokenizer or VAE than the run's."""
    try:
        return load(description, given, *args)
    except (OSError, ValueError) as error:
        if given is not None:
            raise ConfigError(f'--{option} {given}: {error}') from None
        if isinstance(error, FileNotFoundError):
            raise ConfigError(f"the run's {option} folder {description.get('path')} is not there any more ({error}): if it moved, "
                              f'give its new folder with --{option}') from None
        raise ConfigError(f"the run's {option} folder {description.get('path')}: {error}") from None


# how this job samples unless told otherwise: the settings its figures were measured with (Euler,
# guidance at every step), not `sample`'s defaults, which were measured on the digits
SAMPLING = dict(ode_method = 'euler', guidance_interval = (0., 1.))


@torch.no_grad()
def draw(model, assets: Assets, prompts: list[str], modality_steps: int = 24, cfg_scale: float = 3., seed: int = 0,
         batch_size: int = 64, shape: tuple[int, int] | None = None, **sampling) -> Tensor:
    """(len(prompts), 3, h, w) pictures in [-1, 1] drawn for the prompts, of the latent `shape`
    (default: the run's most common one, `assets.shape`); `sampling`: other options of
    `model.sample` (`ode_method`, `time_shift`, `guidance_interval`, ...)."""
    sampling = {**SAMPLING, **sampling}
    shape = tuple(shape) if shape is not None else assets.shape
    pictures = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [torch.tensor(t, dtype = torch.long) for t in assets.tokenizer.encode(chunk)]
        samples = model.sample(
            [[i.to(model.device)] for i in ids], force_modality_at_start = (0, shape),
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


def load_run(run: str | Path, ema: bool = True, vae: str | None = None, tokenizer: str | None = None, threads: int | None = None):
    """(model, assets, record) of an image-text run folder; `threads`: torch CPU threads (default:
    the run's own setting)."""
    from ..cli import UsageError
    from ..model import Transfusion
    run = Path(run)
    if not is_image_text_run(run):
        what = 'a run of the digits job' if (run / 'config.toml').exists() else 'no run folder'
        raise UsageError(f'{run} is {what}, not a run of the image_text job (a folder of `transfusion train --job image_text`, '
                         'with data.json)')
    record = json.loads((run / 'data.json').read_text())
    threads = run_setting(run, 'threads', threads)
    if threads > 0:
        torch.set_num_threads(threads)              # as the run trained, unless told otherwise
    model_dir = run / ('pretrained_ema' if ema else 'pretrained')
    if not (model_dir / 'config.json').exists():
        model_dir = run / 'pretrained'
    if not (model_dir / 'config.json').exists():
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


def prompt_rows(prompt: str | None) -> list[str]:
    """--prompt "a|b" -> one caption per row; an empty caption is an error."""
    from ..cli import UsageError
    if prompt is None:
        raise UsageError('--prompt: an image-text run draws pictures for a caption; give one, e.g. --prompt "a red circle at the top left"')
    rows = [p.strip() for p in prompt.split('|')]
    if not all(rows):
        raise UsageError(f'--prompt: expected one caption, or captions separated by "|", none of them empty; got {prompt!r}')
    return rows


def command_sample(args):
    from ..cli import UsageError, output_path
    from .pictures import save_image_grid
    rows = prompt_rows(args.prompt)                                         # "a|b": one row per prompt
    if args.max_length is not None:
        raise UsageError('--max-length is for models other than digits and image-text runs: these write one prompt and one picture')
    out = output_path(args.out or 'samples.png', image = True)
    model, assets, _ = load_run(args.model, ema = not args.no_ema, vae = args.vae, tokenizer = args.tokenizer, threads = args.threads)
    shape = assets.latent_shape(args.shape) if args.shape is not None else None
    prompts = [p for p in rows for _ in range(args.num)]
    pixels = draw(model, assets, prompts, run_setting(args.model, 'modality_steps', args.modality_steps),
                  run_setting(args.model, 'cfg_scale', args.cfg_scale), seed = args.seed, shape = shape, **given_sampling(args))
    save_image_grid(pixels.reshape(len(rows), args.num, *pixels.shape[1:]), out, rows)
    rate = shapes_match_rate(pixels, prompts)
    read = f'; the checker reads {rate:.0%} of them as their prompt' if rate is not None else ''
    size = f' ({pixels.shape[-1]}x{pixels.shape[-2]} pixels)' if shape is not None else ''
    print(f'wrote {len(prompts)} pictures of {" | ".join(rows)} to {out}{size}{read}')
    return out


def command_caption(args):
    from ..cli import UsageError
    missing = [p for p in args.pictures if not Path(p).is_file()]
    if missing:
        raise UsageError(f'no such picture file: {missing[0]}')
    model, assets, _ = load_run(args.model, ema = not args.no_ema, vae = args.vae, tokenizer = args.tokenizer, threads = args.threads)
    pictures = []
    for path in args.pictures:
        try:
            pictures.append(load_picture(path, assets.image_size))
        except images.UnreadableImage as error:
            raise UsageError(f'{path} is not a picture that can be read ({error})') from None
    captions = caption(model, assets, torch.stack(pictures))
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
    from ..cli import UsageError, output_path, write_json
    if args.sweep is not None:
        raise UsageError('--sweep measures digits runs (their reader and feature space); not an image-text run')
    out = output_path(args.out) if args.out else Path(args.model) / 'eval.json'
    model, assets, record = load_run(args.model, ema = not args.no_ema, vae = args.vae, tokenizer = args.tokenizer, threads = args.threads)
    check_walk_through(args.model, record, assets)
    results = evaluate_shapes(model, assets, per_caption = args.per_caption, cfg_scale = run_setting(args.model, 'cfg_scale', args.cfg_scale),
                              seed = args.seed or 0, modality_steps = run_setting(args.model, 'modality_steps', args.modality_steps),
                              **given_sampling(args))
    print(f"text to image: {results['text_to_image']:.1%} of {results['num_drawings']} drawings read by the checker as their caption "
          f"(shape {results['text_to_image_shape']:.0%}, colour {results['text_to_image_colour']:.0%}, "
          f"position {results['text_to_image_position']:.0%})")
    print(f"captioning: {results['captioning']:.1%} of {results['num_captions']} new drawings captioned word for word right")
    write_json(out, results)
    return results


def check_walk_through(run, record: dict, assets: Assets, count: int = 8):
    """`eval` measures runs on the walk-through set (its checker reads coloured shapes): a run
    whose first captions are not walk-through captions is refused. A run whose data folder is
    gone cannot be told apart; it is measured, with a word that it may not fit."""
    from ..cli import UsageError
    from ..data.shards import Prepared
    from .image_text import default_prompts
    folder = Path(record['folders'][0]['folder'])
    if not (folder / 'manifest.json').exists():
        print(f"note: eval measures runs on the walk-through set (`transfusion shapes`); {run}'s data {folder} is gone, so this is not checked")
        return
    captions = default_prompts([Prepared(folder)], assets.tokenizer, count)
    other = next((c for c in captions if shapes.parse_caption(c) is None), None)
    if other is not None:
        raise UsageError(f'eval measures runs on the walk-through set (captions such as "a red circle at the top left", read back by its '
                         f'checker); {run} was trained on other captions ({other!r}): draw with `transfusion sample` and caption with '
                         '`transfusion caption` instead')
