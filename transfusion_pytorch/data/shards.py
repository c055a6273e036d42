"""Prepared data on disk: safetensors shards and a JSON manifest.

A prepared folder holds

    prepare.json                  the settings it was made with (a rerun must match them)
    shard-00000.safetensors ...   samples, at most `shard_size` records' worth each
    manifest.json                 counts, tokens, shapes, codec, tokenizer, the skipped
                                  records and each shard's size and SHA-256; written last

Why safetensors plus a JSON index: it is already a dependency, it loads lazily (the header is
read on open, each tensor is read from a memory map when asked for), each sample can keep its
own shape (aspect buckets) with no padding, and one file is one shard, written under a
temporary name and renamed into place, so a killed run never leaves a shard that half-loads.
webdataset tars are read sequentially only (no reading sample i of a shard without the ones
before it), and mosaicml-streaming's MDS would add a dependency whose job (sharding across
ranks and workers, resumable position) the loader here does in a few lines over this index.

Inside a shard, sample i is `{i:05d}.text` (int32 token ids), `{i:05d}.mean` (float32 latents,
(h, w, dim) channels last) and, for a stochastic VAE, `{i:05d}.std`. The safetensors metadata
holds, as one JSON entry, each sample's key, token count and latent shape (so the loader plans batches
from headers alone), the records skipped in this shard with the reason, the captions over the
caption limit, and a fingerprint of the source records the shard was made from (`made_from`;
absent in older shards).

Samples of several segments (the manifest kinds `interleaved` and `edit`; `image_text` and
`text` folders are written as above, byte for byte as before these kinds) are an ordered list
of segments, each a text or an image. Segment j of sample i is `{i:05d}.{j}.text` for a text,
`{i:05d}.{j}.mean` (and `{i:05d}.{j}.std`) for an image, laid out as above; the sample's entry
in the metadata is `{key, text_tokens, segments}`, `segments` being
`[["text", tokens], ["image", [h, w, dim]], ...]` in order and `text_tokens` their texts'
sum (it has no `shape`). An edit is the segments [source image, instruction, target image].
The manifest of such a folder adds `segments` (how many of each kind); its `shapes` count
images by size, each with the most text tokens of a sample holding one ('text': samples
without images).

Reading checks the folder against its manifest: `Prepared` checks the manifest's form and each
shard's size on opening the folder; a `Shard` given its manifest entry checks, before any sample
is read, the file's SHA-256 (once per process while the file is unchanged: hashing is the cost,
and a loader worker opens a shard many times) and the sample count of its own header. The loader
opens shards so, in the process that reads them: a big folder is not hashed up front, and no
sample of a damaged shard is trained on.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import suppress
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..training.checkpoint import sha256

FORMAT, VERSION = 'transfusion-shards', 1
MANIFEST, SETTINGS = 'manifest.json', 'prepare.json'


class ShardError(ValueError):
    """A prepared folder that is unfinished, damaged or of another kind than asked for."""


def shard_name(index: int) -> str:
    return f'shard-{index:05d}.safetensors'


def atomic_write(path: Path, data: bytes):
    """Writes `data` to `path` through a temporary file and a rename, so that `path` is
    either absent or complete, even if the process is killed."""
    tmp = temporary_name(path)
    try:
        with open(tmp, 'wb') as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with suppress(OSError):
            tmp.unlink(missing_ok = True)   # a full disk or a read-only folder leaves no partial file behind
        if isinstance(error, OSError) and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(path)) from None      # named by the file meant, not its temporary name
        raise


def temporary_name(path: Path) -> Path:
    """Where `atomic_write` writes `path` first. A killed process leaves it behind; `prepare`
    removes those it finds while it holds the folder."""
    return path.with_name(f'.{path.name}.tmp-{os.getpid()}')


def write_json(path: Path, value):
    atomic_write(path, (json.dumps(value, indent = 1, sort_keys = True) + '\n').encode())


def write_shard(path: Path, samples: list[dict], skipped: list[tuple[str, str]], made_from: dict | None = None,
                long_captions: list[tuple[str, int]] = ()):
    """`samples`: dicts with key, text (1-d int ids), and for images mean (h, w, d) and
    optionally std. `made_from`: the fingerprint of the source records the shard was made from
    (`prepare.made_from`), so that a rerun can tell whether the source changed; `long_captions`:
    the (key, tokens) of captions over the limit, truncated or skipped. The same samples give
    the same bytes."""
    tensors, index = {}, []
    for i, sample in enumerate(samples):
        if 'segments' in sample:
            index.append(segment_tensors(tensors, i, sample))
            continue
        tensors[f'{i:05d}.text'] = sample['text'].to(torch.int32).contiguous()
        entry = dict(key = sample['key'], text_tokens = int(sample['text'].numel()), shape = None)
        if sample.get('mean') is not None:
            tensors[f'{i:05d}.mean'] = sample['mean'].to(torch.float32).contiguous()
            entry['shape'] = list(sample['mean'].shape[:-1])
            if sample.get('std') is not None:
                tensors[f'{i:05d}.std'] = sample['std'].to(torch.float32).contiguous()
        index.append(entry)
    # one metadata entry: safetensors keeps the metadata in a hash map, whose order (and so the
    # bytes written) would change from process to process with several
    header = json.dumps(dict(format = FORMAT, version = VERSION, samples = index, skipped = [list(s) for s in skipped],
                             made_from = made_from, long_captions = [list(c) for c in long_captions]))
    atomic_write(path, safetensors_bytes(tensors, metadata = {FORMAT: header}))


def segment_tensors(tensors: dict, i: int, sample: dict) -> dict:
    """Adds the tensors of the segments of sample i to `tensors`; returns its index entry."""
    listed, text_tokens = [], 0
    for j, segment in enumerate(sample['segments']):
        if segment.get('text') is not None:
            tensors[f'{i:05d}.{j}.text'] = segment['text'].to(torch.int32).contiguous()
            listed.append(['text', int(segment['text'].numel())])
            text_tokens += listed[-1][1]
            continue
        tensors[f'{i:05d}.{j}.mean'] = segment['mean'].to(torch.float32).contiguous()
        if segment.get('std') is not None:
            tensors[f'{i:05d}.{j}.std'] = segment['std'].to(torch.float32).contiguous()
        listed.append(['image', list(segment['mean'].shape)])
    return dict(key = sample['key'], text_tokens = text_tokens, segments = listed)


# (path, bytes, modification time, SHA-256) of the shards this process has hashed and found as expected
VERIFIED: set[tuple] = set()


def check_digest(path: Path, expected: str):
    """Raises a ShardError unless the file's SHA-256 is `expected` (its manifest's); hashes a file
    once per process while its size and modification time stay the same."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected)
    if key in VERIFIED:
        return
    actual = sha256(path)
    if actual != expected:
        raise ShardError(f'{path} has the SHA-256 {actual}, but {MANIFEST} says {expected}: the shard or the manifest changed '
                         f'after prepare (damaged or replaced); delete {path.name} and run the same `transfusion prepare` again '
                         f'to write both anew')
    VERIFIED.add(key)


class Shard:
    """One shard, opened lazily: the header on first use, each tensor when asked for. Close it
    (or use it as a context manager) to release the memory map. Given what the manifest says of
    it (`sha256`, `samples`), opening checks the file against that before reading any sample."""

    def __init__(self, path: Path, sha256: str | None = None, samples: int | None = None):
        self.path, self._file, self._meta, self._names = Path(path), None, None, set()
        self.expected_sha256, self.expected_samples = sha256, samples

    def open(self):
        if self._file is None:
            if self.expected_sha256 is not None:
                check_digest(self.path, self.expected_sha256)
            try:
                file = safe_open(str(self.path), framework = 'pt')
            except Exception as error:
                raise ShardError(f'{self.path} cannot be read as a safetensors shard: {error}') from None
            header = (file.metadata() or {}).get(FORMAT)
            if header is None:
                raise ShardError(f'{self.path} is not a transfusion shard (its metadata has no {FORMAT!r} entry)')
            meta = json.loads(header)
            if self.expected_samples is not None and len(meta['samples']) != self.expected_samples:
                raise ShardError(f"{self.path} holds {len(meta['samples'])} samples by its own header, but {MANIFEST} says "
                                 f'{self.expected_samples}: the manifest was edited or belongs to other shards; run the same '
                                 f'`transfusion prepare` again to write it anew')
            self._file, self._meta, self._names = file, meta, set(file.keys())
        return self

    def close(self):
        self._file = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    @property
    def samples(self) -> list[dict]:
        """Each sample's key, text_tokens and shape (None for text)."""
        return self.open()._meta['samples']

    @property
    def skipped(self) -> list[list[str]]:
        return self.open()._meta['skipped']

    @property
    def made_from(self) -> dict | None:
        """count, first and last key and sha256 of the source records the shard was made from;
        None in shards written before it was recorded."""
        return self.open()._meta.get('made_from')

    @property
    def long_captions(self) -> list[list]:
        """(key, tokens) of the captions over the caption limit; none in older shards."""
        return self.open()._meta.get('long_captions', [])

    def segments(self, i: int) -> list[dict[str, Tensor]]:
        """The segments of sample i of a folder of several-segment samples, in order: each
        {text} or {mean} (and {std})."""
        self.open()
        out = []
        for j, (kind, _) in enumerate(self._meta['samples'][i]['segments']):
            names = ('text',) if kind == 'text' else ('mean', 'std')
            found = {name: self._file.get_tensor(f'{i:05d}.{j}.{name}') for name in names if f'{i:05d}.{j}.{name}' in self._names}
            if 'text' in found:
                found['text'] = found['text'].long()
            out.append(found)
        return out

    def tensors(self, i: int) -> dict[str, Tensor]:
        self.open()
        out = dict(text = self._file.get_tensor(f'{i:05d}.text').long())
        for name in ('mean', 'std'):
            if f'{i:05d}.{name}' in self._names:
                out[name] = self._file.get_tensor(f'{i:05d}.{name}')
        return out


# what the reading side uses of a manifest: each field's type, and a rule its value keeps
SHA256 = re.compile(r'[0-9a-f]{64}')
COUNT = (int, lambda n: n >= 0, 'a count >= 0')
KINDS = ('image_text', 'text', 'interleaved', 'edit')
MANIFEST_FIELDS = dict(kind = (str, lambda k: k in KINDS, f"{', '.join(map(repr, KINDS[:-1]))} or {KINDS[-1]!r}"), tokenizer = (dict,),
                       codec = ((dict, type(None)),), settings = (dict,), counts = (dict,), shapes = (dict,), shards = (list,))
SHARD_FIELDS = dict(file = (str, lambda f: f == Path(f).name, 'a file name'), samples = COUNT, bytes = COUNT,
                    sha256 = (str, SHA256.fullmatch, 'a SHA-256: 64 hexadecimal digits'))
SHAPE_FIELDS = dict(count = COUNT, max_text_tokens = COUNT, longest = ((str, type(None)),))
SHAPE_NAME = re.compile(r'text|[1-9][0-9]*x[1-9][0-9]*')


def check_fields(value, fields: dict, where: str) -> str | None:
    """What is wrong with the JSON object `value` (at `where` in the manifest) by `fields`, or None."""
    if not isinstance(value, dict):
        return f'{where or "the manifest"} must be a JSON object, got {value!r}'
    where = f'{where}: ' if where else ''
    for name, (kind, *rule) in fields.items():
        if name not in value:
            return f'{where}{name!r} is missing'
        given = value[name]
        if not isinstance(given, kind) or isinstance(given, bool):
            names = ' or '.join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            return f'{where}{name!r} must be of type {names.replace("NoneType", "null")}, got {given!r}'
        if rule and not rule[0](given):
            return f'{where}{name!r} must be {rule[1]}, got {given!r}'
    return None


def manifest_problems(manifest):
    """What is wrong with a manifest of the right format, in order: each check runs only when the
    ones before it found nothing (take the first that is not None)."""
    yield check_fields(manifest, MANIFEST_FIELDS, '')
    yield check_fields(manifest['counts'], dict(samples = COUNT), "'counts'")
    for i, entry in enumerate(manifest['shards']):
        yield check_fields(entry, SHARD_FIELDS, f"'shards'[{i}]")
    for name, stats in manifest['shapes'].items():
        yield None if SHAPE_NAME.fullmatch(name) else f"'shapes' has the key {name!r}; expected 'text' or HxW"
        yield check_fields(stats, SHAPE_FIELDS, f"'shapes'[{name!r}]")
    total = sum(e['samples'] for e in manifest['shards'])
    if manifest['counts']['samples'] != total:
        yield f"'counts' says {manifest['counts']['samples']} samples, but its 'shards' hold {total}"


def read_manifest(path: Path) -> dict:
    """The manifest at `path`; a ShardError names the file and what is wrong with it."""
    again = 'run the same `transfusion prepare` again to write it anew'
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:         # ValueError: not JSON, or not UTF-8
        raise ShardError(f'{path} cannot be read as JSON ({error}): {again}') from None
    if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
        raise ShardError(f'{path} is not a manifest of {FORMAT}')
    problem = next((p for p in manifest_problems(manifest) if p is not None), None)
    if problem is not None:
        raise ShardError(f'{path} is not a valid manifest: {problem}; {again}')
    return manifest


class Prepared:
    """A finished prepared folder: its manifest, checked against the shards on disk (their
    sizes always; their SHA-256 with `verify = True`, else as the loader opens each shard)."""

    def __init__(self, folder: str | Path, verify: bool = False):
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.exists():
            hint = ' (prepare was not finished: run the same `transfusion prepare` again to finish it)' if (self.folder / SETTINGS).exists() else ''
            raise ShardError(f'{self.folder} is not a prepared data folder: no {MANIFEST}{hint}')
        self.manifest = read_manifest(manifest)
        for entry in self.manifest['shards']:
            path = self.folder / entry['file']
            if not path.exists():
                raise ShardError(f'{self.folder}: the shard {entry["file"]} listed in {MANIFEST} is missing')
            if path.stat().st_size != entry['bytes']:
                raise ShardError(f'{path} has {path.stat().st_size} bytes, {MANIFEST} says {entry["bytes"]} (damaged or replaced)')
            if verify:
                check_digest(path, entry['sha256'])

    @property
    def kind(self) -> str:
        return self.manifest['kind']

    @property
    def codec(self) -> dict | None:
        return self.manifest.get('codec')

    @property
    def tokenizer(self) -> dict:
        return self.manifest['tokenizer']

    @property
    def num_samples(self) -> int:
        return self.manifest['counts']['samples']

    def shard_paths(self) -> list[Path]:
        """Shards that hold samples, in order."""
        return [self.folder / e['file'] for e in self.manifest['shards'] if e['samples'] > 0]

    def shard_sizes(self) -> list[int]:
        return [e['samples'] for e in self.manifest['shards'] if e['samples'] > 0]

    def shard_digests(self) -> list[str]:
        """The SHA-256 the manifest gives each shard of `shard_paths()`."""
        return [e['sha256'] for e in self.manifest['shards'] if e['samples'] > 0]
