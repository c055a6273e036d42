"""The commands on a run of the image-text job:

    transfusion sample RUN --prompt "a red circle at the top left" --num 8 --out grid.png
    transfusion caption RUN picture.png [more.png ...]
    transfusion eval RUN              (runs on the walk-through set: the checker's figures)

Drawing and captioning themselves are in `sampling.py`, which the job uses too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..cli_options import UsageError, given_options, output_path, write_json
from ..data import images, shapes
from ..sampler import SampleOptions
from .sampling import Assets, caption, draw, load_picture, load_run, run_setting, shapes_match_rate


def given_sampling(args) -> dict:
    """The sampling options given on the command line besides the steps and the scale (the run's own when not given)."""
    return given_options(args, ('ode_method', 'time_shift', 'guidance_interval', 'guidance_schedule'))


def sampling_settings(args) -> dict:
    """modality_steps, cfg_scale (the run's own when not given) and the other sampling options
    given, checked as `model.sample` checks them: a bad one is an error in what was asked,
    found before any drawing."""
    settings = dict(modality_steps = run_setting(args.model, 'modality_steps', args.modality_steps),
                    cfg_scale = run_setting(args.model, 'cfg_scale', args.cfg_scale), **given_sampling(args))
    try:
        SampleOptions(**settings)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return settings


def prompt_rows(prompt: str | None) -> list[str]:
    """--prompt "a|b" -> one caption per row; an empty caption is an error."""
    if prompt is None:
        raise UsageError('--prompt: an image-text run draws pictures for a caption; give one, e.g. --prompt "a red circle at the top left"')
    rows = [p.strip() for p in prompt.split('|')]
    if not all(rows):
        raise UsageError(f'--prompt: expected one caption, or captions separated by "|", none of them empty; got {prompt!r}')
    return rows


def command_sample(args):
    from .pictures import save_image_grid
    rows = prompt_rows(args.prompt)                                         # "a|b": one row per prompt
    if args.max_length is not None:
        raise UsageError('--max-length is for models other than digits and image-text runs: these write one prompt and one picture')
    out = output_path(args.out or 'samples.png', image = True)
    model, assets, _ = load_run(args.model, ema = not args.no_ema, vae = args.vae, tokenizer = args.tokenizer, threads = args.threads)
    shape = assets.latent_shape(args.shape) if args.shape is not None else None
    prompts = [p for p in rows for _ in range(args.num)]
    pixels = draw(model, assets, prompts, seed = args.seed, shape = shape, **sampling_settings(args))
    save_image_grid(pixels.reshape(len(rows), args.num, *pixels.shape[1:]), out, rows)
    rate = shapes_match_rate(pixels, prompts)
    read = f'; the checker reads {rate:.0%} of them as their prompt' if rate is not None else ''
    size = f' ({pixels.shape[-1]}x{pixels.shape[-2]} pixels)' if shape is not None else ''
    print(f'wrote {len(prompts)} pictures of {" | ".join(rows)} to {out}{size}{read}')
    return out


def command_caption(args):
    folder = next((p for p in args.pictures if Path(p).is_dir()), None)
    if folder is not None:
        raise UsageError(f'{folder} is a folder; give its picture files (such as {Path(folder) / "*.png"})')
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
    if args.sweep is not None:
        raise UsageError('--sweep measures digits runs (their reader and feature space); not an image-text run')
    out = output_path(args.out) if args.out else Path(args.model) / 'eval.json'
    model, assets, record = load_run(args.model, ema = not args.no_ema, vae = args.vae, tokenizer = args.tokenizer, threads = args.threads)
    check_walk_through(args.model, record, assets)
    results = evaluate_shapes(model, assets, per_caption = args.per_caption, seed = args.seed or 0, **sampling_settings(args))
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
