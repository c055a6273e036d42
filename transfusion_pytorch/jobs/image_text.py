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
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from ..config_files import ConfigError, check_rerun, to_toml, write_text_atomic
from ..data.loader import LoaderConfig, StreamingLoader, modality_tokens_of, refuse_untrainable
from ..data.shards import Prepared, write_json
from ..model import Transfusion
from ..sampler import SampleOptions
from ..training import Every, TrainConfig, Trainer, distributed
from . import language_model, sampling
from .image_text_config import JOB, MODEL_SIZE, RERUN_KEYS, ImageTextConfig, load_config  # noqa: F401 (load_config: the job's own name)

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
    """The data folders, image-caption then text-only, and the record of them; a folder of the
    other kind is a ConfigError (one line from the CLI)."""
    images = [Prepared(folder) for folder in config.data]
    texts = [Prepared(folder) for folder in config.text_data]
    for p in images + texts:
        refuse_untrainable(p)
    for p in images:
        if p.kind != 'image_text':
            raise ConfigError(f"'data': {p.folder} holds {p.kind} rows; image-caption folders go in 'data', text-only ones in 'text_data'")
    for p in texts:
        if p.kind != 'text':
            raise ConfigError(f"'text_data': {p.folder} holds {p.kind} rows, not text-only rows")
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
    try:
        return Transfusion(num_text_tokens = record['tokenizer']['vocab_size'],
                           transformer = dict(size, separate_modality_weights = config.separate_modality_weights), **options)
    except ValueError as error:                 # a value the model rejects (an odd dim_head, a negative flow_loss_weight)
        raise ConfigError(f'config: {error}') from None


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
    with distributed.torch_threads(config.threads):
        return run_job(config)


def trainer_config(config: ImageTextConfig) -> TrainConfig:
    """The trainer's config, and the sampling settings of the grids checked as `model.sample`
    checks them: a value either rejects (a negative `lr`, a NaN `cfg_scale`) is a ConfigError
    before anything is written, so that the corrected command is not refused as another run."""
    try:
        SampleOptions(modality_steps = config.modality_steps, cfg_scale = config.cfg_scale, **sampling.SAMPLING)
        return TrainConfig(
            out_dir = str(config.run_dir), max_steps = config.steps, max_tokens = config.max_tokens, grad_accum = config.grad_accum,
            lr = config.lr, warmup_steps = config.warmup_steps, weight_decay = config.weight_decay, ema_beta = config.ema_beta,
            seed = config.seed, strategy = config.strategy, checkpoint_every = config.checkpoint_every, log_every = config.log_every,
            keep_last = 2, compile = config.compile, activation_checkpointing = config.activation_checkpointing,
        )
    except (TypeError, ValueError) as error:
        raise ConfigError(f'config: {error}') from None


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
    config, version = check_rerun(config, RERUN_KEYS)
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
    train_config = trainer_config(config)
    if dist.is_main:
        run_dir.mkdir(parents = True, exist_ok = True)
        if lm is not None:
            language_model.record(run_dir, lm)
        write_text_atomic(run_dir / 'config.toml', to_toml(config, version))
        write_json(run_dir / 'data.json', record)
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
