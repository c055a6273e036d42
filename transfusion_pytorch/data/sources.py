"""Where data comes from, in the field's own layouts. Each reader yields records in a fixed
order (sorted files, rows in file order), so that `prepare` is deterministic; images are read
only when a record's `load()` is called, so a rerun can skip finished shards cheaply.

- `imagefolder`: the Hugging Face `imagefolder` layout
  (https://huggingface.co/docs/datasets/image_dataset#imagefolder): image files (PNG, JPEG,
  WebP, ...; nested folders allowed) and one or more `metadata.jsonl` / `metadata.csv` files
  whose `file_name` column gives each image's path relative to the metadata file, and a
  caption column (`text` by default).
- `datasets`: a folder written by `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict`
  from which `split` is taken), with an `Image` column and a caption column. The images are
  read undecoded (`Image(decode = False)`), so that a broken one is ours to skip.
- `parquet`: parquet files as the Hugging Face Hub stores datasets (an image column of
  `{bytes, path}` structs), read in record batches with pyarrow, without a cache.
- `webdataset`: tar shards with `KEY.jpg` / `KEY.png` / `KEY.webp` and `KEY.txt` (or
  `KEY.json` holding the caption column), read with `webdataset`'s tar iterator
  (https://github.com/webdataset/webdataset).
- `text`: plain text files (one row per line, as the `datasets` `text` builder reads them;
  empty lines are left out) or jsonl files with a text column, for text-only rows.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..extras import require

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff')
WDS_IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')
METADATA_NAMES = ('metadata.jsonl', 'metadata.csv')
KINDS = ('imagefolder', 'datasets', 'parquet', 'webdataset', 'text')


class SourceError(ValueError):
    """A source that cannot be read as the layout it claims (the message says what is missing)."""


@dataclass(frozen = True)
class Record:
    key: str                                    # unique and stable: a path, a row number or a tar key
    caption: str | None                         # text of the row; None for an image-only source row
    load: Callable[[], bytes | Path] | None     # the image's bytes or path; None for a text row
    problem: str | None = None                  # set when the record is known to be unusable (e.g. no image in a tar sample)


def detect(source: str | Path) -> str:
    """The kind of `source` from what it holds."""
    path = Path(source)
    if not path.exists():
        raise SourceError(f'source {path} does not exist')
    if path.is_file():
        suffix = path.suffix.lower()
        kinds = {'.tar': 'webdataset', '.parquet': 'parquet', '.txt': 'text', '.jsonl': 'text'}
        if suffix in kinds and path.name not in METADATA_NAMES:
            return kinds[suffix]
        raise SourceError(f'source {path}: a file source must be .tar (webdataset), .parquet, .txt or .jsonl (text), got {path.name!r}')
    if (path / 'dataset_dict.json').exists() or (path / 'state.json').exists():
        return 'datasets'
    if any(path.rglob('metadata.jsonl')) or any(path.rglob('metadata.csv')):
        return 'imagefolder'
    for pattern, kind in (('*.tar', 'webdataset'), ('*.parquet', 'parquet')):
        if any(path.rglob(pattern)):
            return kind
    if any(path.rglob('*.txt')) or any(path.rglob('*.jsonl')):
        return 'text'
    raise SourceError(f'source {path}: found no metadata.jsonl / metadata.csv (imagefolder), save_to_disk files (datasets), '
                      f'.parquet, .tar (webdataset) or .txt / .jsonl (text) files in it')


def files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob('*') if p.is_file() and p.suffix.lower() in suffixes)


def caption_of(value, column: str, where: str) -> str:
    if value is None:
        return ''
    if not isinstance(value, str):
        raise SourceError(f'{where}: the caption column {column!r} must hold strings, got {type(value).__name__} {value!r:.60}')
    return value


def records(source: str | Path, kind: str | None = None, *, caption_column: str = 'text', image_column: str = 'image',
            split: str = 'train', text_column: str = 'text') -> Iterator[Record]:
    kind = kind or detect(source)
    if kind not in KINDS:
        raise SourceError(f'kind must be one of {KINDS}, got {kind!r}')
    if split != 'train' and kind != 'datasets':
        raise SourceError(f'--split {split!r}: {source} is a source of kind {kind}, which has no splits (--split picks one of a saved '
                          'DatasetDict); leave it out')
    path = Path(source)
    if kind == 'imagefolder':
        return imagefolder(path, caption_column)
    if kind == 'datasets':
        return saved_dataset(path, image_column, caption_column, split)
    if kind == 'parquet':
        return parquet(path, image_column, caption_column)
    if kind == 'webdataset':
        return webdataset_tars(path, caption_column)
    return text_rows(path, text_column)


# imagefolder

def metadata_rows(path: Path) -> Iterator[dict]:
    if path.suffix == '.csv':
        with open(path, newline = '') as file:
            yield from csv.DictReader(file)
        return
    with open(path) as file:
        for number, line in enumerate(file, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise SourceError(f'{path}, line {number}: not valid JSON ({error})') from None


def imagefolder(root: Path, caption_column: str) -> Iterator[Record]:
    metadata = sorted(p for name in METADATA_NAMES for p in root.rglob(name))
    if not metadata:
        raise SourceError(f'{root}: no metadata.jsonl or metadata.csv (the imagefolder layout needs one, with a file_name column)')
    for meta in metadata:
        for number, row in enumerate(metadata_rows(meta), 1):
            where = f'{meta}, row {number}'
            if 'file_name' not in row or caption_column not in row:
                missing = [c for c in ('file_name', caption_column) if c not in row]
                raise SourceError(f'{where}: no column {" or ".join(map(repr, missing))}; its columns are {sorted(row)} '
                                  f'(--caption-column picks the caption column)')
            image = meta.parent / row['file_name']
            yield Record(str(image.relative_to(root)), caption_of(row[caption_column], caption_column, where), lambda image = image: image)


# datasets and parquet

def image_loader(value, where: str) -> Callable[[], bytes | Path]:
    """A loader for an `Image` feature's undecoded value, {bytes, path}."""
    def load():
        if not isinstance(value, dict) or (value.get('bytes') is None and value.get('path') is None):
            raise SourceError(f'{where}: expected an image as {{bytes, path}}, got {type(value).__name__}')
        return value['bytes'] if value.get('bytes') is not None else Path(value['path'])
    return load


def check_columns(columns, wanted: tuple[str, ...], where: str):
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise SourceError(f'{where}: no column {" or ".join(map(repr, missing))}; its columns are {sorted(columns)} '
                          f'(--image-column and --caption-column pick them)')


def saved_dataset(path: Path, image_column: str, caption_column: str, split: str) -> Iterator[Record]:
    datasets = require('datasets', f'source: reading the datasets folder {path}')
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise SourceError(f'{path}: a DatasetDict without the split {split!r}; its splits are {sorted(dataset)} (--split picks one)')
        dataset = dataset[split]
    elif split != 'train':
        raise SourceError(f'--split {split!r}: {path} holds one Dataset, which has no splits (--split picks one of a saved '
                          'DatasetDict); leave it out')
    check_columns(dataset.column_names, (image_column, caption_column), str(path))
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode = False))
    dataset = dataset.select_columns([image_column, caption_column])
    index = 0
    for batch in dataset.iter(batch_size = 256):
        for image, caption in zip(batch[image_column], batch[caption_column]):
            where = f'{path}, row {index}'
            yield Record(f'{index:09d}', caption_of(caption, caption_column, where), image_loader(image, where))
            index += 1


def parquet(path: Path, image_column: str, caption_column: str) -> Iterator[Record]:
    import pyarrow.parquet as pq
    for file in files(path, ('.parquet',)):
        reader = pq.ParquetFile(file)
        check_columns(reader.schema_arrow.names, (image_column, caption_column), str(file))
        index = 0
        for batch in reader.iter_batches(batch_size = 256, columns = [image_column, caption_column]):
            for image, caption in zip(batch.column(image_column).to_pylist(), batch.column(caption_column).to_pylist()):
                where = f'{file}, row {index}'
                if isinstance(image, bytes):
                    image = dict(bytes = image)
                yield Record(f'{file.relative_to(path) if path.is_dir() else file.name}:{index:09d}',
                             caption_of(caption, caption_column, where), image_loader(image, where))
                index += 1


# webdataset

def webdataset_tars(path: Path, caption_column: str) -> Iterator[Record]:
    from webdataset.tariterators import tarfile_samples
    tars = files(path, ('.tar',))
    if not tars:
        raise SourceError(f'{path}: no .tar files')
    for sample in tarfile_samples([dict(url = str(tar)) for tar in tars]):
        key = f"{Path(sample['__url__']).name}/{sample['__key__']}"
        image = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), None)
        caption, problem = None, None
        if 'txt' in sample and caption_column == 'text':
            caption = sample['txt'].decode('utf-8')
        elif 'json' in sample:
            row = json.loads(sample['json'])
            caption = row.get(caption_column) if isinstance(row, dict) else None
        if image is None:
            problem = f'no image file ({"/".join(WDS_IMAGE_KEYS)}) in the tar sample'
        elif caption is None:
            problem = f'no caption (KEY.txt, or the column {caption_column!r} of KEY.json) in the tar sample'
        yield Record(key, caption if isinstance(caption, str) else None, (lambda image = image: image) if image is not None else None, problem)


# text

def text_rows(path: Path, text_column: str) -> Iterator[Record]:
    found = files(path, ('.txt', '.jsonl'))
    if not found:
        raise SourceError(f'{path}: no .txt or .jsonl files')
    for file in found:
        name = str(file.relative_to(path)) if path.is_dir() else file.name
        with open(file, encoding = 'utf-8') as lines:
            for number, line in enumerate(lines, 1):
                if file.suffix.lower() == '.jsonl':
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if text_column not in row:
                        raise SourceError(f'{file}, line {number}: no column {text_column!r}; its columns are {sorted(row)} (--text-column picks it)')
                    text = caption_of(row[text_column], text_column, f'{file}, line {number}')
                else:
                    text = line.rstrip('\n')
                if text.strip():
                    yield Record(f'{name}:{number}', text, None)
