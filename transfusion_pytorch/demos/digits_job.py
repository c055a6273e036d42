"""The digits job: `transfusion train` with no config. Trains a small Transfusion model on
scikit-learn's 8 x 8 digits to draw a digit from "draw <label>" and to caption a digit image
with "is <label>", with the trainer of `transfusion_pytorch.training`.

A run folder `<out_root>/<name>/` holds

    config.toml             the configuration, as loaded and overridden
    checkpoints/            training checkpoints (a rerun of the same command resumes)
    metrics.jsonl           loss, learning rate, tokens/s; eval figures at each evaluation
    samples/step_*.png      digits drawn for each label at each evaluation
    loss.png                the loss curves
    pretrained/, pretrained_ema/   the trained model (online and EMA weights)
    eval.json               written by `transfusion eval`
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..config_files import ConfigError, check_rerun, load, load_saved, to_toml, write_text_atomic
from ..flow import TIME_DISTRIBUTIONS
from ..model import Transfusion
from ..training import Every, TrainConfig, Trainer, distributed, packed_num_tokens
from . import digits_eval, plots
from .codecs import CUSTOM, make_codec
from .digits import NUM_TEXT_TOKENS, DigitsDataset, load_split


def option(default, help: str):
    return field(default = default, metadata = dict(help = help))


@dataclass(kw_only = True)
class DigitsConfig:
    job: str = option('digits', 'the job: "digits" (here) or "image_text" (its keys below)')
    name: str = option('digits', 'the run folder is <out_root>/<name>')
    out_root: str = option('runs', 'where run folders go')
    # data
    codec: str = option('patch', '"patch": fixed patches; "unet": learned conv down / up blocks around the transformer; "custom": set by an example script')
    patch: int = option(4, 'patch size: an 8x8 image becomes an (8 / patch)^2 grid of latent tokens')
    caption_fraction: float = option(0.3, 'fraction of samples that are "image, is <label>" (the rest are "draw <label>, image")')
    # model
    dim: int = option(64, 'transformer width')
    depth: int = option(3, 'transformer blocks')
    heads: int = option(2, 'attention heads')
    dim_head: int = option(32, 'width of a head')
    flow_loss_weight: float = option(1., 'weight of the flow-matching loss against the text loss')
    time_distribution: str = option('logit_normal', "times a modality is trained at: 'logit_normal' (Esser et al., 2024; more of them mid-path) or 'uniform'")
    min_time_before_text: float = option(0.5, "a picture that text follows (a caption) is trained at t in [this, 1] (Transfusion; 0: no limit)")
    # training
    steps: int = option(2500, 'optimizer steps')
    max_tokens: int = option(512, 'tokens per batch (a sample is 14 tokens with patch 4, 26 with patch 2)')
    lr: float = option(2e-3, 'peak learning rate (warmup, then cosine decay to a tenth)')
    warmup_steps: int = option(50, 'linear warmup steps')
    weight_decay: float = option(0., 'AdamW weight decay')
    ema_beta: float = option(0.99, 'EMA decay of the weights used for sampling and evaluation')
    seed: int = option(0, 'seed of the weights, data order and noise')
    checkpoint_every: int = option(500, 'steps between checkpoints')
    compile: bool = option(False, 'torch.compile each transformer block, batches padded to max_tokens (for GPUs; on CPU the first step takes minutes)')
    activation_checkpointing: str | None = option(None, '"selective" (every other block) or "full" (every block): recompute activations in the backward pass, to save memory')
    eval_every: int = option(500, 'steps between evaluations (a grid of samples and quick figures)')
    eval_per_label: int = option(10, 'images drawn per label at each evaluation during training (2 to 139)')
    # sampling
    modality_steps: int = option(8, 'ODE steps from noise to image when sampling (midpoint: two model calls each; the other sampling settings are those of digits_eval.Sampling)')
    threads: int = option(1, 'torch CPU threads (0: the torch default); one is as fast for this small model and much faster on a busy machine')

    def __post_init__(self):
        if self.job != 'digits':
            raise ValueError(f"job must be 'digits', got {self.job!r}")
        for name in ('patch', 'dim', 'depth', 'heads', 'dim_head', 'steps', 'max_tokens', 'eval_every', 'eval_per_label', 'modality_steps'):
            if getattr(self, name) <= 0:
                raise ValueError(f"'{name}' must be positive, got {getattr(self, name)}")
        for f in fields(self):
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"'{f.name}' must be a finite number, got {getattr(self, f.name)}")
        if not 0 <= self.caption_fraction < 1:
            raise ValueError(f"'caption_fraction' must lie in [0, 1) (1 would leave no text-to-image samples), got {self.caption_fraction}")
        digits_eval.check_per_label(self.eval_per_label, "'eval_per_label'")
        if self.time_distribution not in TIME_DISTRIBUTIONS:
            raise ValueError(f"'time_distribution' must be one of {TIME_DISTRIBUTIONS}, got {self.time_distribution!r}")
        if not 0. <= self.min_time_before_text < 1.:
            raise ValueError(f"'min_time_before_text' must lie in [0, 1) (0: no limit), got {self.min_time_before_text}")
        if self.threads < 0:
            raise ValueError(f"'threads' must be >= 0 (0: the torch default), got {self.threads}")
        if self.codec != CUSTOM:
            make_codec(self.codec, self.patch)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_root) / self.name


def build_model(config: DigitsConfig, codec) -> Transfusion:
    torch.manual_seed(config.seed)
    return Transfusion(
        num_text_tokens = NUM_TEXT_TOKENS,
        dim_latent = codec.dim_latent,
        channel_first_latent = codec.channel_first,
        modality_default_shape = codec.shape,
        flow_loss_weight = config.flow_loss_weight,
        time_distribution = config.time_distribution,
        min_time_before_text = config.min_time_before_text,
        transformer = dict(dim = config.dim, depth = config.depth, heads = config.heads, dim_head = config.dim_head),
        **codec.model_kwargs(config.dim),
    )


def sample_grid(model, codec, path: Path, per_label: int, modality_steps: int, seed: int = 0, title: str | None = None) -> Path:
    labels = [label for label in range(10) for _ in range(per_label)]
    images = digits_eval.draw(model, codec, labels, digits_eval.Sampling(modality_steps = modality_steps), seed = seed)
    return plots.save_digit_grid(images.reshape(10, per_label, 8, 8), path, [f'draw {d}' for d in range(10)], title)


# the evaluation figures logged to metrics.jsonl during training
LOGGED = ('text_to_image_accuracy', 'frechet_distance', 'diversity', 'caption_accuracy', 'held_out_text_loss', 'held_out_flow_loss')


def evaluation_callback(config: DigitsConfig, codec, run_dir: Path):
    """Every `eval_every` steps: a grid of drawn digits and quick figures from the EMA model."""
    def evaluate(trainer, step):
        model = trainer.ema.module if trainer.ema is not None else trainer.model
        results = digits_eval.evaluate(model, codec, per_label = config.eval_per_label, seed = config.seed, num_captions = 100,
                                       sampling = digits_eval.Sampling(modality_steps = config.modality_steps))
        results = {key: results[key] for key in LOGGED}
        sample_grid(model, codec, run_dir / 'samples' / f'step_{step:06d}.png', 8, config.modality_steps, config.seed,
                    title = f"step {step}: drawn digits classified right {results['text_to_image_accuracy']:.0%}")
        tqdm.write(f'step {step}: ' + ', '.join(f'{k} {v:.3f}' for k, v in results.items()))
        return results
    return evaluate


# keys a rerun in the same run folder may change: how long the run trains (`steps`, to continue
# it) and how it is run and watched. They change neither the model, nor the data, nor the updates
# up to the step reached, since the trainer seeds each batch's noise by its place in the data
# (compile and activation checkpointing change how a step is computed, not what: the same
# gradients, to float rounding).
RERUN_KEYS = ('steps', 'threads', 'checkpoint_every', 'eval_every', 'eval_per_label', 'modality_steps', 'compile', 'activation_checkpointing')


@dataclass
class Job:
    """Everything a run needs, built and checked; nothing written yet."""
    config: DigitsConfig
    codec: object
    model: Transfusion
    dataset: object
    train_config: TrainConfig
    version: int                    # the format version of the run's defaults (versions.py), recorded in its config.toml


def prepare(config: DigitsConfig, codec = None, dataset = None) -> Job:
    """Checks the config against the run already in its folder, if any (a rerun keeps the defaults
    its run was made with), then builds the codec, model, data set and trainer config of the run.
    A value that one of them rejects (an odd `dim_head`, a negative `lr`) is a ConfigError here,
    before anything is written to disk."""
    if codec is not None:
        config = replace(config, codec = getattr(codec, 'name', CUSTOM))
    config, version = check_rerun(config, RERUN_KEYS)
    codec = codec or load_codec(config, config.run_dir)
    try:
        model = build_model(config, codec)
        train_config = TrainConfig(
            out_dir = str(config.run_dir), max_steps = config.steps, max_tokens = config.max_tokens, lr = config.lr,
            warmup_steps = config.warmup_steps, weight_decay = config.weight_decay, ema_beta = config.ema_beta,
            seed = config.seed, checkpoint_every = config.checkpoint_every, log_every = 25, keep_last = 2,
            compile = config.compile, activation_checkpointing = config.activation_checkpointing,
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f'config: {error}') from None
    if dataset is None:
        train_split, _ = load_split()
        dataset = DigitsDataset(codec.encode(train_split.images), train_split.labels, config.caption_fraction,
                                seed = config.seed, num_tokens_fn = packed_num_tokens(model))
        longest = max(dataset.num_tokens(i) for i in range(len(dataset)))
        if longest > config.max_tokens:
            raise ConfigError(f"config: 'max_tokens' = {config.max_tokens} holds no sample: one takes {longest} tokens "
                              f"with codec {config.codec!r} and patch {config.patch}")
    return Job(config, codec, model, dataset, train_config, version)


def train(config: DigitsConfig, codec = None, dataset = None) -> Path:
    """Runs (or resumes) the job; returns the run folder. `codec` defaults to `config.codec`.
    Checks the whole config before writing anything (see `prepare`). Runs with
    `config.threads` torch threads, restoring the number after."""
    job = prepare(config, codec, dataset)
    with distributed.torch_threads(config.threads):
        return run_job(job)


def run_job(job: Job) -> Path:
    config, codec, model, dataset = job.config, job.codec, job.model, job.dataset
    run_dir = config.run_dir
    run_dir.mkdir(parents = True, exist_ok = True)
    write_text_atomic(run_dir / 'config.toml', to_toml(config, job.version))
    if config.codec == CUSTOM:
        tmp = run_dir / 'codec.pt.tmp'
        torch.save(codec, tmp)                          # so that `transfusion sample / eval` can use it
        os.replace(tmp, run_dir / 'codec.pt')
    print(f'{sum(p.numel() for p in model.parameters()):,} parameters; {len(dataset)} samples; {config.steps} steps -> {run_dir}')

    start = time.perf_counter()
    Trainer(model, dataset, job.train_config, callbacks = [Every(config.eval_every, evaluation_callback(config, codec, run_dir))]).train()
    minutes = (time.perf_counter() - start) / 60

    plots.save_loss_curve(plots.read_metrics(run_dir / 'metrics.jsonl'), run_dir / 'loss.png')
    grids = sorted((run_dir / 'samples').glob('step_*.png'))
    print(f'trained in {minutes:.1f} min. Run folder: {run_dir}')
    print(f'  loss curve: {run_dir / "loss.png"}')
    if grids:
        print(f'  drawn digits: {grids[-1]} (and {len(grids) - 1} earlier grids in {run_dir / "samples"})')
    print(f'  model: {run_dir / "pretrained_ema"}   evaluate with: transfusion eval {run_dir}')
    return run_dir


def load_codec(config: DigitsConfig, run_dir: Path):
    """The codec of a run: made from its config, or loaded from the run for a custom one."""
    if config.codec != CUSTOM:
        return make_codec(config.codec, config.patch)
    if not (Path(run_dir) / 'codec.pt').exists():
        raise ConfigError(f"codec = {CUSTOM!r} is the codec an example script passes to digits_job.train "
                          f"(examples/train_vae.py, examples/train_latent_with_text.py), saved with its run as codec.pt; "
                          f"{run_dir} has no codec.pt")
    return torch.load(Path(run_dir) / 'codec.pt', weights_only = False)


def load_config(path = None, overrides: dict | None = None) -> DigitsConfig:
    return load(DigitsConfig, path, overrides)


def load_run_config(run_dir) -> DigitsConfig:
    """The config of the run in `run_dir`, at the defaults it was made with."""
    return load_saved(DigitsConfig, Path(run_dir) / 'config.toml')[0]
