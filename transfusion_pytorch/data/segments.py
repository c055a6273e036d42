"""Samples of several segments (interleaved documents, editing triples) prepared: each text
tokenized and held to the caption policy, each image decoded, resized and encoded as a
caption's image is (`prepare.py`), and the whole sample skipped, named, when one of its images
cannot be read or (with `--long-captions skip`) one of its texts is too long. How they are
stored is in `shards.py`."""

from __future__ import annotations

import torch

from . import images
from .documents import Document


def document_samples(chunk: list[Document], tokenizer, codec, config, buckets, pool) -> tuple[list[dict], list, list]:
    """The samples of `chunk`, the (key, reason) of the documents skipped and the (name, tokens)
    of the texts over `max_caption_tokens`, each in document order."""
    from .prepare import encode, fit_text
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


def manifest_counts(entries: list[dict], shapes: dict, segments: dict) -> tuple[int, int]:
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
