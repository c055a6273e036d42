"""The image-text job: `transfusion train --job image_text --data DIR [--key value ...]`, or the
same keys in a TOML file. Trains a Transfusion model on folders written by `transfusion
prepare` (image-caption pairs, optionally mixed with text-only rows) with the library's trainer
and the streaming loader of `transfusion_pytorch.data`.

A run folder `<out_root>/<name>/` holds

    config.toml                    the configuration, as loaded and overridden
    data.json                      the data: folders, weights, tokenizer, codec, latent shape
    language_model.json            with `language_model`: the LM's path, architecture and fingerprint
    checkpoints/                   training checkpoints, with the data position (a rerun resumes)
    metrics.jsonl, loss.png        loss, learning rate, tokens/s, the realised data mix
    samples/step_*.png             pictures drawn for the fixed prompts during training
    pretrained/, pretrained_ema/   the trained model

A rerun refuses data tokenized or encoded differently from the data.json of the run, and a
language model other than the one the run started from (`language_model.py`).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from ..config_files import ConfigError, load, to_toml, write_text_atomic
from ..data.loader import LoaderConfig, StreamingLoader, modality_tokens_of
from ..data.shards import Prepared, write_json
from ..flow import TIME_DISTRIBUTIONS
from ..model import Transfusion
from ..training import Every, TrainConfig, Trainer, distributed
from ..training.parallelize import CHECKPOINTING
from . import language_model, sampling

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


def check_rerun(config: ImageTextConfig):
    """A rerun resumes the run in the folder: refused when it would change what that run is
    (as the digits job does)."""
    path = config.run_dir / 'config.toml'
    if not path.exists():
        return
    saved = load(ImageTextConfig, path)
    ignored = set(RERUN_KEYS) | {'name', 'out_root'}
    changed = [f'{f.name} = {getattr(saved, f.name)!r} in the run, {getattr(config, f.name)!r} now'
               for f in fields(config) if f.name not in ignored and getattr(saved, f.name) != getattr(config, f.name)]
    if changed:
        raise ConfigError(f"{config.run_dir} holds a run with another config ({'; '.join(changed)}). A rerun resumes that run "
                          f"and may change only {', '.join(RERUN_KEYS)}: use another --name, or delete the folder to start over")


# the data of a run

def describe_data(config: ImageTextConfig, images: list[Prepared], texts: list[Prepared], weights: list[float]) -> dict:
    """What data.json records: the folders and their weights, the tokenizer and codec, the
    latent shape the model draws by default, every latent shape trained on (the buckets) and the
    longest caption."""
    shapes = Counter()
    for p in images:
        for name, stats in p.manifest['shapes'].items():
            shapes[name] += stats['count']
    shape = [int(n) for n in shapes.most_common(1)[0][0].split('x')]
    settings = images[0].manifest['settings']
    folders = [dict(folder = str(p.folder.resolve()), kind = p.kind, samples = p.num_samples, weight = w)
               for p, w in zip(images + texts, weights)]
    return dict(job = JOB, folders = folders, tokenizer = images[0].tokenizer, codec = images[0].codec, shape = shape,
                shapes = sorted([int(n) for n in name.split('x')] for name in shapes),
                image_size = settings['image_size'], buckets = settings['buckets'],
                max_caption_tokens = max(stats['max_text_tokens'] for p in images for stats in p.manifest['shapes'].values()))


def mix_weights(config: ImageTextConfig, images: list[Prepared], texts: list[Prepared]) -> list[float]:
    """Image folders share 1 - text_weight (by data_weights, or by size), text folders text_weight (by size)."""
    image_share = 1. - config.text_weight if texts else 1.
    given = list(config.data_weights) if config.data_weights is not None else [float(p.num_samples) for p in images]
    weights = [image_share * w / sum(given) for w in given]
    text_sizes = [float(p.num_samples) for p in texts]
    return weights + [config.text_weight * s / sum(text_sizes) for s in text_sizes]


def open_data(config: ImageTextConfig, run_dir: Path) -> tuple[list[Prepared], dict]:
    images = [Prepared(folder) for folder in config.data]
    texts = [Prepared(folder) for folder in config.text_data]
    for p in images:
        if p.kind != 'image_text':
            raise ValueError(f"'data': {p.folder} holds {p.kind} rows; image-caption folders go in 'data', text-only ones in 'text_data'")
    for p in texts:
        if p.kind != 'text':
            raise ValueError(f"'text_data': {p.folder} holds {p.kind} rows, not text-only rows")
    weights = mix_weights(config, images, texts)
    record = describe_data(config, images, texts, weights)
    before = run_dir / 'data.json'
    if before.exists():                             # a rerun: the same tokenizer and codec as the run
        recorded = json.loads(before.read_text())
        record['tokenizer'], record['codec'] = recorded['tokenizer'], recorded['codec']
    return images + texts, dict(record, weights = weights)


# the model

def build_model(config: ImageTextConfig, record: dict) -> Transfusion:
    torch.manual_seed(config.seed)
    options = dict(dim_latent = record['codec']['dim_latent'], modality_default_shape = tuple(record['shape']),
                   flow_loss_weight = config.flow_loss_weight, prob_uncond = config.prob_uncond, model_output_clean = config.predict_clean,
                   time_distribution = config.time_distribution, min_time_before_text = config.min_time_before_text)
    if config.language_model is not None:
        try:
            return Transfusion.from_language_model(config.language_model, separate_modality_weights = config.separate_modality_weights,
                                                   freeze_language_model = config.freeze_language_model, **options)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"'language_model': {error}") from None
    size = {name: getattr(config, name) for name in MODEL_SIZE}
    return Transfusion(num_text_tokens = record['tokenizer']['vocab_size'],
                       transformer = dict(size, separate_modality_weights = config.separate_modality_weights), **options)


def default_prompts(folders: list[Prepared], tokenizer, count: int = 4) -> list[str]:
    """The first `count` distinct captions of the first folder, decoded by `tokenizer` (the
    run's): a fixed set of prompts."""
    from ..data.shards import Shard
    prompts = []
    for path in folders[0].shard_paths():
        with Shard(path) as shard:
            for i in range(len(shard.samples)):
                text = tokenizer.decode(shard.tensors(i)['text'].tolist())
                if text and text not in prompts:
                    prompts.append(text)
                if len(prompts) == count:
                    return prompts
    return prompts


def grid_callback(config: ImageTextConfig, assets: sampling.Assets, prompts: list[str], run_dir: Path, is_main: bool):
    """Every `sample_every` steps: a grid of pictures for the fixed prompts, from the EMA model;
    for prompts of the walk-through set, the share whose drawing the checker reads as asked."""
    def sample(trainer, step):
        model = trainer.ema.module if trainer.ema is not None else trainer.model
        pixels = sampling.draw(model, assets, [p for p in prompts for _ in range(config.samples_per_prompt)],
                               config.modality_steps, config.cfg_scale, seed = config.seed)
        pixels = pixels.reshape(len(prompts), config.samples_per_prompt, *pixels.shape[1:])
        rate = sampling.shapes_match_rate(pixels.flatten(0, 1), [p for p in prompts for _ in range(config.samples_per_prompt)])
        title = f'step {step}' + (f': {rate:.0%} read as their caption' if rate is not None else '')
        if is_main:
            from .pictures import save_image_grid
            save_image_grid(pixels, run_dir / 'samples' / f'step_{step:06d}.png', prompts, title)
            tqdm.write(title)
        return dict(shapes_match = rate) if rate is not None else {}
    return sample


# the job

def train(config: ImageTextConfig) -> Path:
    """Runs (or resumes) the job; returns the run folder."""
    threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        return run_job(config)
    finally:
        torch.set_num_threads(threads)


def open_loader(config: ImageTextConfig, folders: list[Prepared], model, record: dict, dist) -> StreamingLoader:
    """The run's loader. What the loader refuses in this run's settings (more readers, ranks x
    --workers, than a folder has samples; a sample over --max-tokens) is a ConfigError: one
    line and exit status 2 from the CLI."""
    from ..data.codecs import CodecMismatch
    from ..data.shards import ShardError
    from ..data.tokenizers import TokenizerMismatch
    try:
        return StreamingLoader(
            folders, modality_tokens_of(model),
            LoaderConfig(max_tokens = config.max_tokens, seed = config.seed, caption_fraction = config.caption_fraction,
                         shuffle_buffer = config.shuffle_buffer, num_workers = config.workers, weights = tuple(record['weights']),
                         timeout = config.loader_timeout),
            rank = dist.rank, world_size = dist.world_size, tokenizer = record['tokenizer'], codec = record['codec'],
        )
    except (TokenizerMismatch, CodecMismatch, ShardError):
        raise                           # the data's own errors, reported as such
    except ValueError as error:
        raise ConfigError(str(error)) from None


def run_job(config: ImageTextConfig, callbacks = ()) -> Path:
    lm = language_model.describe(config.language_model) if config.language_model is not None else None
    language_model.check_rerun(lm, config.run_dir)
    check_rerun(config)
    dist = distributed.setup()
    run_dir = config.run_dir
    folders, record = open_data(config, run_dir)
    if lm is not None:
        language_model.check_tokenizer(config.language_model, lm['vocab_size'], record['tokenizer'], f'the data in {folders[0].folder}')
    assets = sampling.Assets.of(record, vae = config.vae, tokenizer = config.tokenizer)      # checks --vae and --tokenizer
    for key, moved in (('tokenizer', config.tokenizer), ('codec', config.vae)):
        if moved is not None:                       # where sample and caption find it from now on
            record[key] = dict(record[key], path = str(Path(moved).resolve()))
    model = build_model(config, record)
    loader = open_loader(config, folders, model, record, dist)
    prompts = list(config.prompts) or default_prompts(folders, assets.tokenizer)
    if dist.is_main:
        run_dir.mkdir(parents = True, exist_ok = True)
        if lm is not None:
            language_model.record(run_dir, lm)
        write_text_atomic(run_dir / 'config.toml', to_toml(config))
        write_json(run_dir / 'data.json', record)
    train_config = TrainConfig(
        out_dir = str(run_dir), max_steps = config.steps, max_tokens = config.max_tokens, grad_accum = config.grad_accum, lr = config.lr,
        warmup_steps = config.warmup_steps, weight_decay = config.weight_decay, ema_beta = config.ema_beta, seed = config.seed,
        strategy = config.strategy, checkpoint_every = config.checkpoint_every, log_every = config.log_every, keep_last = 2,
        compile = config.compile, activation_checkpointing = config.activation_checkpointing,
    )
    if dist.is_main:
        total, trained = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)
        counts = f'{total:,} parameters' + (f' ({trained:,} trained)' if trained < total else '')
        start_from = f" from {lm['architecture']} {config.language_model}" if lm is not None else ''
        print(f"{counts}{start_from}; "
              f"{sum(f['samples'] for f in record['folders']):,} samples in "
              f"{len(folders)} folders; {config.steps} steps of {config.max_tokens} tokens x {dist.world_size} processes -> {run_dir}")
    mix = Every(config.log_every, lambda trainer, step: {f'mix/{Path(k).name}': v for k, v in loader.mix().items()} if len(folders) > 1 else {})
    start = time.perf_counter()
    try:
        Trainer(model, loader, train_config, callbacks = [mix, Every(config.sample_every, grid_callback(config, assets, prompts, run_dir, dist.is_main)),
                                                           *callbacks]).train()
    finally:
        loader.close()
    if dist.is_main:
        report(run_dir, (time.perf_counter() - start) / 60)
    return run_dir


def report(run_dir: Path, minutes: float):
    from ..demos import plots
    try:
        plots.save_loss_curve(plots.read_metrics(run_dir / 'metrics.jsonl'), run_dir / 'loss.png')
    except ImportError:
        print('matplotlib is not installed: no loss.png')
    grids = sorted((run_dir / 'samples').glob('step_*.png'))
    print(f'trained in {minutes:.1f} min. Run folder: {run_dir}')
    if grids:
        print(f'  samples: {grids[-1]} (and {len(grids) - 1} earlier grids)')
    print(f'  model: {run_dir / "pretrained_ema"}   sample with: transfusion sample {run_dir} --prompt "..."')
