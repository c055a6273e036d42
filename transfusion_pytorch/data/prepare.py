"""`transfusion prepare SOURCE --out DIR`: each image decoded, resized and encoded once, each
caption tokenized once, written as shards (see `shards.py`).

- Shard k holds records k * shard_size ... (k + 1) * shard_size - 1 of the source, in the
  source's order. A rerun skips each shard already on disk (so a killed run resumes where it
  stopped) and writes the manifest last; the same source and settings give the same bytes.
  What makes a rerun safe (the settings, the source unchanged, one writer) is `reruns.py`.
- Images of a shard are decoded and resized on a pool of threads (Pillow releases the GIL)
  in record order, then encoded in batches of `batch_size` images of one size, on the GPU
  when there is one.
- A record whose image cannot be read is skipped: named as it happens, listed with its
  reason in its shard and the manifest, and counted at the end. It never stops the run.
- A caption longer than `max_caption_tokens` is cut to it (`long_captions = 'truncate'`, the
  default, as the diffusers training scripts tokenize captions with truncation), its sample
  skipped ('skip') or the run stopped naming it ('error'); counted and listed in the manifest.
- Text sources give text-only rows, a row longer than `max_text_tokens` continued in the next
  row (no token is lost).
- Interleaved documents and editing triples (`kind = 'interleaved' | 'edit'`, read by
  `documents.py`, found from the columns when not given) give samples of several segments:
  each text tokenized and held to the caption policy, each image prepared as a caption's is;
  all of the above holds for them, a broken image or (with 'skip') a long text skipping its
  whole sample, named.
"""

from __future__ import annotations

import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import codecs, documents, images, reruns, shards, sources, tokenizers

LONG_CAPTIONS = ('truncate', 'skip', 'error')


@dataclass(kw_only = True)
class PrepareConfig:
    source: str                         # a folder or file (see sources.py)
    out: str                            # the prepared folder
    kind: str | None = None             # a layout (sources.KINDS) or documents.KINDS; None: both detected
    image_size: int = 256               # square side, or the side of the square bucket with `buckets`
    buckets: bool = False               # aspect-ratio buckets instead of a centre crop
    vae: str | None = None              # a local diffusers autoencoder folder; None: the patch codec
    patch: int | None = None            # patch size: of pixels for the patch codec (default 4), of latent cells for a VAE (default 1)
    tokenizer: str | None = None        # a local Hugging Face tokenizer folder; None: UTF-8 bytes
    caption_column: str = 'text'
    image_column: str = 'image'
    text_column: str = 'text'           # the text column of jsonl text sources
    source_image_column: str | None = None      # edits: None: InstructPix2Pix's original_image (MagicBrush's source_img when found)
    instruction_column: str | None = None       # edits: None: edit_prompt (instruction)
    target_image_column: str | None = None      # edits: None: edited_image (target_img)
    split: str = 'train'                # the split of a saved DatasetDict
    shard_size: int = 1000              # records per shard
    batch_size: int = 32                # images per encoder call
    max_text_tokens: int = 1024         # text rows longer than this are continued in the next row
    max_caption_tokens: int = 1024      # the longest caption of an image
    long_captions: str = 'truncate'     # a longer one: LONG_CAPTIONS
    device: str | None = None           # None: cuda when available
    threads: int = 0                    # image decoding threads; 0: up to 8, one per CPU
    progress: bool = True

    def __post_init__(self):
        for name in ('image_size', 'shard_size', 'batch_size', 'max_text_tokens', 'max_caption_tokens'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f'{name} must be a positive int, got {getattr(self, name)!r}')
        if self.kind is not None and self.kind not in sources.KINDS + documents.KINDS:
            raise ValueError(f'kind must be one of {sources.KINDS + documents.KINDS}, got {self.kind!r}')
        if self.long_captions not in LONG_CAPTIONS:
            raise ValueError(f'long_captions must be one of {LONG_CAPTIONS}, got {self.long_captions!r}')


class CaptionTooLong(ValueError):
    """A caption over `max_caption_tokens` with `long_captions = 'error'`."""


def settings_of(config: PrepareConfig, kind: str, codec, tokenizer, segmented: tuple | None = None) -> dict:
    """What the bytes of the output depend on; a rerun into the same folder must match it.
    `segmented`: (kind, columns) of documents; the settings of captions and text are as before it."""
    keep = ('image_size', 'buckets', 'caption_column', 'image_column', 'text_column', 'split', 'shard_size', 'max_text_tokens',
            'max_caption_tokens', 'long_captions')
    settings = {k: v for k, v in asdict(config).items() if k in keep}
    if segmented is not None:
        settings.update(samples = segmented[0], columns = list(segmented[1]))
    return dict(format = shards.FORMAT, version = shards.VERSION, source = str(Path(config.source).resolve()), kind = kind,
                codec = codec.describe() if codec is not None else None, tokenizer = tokenizer.describe(), **settings)


def kinds_of(config: PrepareConfig) -> tuple[str, tuple | None]:
    """The source's layout, and (kind, columns) when it holds documents (None for captions or text)."""
    given = config.kind if config.kind in documents.KINDS else None
    layout = config.kind if config.kind in sources.KINDS else sources.detect(config.source)
    edit = (config.source_image_column, config.instruction_column, config.target_image_column)
    names = documents.columns_of(Path(config.source), layout, config.split) if given is None or given == 'edit' else []
    kind = given or documents.kind_of(names, edit)
    if kind is None:
        return layout, None
    return layout, (kind, documents.INTERLEAVED if kind == 'interleaved' else documents.edit_columns(edit, names))


def prepare(config: PrepareConfig, on_shard = None) -> shards.Prepared:
    """Prepares (or finishes preparing) `config.source` into `config.out`; returns the result.
    `on_shard(index)` is called after each shard is written."""
    kind, segmented = kinds_of(config)
    tokenizer = tokenizers.load_tokenizer(config.tokenizer)
    device = config.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    codec = None if kind == 'text' and segmented is None else codecs.load_codec(config.vae, config.patch, device)
    buckets = images.make_buckets(config.image_size, codec.stride) if codec is not None and config.buckets else None
    if codec is not None and config.image_size % codec.stride != 0:
        raise ValueError(f'image_size must be a multiple of the codec stride {codec.stride} '
                         f'({"VAE downsampling x patch" if config.vae else "the patch"}), got {config.image_size}')

    out = Path(config.out)
    out.mkdir(parents = True, exist_ok = True)
    settings = settings_of(config, kind, codec, tokenizer, segmented)
    with reruns.holding(out):
        reruns.check_settings(out, settings)
        num_shards, written, skipped_now = write_shards(config, kind, out, tokenizer, codec, buckets, on_shard, segmented)
        manifest = write_manifest(out, settings, num_shards)
    print(summary(out, manifest, written, skipped_now))
    return shards.Prepared(out)


def summary(out: Path, manifest: dict, written: int, skipped_now: int) -> str:
    counts, long = manifest['counts'], manifest['long_captions']
    line = (f"{out}: {counts['samples']:,} samples in {counts['shards']} shards ({written} written now, "
            f"{counts['shards'] - written} already there); {counts['skipped']} records skipped")
    if counts['skipped']:
        line += f" ({skipped_now} this run; all listed under 'skipped' in {out / shards.MANIFEST})"
    if long['count']:
        done = dict(truncate = 'truncated', skip = 'skipped')[long['policy']]
        line += (f"; {long['count']:,} caption{'s' if long['count'] > 1 else ''} over {long['max_tokens']:,} tokens {done} "
                 f"(listed under 'long_captions' in {out / shards.MANIFEST})")
    return line


def write_shards(config: PrepareConfig, kind: str, out: Path, tokenizer, codec, buckets, on_shard, segmented = None) -> tuple[int, int, int]:
    """Writes the shards not on disk yet (and the last one again when the source gained records
    after it); returns the number of shards, the number written now and the records skipped now."""
    if segmented is not None:
        records = documents.documents(config.source, kind, *segmented, split = config.split)
    else:
        records = sources.records(config.source, kind, caption_column = config.caption_column, image_column = config.image_column,
                                  split = config.split, text_column = config.text_column)
    threads = config.threads or min(8, os.cpu_count() or 1)
    written, skipped_now, num_records = 0, 0, 0
    with ThreadPoolExecutor(threads) as pool, tqdm(desc = f'preparing {Path(config.source).name}', unit = 'record',
                                                   disable = not config.progress) as progress:
        for index in itertools.count():
            chunk = list(itertools.islice(records, config.shard_size))
            if not chunk:
                break
            path = out / shards.shard_name(index)
            if not path.exists() or not reruns.keep_shard(path, chunk, kind):
                if segmented is not None:
                    made, skipped, long = document_samples(chunk, tokenizer, codec, config, buckets, pool)
                elif kind == 'text':
                    made, skipped, long = text_samples(chunk, tokenizer, config.max_text_tokens), [], []
                else:
                    made, skipped, long = image_samples(chunk, tokenizer, codec, config, buckets, pool)
                for key, reason in skipped:
                    progress.write(f'skipped {key}: {reason}')
                shards.write_shard(path, made, skipped, reruns.made_from(chunk), long)
                written, skipped_now = written + 1, skipped_now + len(skipped)
                if on_shard is not None:
                    on_shard(index)
            num_records += len(chunk)
            progress.update(len(chunk))
    reruns.check_no_more_shards(out, index, num_records)
    return index, written, skipped_now


def image_samples(chunk: list[sources.Record], tokenizer, codec, config: PrepareConfig, buckets, pool) -> tuple[list[dict], list, list]:
    """The samples of `chunk`, the (key, reason) of the records skipped and the (key, tokens) of
    the captions over `max_caption_tokens`, each in record order."""
    texts, reasons, long = fit_captions(chunk, tokenizer.encode([record.caption or '' for record in chunk]), config)

    def load(i: int):
        record = chunk[i]
        if record.problem is not None or reasons[i] is not None:
            return None, record.problem or reasons[i]
        try:
            return images.to_tensor(images.resize_for(images.decode(record.load), config.image_size, buckets)), None
        except images.UnreadableImage as error:
            return None, f'unreadable image: {error}'

    loaded = list(pool.map(load, range(len(chunk))))
    keep = [(chunk[i], texts[i], pixels) for i, (pixels, _) in enumerate(loaded) if pixels is not None]
    skipped = [(chunk[i].key, problem) for i, (_, problem) in enumerate(loaded) if problem is not None]

    latents = encode(codec, [pixels for _, _, pixels in keep], config.batch_size)
    samples = [dict(key = record.key, text = torch.tensor(text, dtype = torch.long), mean = mean, std = std)
               for (record, text, _), (mean, std) in zip(keep, latents)]
    return samples, skipped, long


def encode(codec, pixels: list, batch_size: int) -> list[tuple]:
    """(mean, std) of each image of `pixels`, encoded in batches of one image size, each batch in order."""
    latents = [None] * len(pixels)
    by_size = {}
    for position, image in enumerate(pixels):
        by_size.setdefault(tuple(image.shape), []).append(position)
    for positions in by_size.values():
        for start in range(0, len(positions), batch_size):
            batch = positions[start:start + batch_size]
            mean, std = codec.encode(torch.stack([pixels[p] for p in batch]))
            for row, p in enumerate(batch):
                latents[p] = (mean[row].clone(), std[row].clone() if std is not None else None)
    return latents


def fit_captions(chunk: list[sources.Record], ids: list[list[int]], config: PrepareConfig) -> tuple[list, list, list]:
    """The caption policy: each caption's ids, cut to `max_caption_tokens` ('truncate') or left
    out with a reason ('skip'); with 'error', a long caption stops the run, naming its sample."""
    texts, reasons, long = [], [], []
    for record, text in zip(chunk, ids):
        text, reason = fit_text(text, record.key, f'the caption of {record.key}', 'a caption', config, long)
        texts.append(text)
        reasons.append(reason)
    return texts, reasons, long


def fit_text(text: list[int], name: str, what: str, short: str, config: PrepareConfig, long: list) -> tuple[list[int], str | None]:
    """One text by the caption policy: its ids (cut when over the limit) and the reason its
    sample is left out, or None; a long one is added to `long` as (name, tokens)."""
    limit = config.max_caption_tokens
    if len(text) <= limit:
        return text, None
    long.append((name, len(text)))
    if config.long_captions == 'error':
        raise CaptionTooLong(f'{what} has {len(text):,} tokens, more than --max-caption-tokens {limit}: '
                             f'raise --max-caption-tokens, or give --long-captions truncate (cut it to the limit) '
                             f'or skip (leave its sample out)')
    reason = f'{short} of {len(text):,} tokens, more than --max-caption-tokens {limit} (--long-captions skip)' if config.long_captions == 'skip' else None
    return text[:limit], reason


def text_samples(chunk: list[sources.Record], tokenizer, max_text_tokens: int) -> list[dict]:
    samples = []
    for record, ids in zip(chunk, tokenizer.encode([record.caption for record in chunk])):
        pieces = range(0, len(ids), max_text_tokens)
        for part, start in enumerate(pieces):
            key = record.key if len(pieces) == 1 else f'{record.key}#{part}'
            samples.append(dict(key = key, text = torch.tensor(ids[start:start + max_text_tokens], dtype = torch.long)))
    return samples


def document_samples(chunk: list[documents.Document], tokenizer, codec, config, buckets, pool) -> tuple[list[dict], list, list]:
    """The samples of `chunk`, the (key, reason) of the documents skipped and the (name, tokens)
    of the texts over `max_caption_tokens`, each in document order."""
    reasons = [document.problem for document in chunk]
    texts, long = {}, []
    places = [(i, j) for i, document in enumerate(chunk) for j, segment in enumerate(document.segments) if isinstance(segment, str)]
    ids = tokenizer.encode([chunk[i].segments[j] for i, j in places]) if places else []
    for (i, j), text in zip(places, ids):
        key = chunk[i].key
        texts[i, j], reason = fit_text(text, f'{key}, segment {j}', f'the text of segment {j} of {key}', f'a text (segment {j})', config, long)
        reasons[i] = reasons[i] or reason

    pictures = [(i, j) for i, document in enumerate(chunk) for j, segment in enumerate(document.segments)
                if not isinstance(segment, str) and reasons[i] is None]

    def load(place: tuple[int, int]):
        i, j = place
        try:
            return images.to_tensor(images.resize_for(images.decode(chunk[i].segments[j]), config.image_size, buckets)), None
        except images.UnreadableImage as error:
            return None, f'unreadable image (segment {j}): {error}'

    loaded = dict(zip(pictures, pool.map(load, pictures)))
    for (i, _), (_, problem) in loaded.items():
        reasons[i] = reasons[i] or problem
    kept = [place for place in pictures if reasons[place[0]] is None]
    latents = dict(zip(kept, encode(codec, [loaded[place][0] for place in kept], config.batch_size)))

    samples, skipped = [], []
    for i, document in enumerate(chunk):
        if reasons[i] is not None:
            skipped.append((document.key, reasons[i]))
            continue
        parts = [dict(text = torch.tensor(texts[i, j], dtype = torch.long)) if isinstance(segment, str)
                 else dict(zip(('mean', 'std'), latents[i, j])) for j, segment in enumerate(document.segments)]
        samples.append(dict(key = document.key, segments = parts))
    return samples, skipped, long


def segment_counts(entries: list[dict], shapes: dict, segments: dict) -> tuple[int, int]:
    """Adds the shard index `entries` of segment samples to `shapes` (per image size: the images
    of that size, the most text tokens of a sample holding one, and that sample; 'text' for
    samples without images) and `segments` (text and image segments); returns their text and
    latent tokens."""
    text_tokens = latent_tokens = 0
    for entry in entries:
        sizes = []
        for kind, size in entry['segments']:
            segments[kind] += 1
            if kind == 'image':
                sizes.append('x'.join(map(str, size[:2])))
                latent_tokens += size[0] * size[1]
        for name in sorted(set(sizes)) or ['text']:
            stats = shapes.setdefault(name, dict(count = 0, max_text_tokens = 0, longest = None))
            stats['count'] += sizes.count(name) or 1
            if entry['text_tokens'] >= stats['max_text_tokens']:
                stats['max_text_tokens'], stats['longest'] = entry['text_tokens'], entry['key']
        text_tokens += entry['text_tokens']
    return text_tokens, latent_tokens


def write_manifest(out: Path, settings: dict, num_shards: int) -> dict:
    """The manifest of shards 0 .. num_shards - 1, from their headers; written last, atomically."""
    entries, skipped, long, shapes, kinds = [], [], [], {}, dict(text = 0, image = 0)
    samples = text_tokens = latent_tokens = 0
    for index in range(num_shards):
        path = out / shards.shard_name(index)
        with shards.Shard(path) as shard:
            index_entries, shard_skipped = shard.samples, shard.skipped
            long.extend(shard.long_captions)
        if 'samples' in settings:                           # documents: samples of several segments
            text, latent = segment_counts(index_entries, shapes, kinds)
        else:
            text, latent = caption_counts(index_entries, shapes)
        text_tokens, latent_tokens = text_tokens + text, latent_tokens + latent
        samples += len(index_entries)
        skipped.extend(shard_skipped)
        entries.append(dict(file = path.name, samples = len(index_entries), bytes = path.stat().st_size, sha256 = shards.sha256(path)))
    if samples == 0:
        raise ValueError(f'{settings["source"]}: no usable records ({len(skipped)} skipped)')
    kind = settings.get('samples') or ('text' if settings['kind'] == 'text' else 'image_text')
    manifest = dict(
        format = shards.FORMAT, version = shards.VERSION, kind = kind,
        source = dict(path = settings['source'], kind = settings['kind']), settings = settings,
        codec = settings['codec'], tokenizer = settings['tokenizer'],
        counts = dict(samples = samples, skipped = len(skipped), shards = len(entries)),
        tokens = dict(text = text_tokens, latent = latent_tokens), shapes = shapes, skipped = skipped, shards = entries,
        # captions over the limit, truncated or skipped (the skipped ones are also under `skipped`)
        long_captions = dict(policy = settings['long_captions'], max_tokens = settings['max_caption_tokens'], count = len(long), captions = long),
    )
    if 'samples' in settings:
        manifest['segments'] = kinds
    if not holds(out / shards.MANIFEST, manifest):       # a finished folder is left untouched (it may be read-only)
        shards.write_json(out / shards.MANIFEST, manifest)
    return manifest


def caption_counts(entries: list[dict], shapes: dict) -> tuple[int, int]:
    """Adds the shard index `entries` of captions or text rows to `shapes` (per latent shape, or
    'text': the samples, the most text tokens and that sample); returns their text and latent tokens."""
    text_tokens = latent_tokens = 0
    for entry in entries:
        shape = 'x'.join(map(str, entry['shape'])) if entry['shape'] is not None else 'text'
        stats = shapes.setdefault(shape, dict(count = 0, max_text_tokens = 0, longest = None))
        stats['count'] += 1
        if entry['text_tokens'] >= stats['max_text_tokens']:
            stats['max_text_tokens'], stats['longest'] = entry['text_tokens'], entry['key']
        text_tokens += entry['text_tokens']
        latent_tokens += entry['shape'][0] * entry['shape'][1] if entry['shape'] is not None else 0
    return text_tokens, latent_tokens


def holds(path: Path, value) -> bool:
    try:
        return json.loads(path.read_text()) == value
    except (OSError, ValueError):
        return False
