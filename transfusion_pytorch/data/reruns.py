"""A prepared folder across runs of `prepare`: what makes a rerun into it safe.

- Settings: `prepare.json` holds what the bytes depend on; a rerun with other settings is
  refused while the folder holds shards, and re-sets the folder while it holds none (so a
  command that failed on a wrong --caption-column or --split does not block the right one).
- Source: each shard records what it was made from (`made_from`: its records' count, first and
  last key and a SHA-256 of their keys, captions and images). A rerun whose source gives other
  records in a shard's place is refused, naming the shard; a source that only gained records
  after the last shard has the last shard rewritten and new shards added, which gives the
  bytes a fresh run of the grown source gives.
- One writer: a run holds an exclusive lock on the folder (`flock`), so a second run into it
  waits for the first, then finds its shards written; holding it, a run removes the temporary
  files left by runs killed earlier or stopped by a full disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from . import shards, sources

# settings added after folders were first prepared, with the value that gives the bytes of
# those folders; an older prepare.json without them is read as holding these
LATER_SETTINGS = dict(long_captions = 'truncate', max_caption_tokens = 1024)
# settings that change the bytes only of shards with a caption over the limit
CAPTION_SETTINGS = {'long_captions', 'max_caption_tokens'}


class SourceChanged(ValueError):
    """A rerun whose source no longer gives the records the folder's shards were made from."""


def check_settings(out: Path, settings: dict):
    path = out / shards.SETTINGS
    written = sorted(out.glob('shard-*.safetensors'))
    if path.exists():
        before = {**LATER_SETTINGS, **json.loads(path.read_text())}
        changed = sorted(k for k in before.keys() | settings.keys() if before.get(k) != settings.get(k))
        if not changed:
            return
        if written and not (set(changed) <= CAPTION_SETTINGS and not any(has_long_captions(p, settings) for p in written)):
            raise ValueError(f'{out} holds data prepared with other settings (they differ in {", ".join(changed)}); '
                             f'use another --out, or delete {out} to start over')
    elif written:
        raise ValueError(f'{out} holds shards but no {shards.SETTINGS}: not a folder prepare wrote; use another --out')
    shards.write_json(path, settings)


def has_long_captions(path: Path, settings: dict) -> bool:
    """Whether the shard at `path` holds a caption the caption settings act on: one over the
    limit it was written with, or over the limit of `settings`."""
    with shards.Shard(path) as shard:
        return bool(shard.long_captions) or any(tokens > settings['max_caption_tokens'] for e in shard.samples for tokens in caption_tokens(e))


def caption_tokens(entry: dict) -> list[int]:
    """The token counts of the texts of a sample that the caption settings act on: its caption,
    or each text segment of a sample of several segments (none for a text row)."""
    if 'segments' in entry:
        return [size for kind, size in entry['segments'] if kind == 'text']
    return [entry['text_tokens']] if entry['shape'] is not None else []


# what a shard was made from

def made_from(records: list[sources.Record]) -> dict:
    """The fingerprint of the source records of a shard: their keys, captions and problems and
    their images: the bytes where the source holds them (parquet, datasets, webdataset), the
    file size where it names a file (imagefolder; the file is not read)."""
    digest = hashlib.sha256()
    for record in records:
        if hasattr(record, 'segments'):         # a document: its texts, and its images as a caption's image
            content = [s if isinstance(s, str) else image_identity(sources.Record(record.key, None, s)) for s in record.segments]
            digest.update(json.dumps([record.key, content, record.problem]).encode() + b'\n')
            continue
        digest.update(json.dumps([record.key, record.caption, record.problem, image_identity(record)]).encode() + b'\n')
    return dict(count = len(records), first = records[0].key, last = records[-1].key, sha256 = digest.hexdigest())


def image_identity(record: sources.Record) -> str | int | None:
    if record.load is None:
        return None
    try:
        image = record.load()
        return hashlib.sha256(image).hexdigest() if isinstance(image, bytes) else Path(image).stat().st_size
    except Exception:           # an image that cannot be had is reported when the shard is written
        return None


def keep_shard(path: Path, chunk: list[sources.Record], kind: str) -> bool:
    """Whether the shard at `path` holds `chunk` (keep it); False when the source only gained
    records after it (rewrite it). A shard made from other records is an error."""
    with shards.Shard(path) as shard:
        before, keys = shard.made_from, [e['key'] for e in shard.samples] + [key for key, _ in shard.skipped]
    now = made_from(chunk)
    if before is None:          # written before made_from was recorded: its keys must still be the source's
        if kind == 'text':
            keys = [re.sub(r'#\d+$', '', key) for key in keys]      # the rows of a long text row
        gone = set(keys) - {record.key for record in chunk}
        if not gone:
            return True
        raise changed_error(path, f'records no longer in this place of the source ({min(gone)} and {len(gone) - 1:,} more)', now)
    if now == before:
        return True
    if before['count'] < now['count'] and made_from(chunk[:before['count']]) == before:
        return False
    same_keys = all(now[k] == before[k] for k in ('count', 'first', 'last'))
    raise changed_error(path, f"{before['count']:,} records ({before['first']} .. {before['last']})", now, same_keys)


def changed_error(path: Path, before: str, now: dict, same_keys: bool = False) -> SourceChanged:
    place = 'them with other captions or images' if same_keys else f"{now['count']:,} records ({now['first']} .. {now['last']}) in their place"
    return SourceChanged(f'{path.parent}: the source changed since this folder was prepared: {path.name} was made from {before}, '
                         f'and the source now gives {place}. Prepare into a new --out, or delete {path.parent} to start over')


def check_no_more_shards(out: Path, num_shards: int, num_records: int):
    """After the last shard of the source: a shard beyond it means the source lost records."""
    beyond = out / shards.shard_name(num_shards)
    if beyond.exists():
        raise SourceChanged(f'{out}: the source changed since this folder was prepared: it now gives {num_records:,} records, '
                            f'{num_shards} shards, but the folder holds {beyond.name} as well. Prepare into a new --out, '
                            f'or delete {out} to start over')


# one writer

@contextmanager
def holding(out: Path):
    """Holds `out` for one run (see the module docstring). Where the filesystem has no `flock`
    (Windows, some network filesystems) the run goes on unlocked and removes no files."""
    try:
        import fcntl
    except ImportError:             # Windows
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        if lock(fcntl, fd, out):
            remove_temporaries(out)
        yield
    finally:
        os.close(fd)                # releases the lock


def lock(fcntl, fd: int, out: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        print(f'{out}: another `transfusion prepare` is writing into it; waiting for it to finish', file = sys.stderr, flush = True)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    except OSError:
        return False


def remove_temporaries(out: Path):
    stale = [p for p in out.glob('.*.tmp-*') if p.is_file()]
    for path in stale:
        path.unlink(missing_ok = True)
    if stale:
        print(f'{out}: removed {len(stale)} temporary file{"s" if len(stale) > 1 else ""} left by an interrupted run '
              f'({", ".join(sorted(p.name for p in stale))})')
