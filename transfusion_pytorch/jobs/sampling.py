"""Drawing and captioning with a model trained by the image-text job (its commands, `sample`,
`caption` and `eval`, are in `run_commands.py`).

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
    from ..cli_options import UsageError
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


def run_setting(run: str | Path, key: str, given):
    """`given` when not None, else the run's own setting in its config.toml."""
    if given is not None:
        return given
    from .image_text_config import load_run_config
    return getattr(load_run_config(run), key)
