"""The image-text job's configuration: its keys (`ImageTextConfig`, each with its help), how a
TOML file and the command line are read into it, and which keys a rerun may change
(`config_files.check_rerun`). The job (`image_text.py`) and the commands on its runs (`run_commands.py`, `sampling.py`) read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config_files import load, load_saved
from ..flow import TIME_DISTRIBUTIONS
from ..training.parallelize import CHECKPOINTING


JOB = 'image_text'


def option(default, help: str):
    return field(default = default, metadata = dict(help = help))


def paths(value) -> tuple[str, ...]:
    """A folder, comma-separated folders, or a list of them."""
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(',') if p.strip())
    return tuple(value)


# the model's size without a language model (with one, the LM's)
MODEL_SIZE = dict(dim = 256, depth = 6, heads = 4, dim_head = 64)


@dataclass(kw_only = True)
class ImageTextConfig:
    job: str = option(JOB, 'the job: "image_text" (here) or "digits"')
    name: str = option(JOB, 'the run folder is <out_root>/<name>')
    out_root: str = option('runs', 'where run folders go')
    # data
    data: tuple[str, ...] | str = option((), 'one or more folders written by `transfusion prepare` (comma-separated on the command line)')
    data_weights: tuple[float, ...] | str | None = option(None, 'relative weights of the data folders (default: their sizes)')
    text_data: tuple[str, ...] | str = option((), 'folders of text-only rows (`transfusion prepare CORPUS --kind text`) mixed in')
    text_weight: float = option(0.2, 'share of samples drawn from text_data, when given')
    caption_fraction: float = option(0.2, 'share of image-caption pairs laid out image first (captioning); the rest are text to image')
    prob_uncond: float = option(0.1, 'share of samples whose text the model drops in training, for classifier-free guidance')
    vae: str | None = option(None, 'the VAE folder, if it moved since prepare (default: the path recorded with the data)')
    tokenizer: str | None = option(None, 'the tokenizer folder, if it moved since prepare (default: the recorded path)')
    workers: int = option(2, 'DataLoader workers per process')
    shuffle_buffer: int = option(1000, 'samples in each reader\'s shuffle buffer')
    loader_timeout: float = option(300., 'seconds to wait for a DataLoader worker\'s batch before stopping with an error naming it (0: forever)')
    # model
    language_model: str | None = option(None, 'a local Hugging Face causal LM folder (save_pretrained: config.json and safetensors; '
                                              'Llama, Mistral, Qwen2, Qwen3) that the model starts from: dim, depth, heads and dim_head '
                                              'are then its own, and the data must be tokenized with its tokenizer')
    separate_modality_weights: bool | None = option(None, 'latent tokens get their own copy of every transformer weight, initialised '
                                                          'from the text weights (LMFusion; default: on with language_model, off without)')
    freeze_language_model: bool | None = option(None, "the language model's weights get no gradient, so its text behaviour stays "
                                                      'exact (LMFusion; default: on with language_model when separate_modality_weights is)')
    dim: int | None = option(None, f"transformer width (default {MODEL_SIZE['dim']}; with language_model, the LM's)")
    depth: int | None = option(None, f"transformer blocks (default {MODEL_SIZE['depth']}; with language_model, the LM's)")
    heads: int | None = option(None, f"attention heads (default {MODEL_SIZE['heads']}; with language_model, the LM's)")
    dim_head: int | None = option(None, f"width of a head (default {MODEL_SIZE['dim_head']}; with language_model, the LM's)")
    flow_loss_weight: float = option(1., 'weight of the flow-matching loss against the text loss')
    time_distribution: str = option('logit_normal', "times a modality is trained at: 'logit_normal' (Esser et al., 2024; more of them mid-path) or 'uniform'")
    min_time_before_text: float = option(0.5, "a picture that text follows (a caption) is trained at t in [this, 1] (Transfusion; 0: no limit)")
    predict_clean: bool = option(False, 'predict the clean latent instead of the velocity (Li & He, 2025): for latent tokens wider than dim, such as large pixel patches')
    # training
    steps: int = option(10000, 'optimizer steps')
    max_tokens: int = option(4096, 'tokens per batch and process')
    grad_accum: int = option(1, 'batches per optimizer step')
    lr: float = option(1e-3, 'peak learning rate (warmup, then cosine decay to a tenth)')
    warmup_steps: int = option(200, 'linear warmup steps')
    weight_decay: float = option(0., 'AdamW weight decay')
    ema_beta: float = option(0.995, 'EMA decay of the weights used for sampling')
    seed: int = option(0, 'seed of the weights, data order and noise')
    strategy: str = option('ddp', '"ddp" or "fsdp" under torchrun')
    compile: bool = option(False, 'torch.compile each transformer block, batches padded to max_tokens (for GPUs; on CPU the first step takes minutes)')
    activation_checkpointing: str | None = option(None, '"selective" (every other block) or "full" (every block): recompute activations in the backward pass, to save memory')
    checkpoint_every: int = option(1000, 'steps between checkpoints')
    log_every: int = option(25, 'steps between metric lines')
    # sampling during training
    sample_every: int = option(1000, 'steps between sample grids')
    prompts: tuple[str, ...] | str = option((), 'captions drawn in the sample grids ("|"-separated on the command line; default: the first 4 of the data)')
    samples_per_prompt: int = option(6, 'pictures per prompt in a grid')
    modality_steps: int = option(24, 'Euler steps from noise to picture when sampling')
    cfg_scale: float = option(3., 'classifier-free guidance scale when sampling (1: off)')
    threads: int = option(0, 'torch CPU threads (0: the torch default)')

    def __post_init__(self):
        if self.job != JOB:
            raise ValueError(f'job must be {JOB!r}, got {self.job!r}')
        self.data, self.text_data = paths(self.data), paths(self.text_data)
        if not self.data:
            raise ValueError("'data' is required: one or more folders written by `transfusion prepare`")
        if isinstance(self.data_weights, str):
            self.data_weights = tuple(float(w) for w in self.data_weights.split(','))
        if self.data_weights is not None and len(self.data_weights) != len(self.data):
            raise ValueError(f"'data_weights' needs one weight per data folder ({len(self.data)}), got {len(self.data_weights)}")
        if self.data_weights is not None and not (all(w >= 0 and math.isfinite(w) for w in self.data_weights) and sum(self.data_weights) > 0):
            raise ValueError(f"'data_weights' must be finite numbers >= 0, not all 0, got {tuple(self.data_weights)}")
        if isinstance(self.prompts, str):
            self.prompts = tuple(p.strip() for p in self.prompts.split('|') if p.strip())
        self.resolve_model_options()
        for name in ('dim', 'depth', 'heads', 'dim_head', 'steps', 'max_tokens', 'grad_accum', 'sample_every', 'samples_per_prompt',
                     'modality_steps', 'checkpoint_every', 'log_every', 'shuffle_buffer'):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"'{name}' must be positive, got {getattr(self, name)}")
        for name in ('caption_fraction', 'prob_uncond'):
            if not 0. <= getattr(self, name) <= 1.:
                raise ValueError(f"'{name}' must lie in [0, 1], got {getattr(self, name)}")
        if not 0. <= self.text_weight < 1.:
            raise ValueError(f"'text_weight' must lie in [0, 1), got {self.text_weight}")
        if self.workers < 0:
            raise ValueError(f"'workers' must be >= 0, got {self.workers}")
        if self.threads < 0:
            raise ValueError(f"'threads' must be >= 0 (0: the torch default), got {self.threads}")
        if not (self.loader_timeout >= 0 and math.isfinite(self.loader_timeout)):
            raise ValueError(f"'loader_timeout' must be a number of seconds >= 0 (0: wait forever), got {self.loader_timeout}")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f"'activation_checkpointing' must be one of {CHECKPOINTING}, got {self.activation_checkpointing!r}")
        if self.time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(f"'time_distribution' must be one of {TIME_DISTRIBUTIONS}, got {self.time_distribution!r}")
        if not 0. <= self.min_time_before_text < 1.:
            raise ValueError(f"'min_time_before_text' must lie in [0, 1) (0: no limit), got {self.min_time_before_text}")

    def resolve_model_options(self):
        """The model keys left out, as the run records them: with a language model, its size and
        LMFusion's recipe (separate modality weights, the LM frozen); without, MODEL_SIZE."""
        if self.language_model is not None:
            given = [name for name in MODEL_SIZE if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{', '.join(repr(name) for name in given)} {'comes' if len(given) == 1 else 'come'} from the language "
                                 f"model's config.json when 'language_model' is given ({self.language_model}); leave "
                                 f"{'it' if len(given) == 1 else 'them'} out")
            if self.separate_modality_weights is None:
                self.separate_modality_weights = True
            if self.freeze_language_model is None:
                self.freeze_language_model = self.separate_modality_weights
            return
        if self.freeze_language_model:
            raise ValueError("'freeze_language_model' freezes the weights of 'language_model', and no language_model is given")
        self.freeze_language_model, self.separate_modality_weights = False, bool(self.separate_modality_weights)
        for name, default in MODEL_SIZE.items():
            if getattr(self, name) is None:
                setattr(self, name, default)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_root) / self.name


def load_config(path = None, overrides: dict | None = None) -> ImageTextConfig:
    return load(ImageTextConfig, path, overrides)


# how long a run goes on, how it is watched and computed (compile and activation checkpointing:
# the same gradients, to float rounding), and where its VAE, tokenizer and language model are
# (each checked by its fingerprint instead): none changes the model, the data or the updates so far
RERUN_KEYS = ('steps', 'threads', 'checkpoint_every', 'log_every', 'sample_every', 'prompts', 'samples_per_prompt', 'modality_steps',
              'cfg_scale', 'vae', 'tokenizer', 'language_model', 'compile', 'activation_checkpointing', 'loader_timeout')


def load_run_config(run_dir) -> ImageTextConfig:
    """The config of the run in `run_dir`, at the defaults it was made with."""
    return load_saved(ImageTextConfig, Path(run_dir) / 'config.toml')[0]
