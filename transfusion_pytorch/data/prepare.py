"""`transfusion prepare SOURCE --out DIR`: each image decoded, resized and encoded once, each
caption tokenized once, written as shards (see `shards.py`).

- Shard k holds records k * shard_size ... (k + 1) * shard_size - 1 of the source, in the
  source's order. A rerun skips each shard already on disk (so a killed run resumes where it
  stopped) and writes the manifest last; the same source and settings give the same bytes.
- Images of a shard are decoded and resized on a pool of threads (Pillow releases the GIL)
  in record order, then encoded in batches of `batch_size` images of one size, on the GPU
  when there is one.
- A record whose image cannot be read is skipped: named as it happens, listed with its
  reason in its shard and the manifest, and counted at the end. It never stops the run.
- Text sources give text-only rows, a row longer than `max_text_tokens` continued in the next
  row (no token is lost).
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import codecs, images, shards, sources, tokenizers


@dataclass(kw_only = True)
class PrepareConfig:
    source: str                         # a folder or file (see sources.py)
    out: str                            # the prepared folder
    kind: str | None = None             # sources.KINDS; None: detected
    image_size: int = 256               # square side, or the side of the square bucket with `buckets`
    buckets: bool = False               # aspect-ratio buckets instead of a centre crop
    vae: str | None = None              # a local diffusers autoencoder folder; None: the patch codec
    patch: int | None = None            # patch size: of pixels for the patch codec (default 4), of latent cells for a VAE (default 1)
    tokenizer: str | None = None        # a local Hugging Face tokenizer folder; None: UTF-8 bytes
    caption_column: str = 'text'
    image_column: str = 'image'
    text_column: str = 'text'           # the text column of jsonl text sources
    split: str = 'train'                # the split of a saved DatasetDict
    shard_size: int = 1000              # records per shard
    batch_size: int = 32                # images per encoder call
    max_text_tokens: int = 1024         # text rows longer than this are continued in the next row
    device: str | None = None           # None: cuda when available
    threads: int = 0                    # image decoding threads; 0: up to 8, one per CPU
    progress: bool = True

    def __post_init__(self):
        for name in ('image_size', 'shard_size', 'batch_size', 'max_text_tokens'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f'{name} must be a positive int, got {getattr(self, name)!r}')
        if self.kind is not None and self.kind not in sources.KINDS:
            raise ValueError(f'kind must be one of {sources.KINDS}, got {self.kind!r}')


def settings_of(config: PrepareConfig, kind: str, codec, tokenizer) -> dict:
    """What the bytes of the output depend on; a rerun into the same folder must match it."""
    keep = ('image_size', 'buckets', 'caption_column', 'image_column', 'text_column', 'split', 'shard_size', 'max_text_tokens')
    settings = {k: v for k, v in asdict(config).items() if k in keep}
    return dict(format = shards.FORMAT, version = shards.VERSION, source = str(Path(config.source).resolve()), kind = kind,
                codec = codec.describe() if codec is not None else None, tokenizer = tokenizer.describe(), **settings)


def check_settings(out: Path, settings: dict):
    import json
    path = out / shards.SETTINGS
    if path.exists():
        before = json.loads(path.read_text())
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise ValueError(f'{out} holds data prepared with other settings (they differ in {", ".join(changed)}); '
                             f'use another --out, or delete {out} to start over')
    elif any(out.glob('shard-*.safetensors')):
        raise ValueError(f'{out} holds shards but no {shards.SETTINGS}: not a folder prepare wrote; use another --out')
    shards.write_json(path, settings)


def prepare(config: PrepareConfig, on_shard = None) -> shards.Prepared:
    """Prepares (or finishes preparing) `config.source` into `config.out`; returns the result.
    `on_shard(index)` is called after each shard is written."""
    kind = config.kind or sources.detect(config.source)
    tokenizer = tokenizers.load_tokenizer(config.tokenizer)
    device = config.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    codec = None if kind == 'text' else codecs.load_codec(config.vae, config.patch, device)
    buckets = images.make_buckets(config.image_size, codec.stride) if codec is not None and config.buckets else None
    if codec is not None and config.image_size % codec.stride != 0:
        raise ValueError(f'image_size must be a multiple of the codec stride {codec.stride} '
                         f'({"VAE downsampling x patch" if config.vae else "the patch"}), got {config.image_size}')

    out = Path(config.out)
    out.mkdir(parents = True, exist_ok = True)
    settings = settings_of(config, kind, codec, tokenizer)
    check_settings(out, settings)

    records = sources.records(config.source, kind, caption_column = config.caption_column, image_column = config.image_column,
                              split = config.split, text_column = config.text_column)
    threads = config.threads or min(8, os.cpu_count() or 1)
    progress = tqdm(desc = f'preparing {Path(config.source).name}', unit = 'record', disable = not config.progress)
    written, skipped_now = 0, 0
    with ThreadPoolExecutor(threads) as pool:
        for index in itertools.count():
            chunk = list(itertools.islice(records, config.shard_size))
            if not chunk:
                break
            path = out / shards.shard_name(index)
            if not path.exists():
                if kind == 'text':
                    samples, skipped = text_samples(chunk, tokenizer, config.max_text_tokens), []
                else:
                    samples, skipped = image_samples(chunk, tokenizer, codec, config, buckets, pool)
                for key, reason in skipped:
                    progress.write(f'skipped {key}: {reason}')
                shards.write_shard(path, samples, skipped)
                written, skipped_now = written + 1, skipped_now + len(skipped)
                if on_shard is not None:
                    on_shard(index)
            progress.update(len(chunk))
    progress.close()

    manifest = write_manifest(out, settings, index)
    counts = manifest['counts']
    print(f"{out}: {counts['samples']:,} samples in {counts['shards']} shards ({written} written now, "
          f"{counts['shards'] - written} already there); {counts['skipped']} records skipped"
          + (f" ({skipped_now} this run; all listed under 'skipped' in {out / shards.MANIFEST})" if counts['skipped'] else ''))
    return shards.Prepared(out)


def image_samples(chunk: list[sources.Record], tokenizer, codec, config: PrepareConfig, buckets, pool) -> tuple[list[dict], list]:
    def load(record: sources.Record):
        if record.problem is not None:
            return None, record.problem
        try:
            return images.to_tensor(images.resize_for(images.decode(record.load), config.image_size, buckets)), None
        except images.UnreadableImage as error:
            return None, f'unreadable image: {error}'

    loaded = list(pool.map(load, chunk))
    keep = [(record, pixels) for record, (pixels, _) in zip(chunk, loaded) if pixels is not None]
    skipped = [(record.key, problem) for record, (_, problem) in zip(chunk, loaded) if problem is not None]
    ids = tokenizer.encode([record.caption or '' for record, _ in keep])

    # encode in batches of one image size, each batch in record order
    latents = [None] * len(keep)
    by_size = {}
    for position, (_, pixels) in enumerate(keep):
        by_size.setdefault(tuple(pixels.shape), []).append(position)
    for positions in by_size.values():
        for start in range(0, len(positions), config.batch_size):
            batch = positions[start:start + config.batch_size]
            mean, std = codec.encode(torch.stack([keep[p][1] for p in batch]))
            for row, p in enumerate(batch):
                latents[p] = (mean[row].clone(), std[row].clone() if std is not None else None)
    samples = [dict(key = record.key, text = torch.tensor(text, dtype = torch.long), mean = mean, std = std)
               for (record, _), text, (mean, std) in zip(keep, ids, latents)]
    return samples, skipped


def text_samples(chunk: list[sources.Record], tokenizer, max_text_tokens: int) -> list[dict]:
    samples = []
    for record, ids in zip(chunk, tokenizer.encode([record.caption for record in chunk])):
        pieces = range(0, len(ids), max_text_tokens)
        for part, start in enumerate(pieces):
            key = record.key if len(pieces) == 1 else f'{record.key}#{part}'
            samples.append(dict(key = key, text = torch.tensor(ids[start:start + max_text_tokens], dtype = torch.long)))
    return samples


def write_manifest(out: Path, settings: dict, num_shards: int) -> dict:
    """The manifest of shards 0 .. num_shards - 1, from their headers; written last, atomically."""
    entries, skipped, shapes = [], [], {}
    samples = text_tokens = latent_tokens = 0
    for index in range(num_shards):
        path = out / shards.shard_name(index)
        with shards.Shard(path) as shard:
            index_entries, shard_skipped = shard.samples, shard.skipped
        for entry in index_entries:
            shape = 'x'.join(map(str, entry['shape'])) if entry['shape'] is not None else 'text'
            stats = shapes.setdefault(shape, dict(count = 0, max_text_tokens = 0, longest = None))
            stats['count'] += 1
            if entry['text_tokens'] >= stats['max_text_tokens']:
                stats['max_text_tokens'], stats['longest'] = entry['text_tokens'], entry['key']
            text_tokens += entry['text_tokens']
            latent_tokens += entry['shape'][0] * entry['shape'][1] if entry['shape'] is not None else 0
        samples += len(index_entries)
        skipped.extend(shard_skipped)
        entries.append(dict(file = path.name, samples = len(index_entries), bytes = path.stat().st_size, sha256 = shards.sha256(path)))
    if samples == 0:
        raise ValueError(f'{settings["source"]}: no usable records ({len(skipped)} skipped)')
    manifest = dict(
        format = shards.FORMAT, version = shards.VERSION, kind = 'text' if settings['kind'] == 'text' else 'image_text',
        source = dict(path = settings['source'], kind = settings['kind']), settings = settings,
        codec = settings['codec'], tokenizer = settings['tokenizer'],
        counts = dict(samples = samples, skipped = len(skipped), shards = len(entries)),
        tokens = dict(text = text_tokens, latent = latent_tokens), shapes = shapes, skipped = skipped, shards = entries,
    )
    shards.write_json(out / shards.MANIFEST, manifest)
    return manifest
