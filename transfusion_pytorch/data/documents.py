"""Sources of samples made of several segments, in the field's own layouts. A `Document` is an
ordered list of segments, each a text (a str) or an image (a loader of its bytes or path, read
only when called, as a `Record`'s image is).

- `interleaved`: web documents in the OBELICS layout (Laurençon et al., 2023,
  https://huggingface.co/datasets/HuggingFaceM4/OBELICS): two aligned list columns, `texts`
  (str or null) and `images` (an image or null), exactly one of the two set at each position.
  Read from a `datasets` folder, parquet files, JSON lines (`images` holding paths relative to
  the .jsonl file) and webdataset tars, where `KEY.json` is the segment list (a list of texts
  and nulls, or an object with such a `texts` list) and the image at position j is `KEY.j.png`
  (or .jpg, .jpeg, .webp).
- `edit`: editing triples, a source image, an instruction and a target image, read as the
  segments [source, instruction, target]. The columns are InstructPix2Pix's (Brooks et al.,
  2023, https://huggingface.co/datasets/timbrooks/instructpix2pix-clip-filtered):
  `original_image`, `edit_prompt`, `edited_image`, or MagicBrush's (Zhang et al., 2023,
  https://huggingface.co/datasets/osunlp/MagicBrush): `source_img`, `instruction`,
  `target_img`, found by themselves, or others named by flags. Read from a `datasets` folder,
  parquet files, an imagefolder whose metadata.jsonl / .csv names both files in
  `<column>_file_name` columns (the `datasets` imagefolder convention for several images per
  row), and webdataset tars as `KEY.<source column>.png`, `KEY.<target column>.png` and the
  instruction in `KEY.json` (its instruction column) or `KEY.txt`.

The kind is found from the columns when not given: `texts` and `images` make a document, the
three edit columns a triple; anything else is read as captions or text (`sources.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..extras import require
from .sources import (WDS_IMAGE_KEYS, SourceError, caption_of, detect, files, image_loader, metadata_rows, METADATA_NAMES)

KINDS = ('interleaved', 'edit')
INSTRUCTPIX2PIX = ('original_image', 'edit_prompt', 'edited_image')
MAGICBRUSH = ('source_img', 'instruction', 'target_img')
INTERLEAVED = ('texts', 'images')


@dataclass(frozen = True)
class Document:
    key: str                    # unique and stable: a row number or a tar key
    segments: tuple             # each a str (a text) or a callable giving the image's bytes or path
    problem: str | None = None  # set when the document is known to be unusable (an image file missing from a tar sample)


def edit_columns(given: tuple, columns) -> tuple[str, str, str]:
    """The (source, instruction, target) columns: those given (None for each not given),
    MagicBrush's when none is given and the source has those, else InstructPix2Pix's."""
    if all(c is None for c in given) and set(MAGICBRUSH) <= set(columns) and not set(INSTRUCTPIX2PIX) <= set(columns):
        return MAGICBRUSH
    return tuple(c if c is not None else default for c, default in zip(given, INSTRUCTPIX2PIX))


def kind_of(columns, given_edit: tuple) -> str | None:
    """The kind that `columns` make: 'interleaved', 'edit', or None (captions or text)."""
    if set(INTERLEAVED) <= set(columns):
        return 'interleaved'
    if set(edit_columns(given_edit, columns)) <= set(columns):
        return 'edit'
    return None


def columns_of(path: Path, layout: str, split: str) -> list[str]:
    """The column names of the source's first row (webdataset: of the first sample's files,
    without their image extension, and of its KEY.json)."""
    if layout == 'datasets':
        dataset = load_dataset(path, split)
        return list(dataset.column_names)
    if layout == 'parquet':
        import pyarrow.parquet as pq
        found = files(path, ('.parquet',))
        return list(pq.ParquetFile(found[0]).schema_arrow.names) if found else []
    if layout == 'imagefolder':
        for meta in sorted(p for name in METADATA_NAMES for p in path.rglob(name)):
            for row in metadata_rows(meta):
                return [c[:-len('_file_name')] if c.endswith('_file_name') else c for c in row]
        return []
    if layout == 'webdataset':
        from webdataset.tariterators import tarfile_samples
        for sample in tarfile_samples([dict(url = str(tar)) for tar in files(path, ('.tar',))]):
            row = json.loads(sample['json']) if 'json' in sample else {}
            if isinstance(row, list) or (isinstance(row, dict) and isinstance(row.get('texts'), list)):
                return list(INTERLEAVED)            # KEY.json is the segment list
            names = [k.rsplit('.', 1)[0] if k.rsplit('.', 1)[-1] in WDS_IMAGE_KEYS else k for k in sample if not k.startswith('__')]
            return names + (list(row) if isinstance(row, dict) else [])
        return []
    for file in (f for f in files(path, ('.jsonl',)) if f.suffix.lower() == '.jsonl'):    # text: the first row of JSON lines
        with open(file, encoding = 'utf-8') as lines:
            for line in lines:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except ValueError:          # not a document; the text reader names the line
                        return []
                    return list(row) if isinstance(row, dict) else []
    return []


def load_dataset(path: Path, split: str):
    datasets = require('datasets', f'source: reading the datasets folder {path}')
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise SourceError(f'{path}: a DatasetDict without the split {split!r}; its splits are {sorted(dataset)} (--split picks one)')
        dataset = dataset[split]
    return dataset


def documents(source: str | Path, layout: str | None, kind: str, columns: tuple, split: str = 'train') -> Iterator[Document]:
    """The documents of `source` (of `layout`, detected when None) as `kind`; `columns`: the
    columns read, ('texts', 'images') or the edit columns (source, instruction, target)."""
    path = Path(source)
    layout = layout or detect(path)
    rows = {'datasets': lambda: dataset_rows(path, columns, split), 'parquet': lambda: parquet_rows(path, columns),
            'text': lambda: jsonl_rows(path, columns), 'imagefolder': lambda: imagefolder_rows(path, columns),
            'webdataset': lambda: webdataset_documents(path, kind, columns)}
    readable = dict(interleaved = ('datasets', 'parquet', 'text', 'webdataset'), edit = ('datasets', 'parquet', 'imagefolder', 'webdataset'))
    if layout not in readable[kind]:
        names = {'text': 'JSON lines'}
        raise SourceError(f'{path}: {kind} samples are read from {", ".join(names.get(n, n) for n in readable[kind])} sources, '
                          f'not {names.get(layout, layout)}')
    if layout == 'webdataset':
        return rows[layout]()
    return (Document(key, segments_of(kind, columns, values, where, image_of)) for key, values, where, image_of in rows[layout]())


def segments_of(kind: str, columns: tuple, values: list, where: str, image_of) -> tuple:
    if kind == 'edit':
        source, instruction, target = values
        return (image_of(source, f'{where}, the source image'), caption_of(instruction, columns[1], where),
                image_of(target, f'{where}, the target image'))
    return interleave(*values, where, image_of)


def interleave(texts, images, where: str, image_of) -> tuple:
    """The segments of an OBELICS row: at each position its text, or its image as `image_of` loads it."""
    if not isinstance(texts, list) or not isinstance(images, list):
        raise SourceError(f"{where}: 'texts' and 'images' must be lists (the OBELICS layout), got {type(texts).__name__} and {type(images).__name__}")
    if len(texts) != len(images):
        raise SourceError(f"{where}: 'texts' has {len(texts)} entries and 'images' {len(images)}; they must be aligned, one text or one image at each position")
    if not texts:
        raise SourceError(f"{where}: an empty document ('texts' and 'images' hold nothing)")
    segments = []
    for j, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            what = 'both a text and an image' if text is not None else 'neither a text nor an image'
            raise SourceError(f"{where}, position {j}: {what}; exactly one of 'texts' and 'images' must be set at each position (the OBELICS layout)")
        segments.append(caption_of(text, 'texts', f'{where}, position {j}') if text is not None else image_of(image, f'{where}, position {j}'))
    return tuple(segments)


# rows: (key, the values of `columns`, where, how an image value is loaded)

def stored_image(value, where: str):
    return image_loader(dict(bytes = value) if isinstance(value, bytes) else value, where)


def check_columns(names, columns: tuple, where: str):
    missing = [c for c in columns if c not in names]
    if missing:
        raise SourceError(f'{where}: no column {" or ".join(map(repr, missing))}; its columns are {sorted(names)} '
                          f'(--source-image-column, --instruction-column and --target-image-column pick the edit columns)')


def dataset_rows(path: Path, columns: tuple, split: str):
    dataset = load_dataset(path, split)
    check_columns(dataset.column_names, columns, str(path))
    index = 0
    # as arrow, images stay undecoded {bytes, path} structs, at the top level and inside lists alike
    for table in dataset.select_columns(list(columns)).with_format('arrow').iter(batch_size = 256):
        for values in zip(*(table.column(c).to_pylist() for c in columns)):
            yield f'{index:09d}', list(values), f'{path}, row {index}', stored_image
            index += 1


def parquet_rows(path: Path, columns: tuple):
    import pyarrow.parquet as pq
    for file in files(path, ('.parquet',)):
        reader = pq.ParquetFile(file)
        check_columns(reader.schema_arrow.names, columns, str(file))
        index = 0
        for batch in reader.iter_batches(batch_size = 256, columns = list(columns)):
            for values in zip(*(batch.column(c).to_pylist() for c in columns)):
                yield f'{file.relative_to(path) if path.is_dir() else file.name}:{index:09d}', list(values), f'{file}, row {index}', stored_image
                index += 1


def jsonl_rows(path: Path, columns: tuple):
    found = files(path, ('.jsonl',))
    if not found:
        raise SourceError(f'{path}: no .jsonl files')
    for file in found:
        name = str(file.relative_to(path)) if path.is_dir() else file.name

        def image_of(value, where: str, folder = file.parent):
            if not isinstance(value, str):
                raise SourceError(f'{where}: an image of JSON lines must be a path relative to the file, got {type(value).__name__} {value!r:.60}')
            return lambda: folder / value
        for number, row in enumerate(metadata_rows(file), 1):
            where = f'{file}, line {number}'
            check_columns(row, columns, where)
            yield f'{name}:{number}', [row[c] for c in columns], where, image_of


def imagefolder_rows(root: Path, columns: tuple):
    source, instruction, target = columns
    metadata = sorted(p for name in METADATA_NAMES for p in root.rglob(name))
    for meta in metadata:
        for number, row in enumerate(metadata_rows(meta), 1):
            where = f'{meta}, row {number}'
            wanted = (f'{source}_file_name', instruction, f'{target}_file_name')
            check_columns(row, wanted, where)
            key = str((meta.parent / row[wanted[0]]).relative_to(root))
            yield key, [row[c] for c in wanted], where, lambda name, _, folder = meta.parent: (lambda: folder / name)


def webdataset_documents(path: Path, kind: str, columns: tuple) -> Iterator[Document]:
    from webdataset.tariterators import tarfile_samples
    tars = files(path, ('.tar',))
    if not tars:
        raise SourceError(f'{path}: no .tar files')
    for sample in tarfile_samples([dict(url = str(tar)) for tar in tars]):
        key = f"{Path(sample['__url__']).name}/{sample['__key__']}"
        yield (tar_edit if kind == 'edit' else tar_document)(sample, key, columns)


def tar_image(sample: dict, name: str):
    found = next((sample[f'{name}.{ext}'] for ext in WDS_IMAGE_KEYS if f'{name}.{ext}' in sample), None)
    return None if found is None else (lambda: found)


def tar_document(sample: dict, key: str, columns: tuple) -> Document:
    if 'json' not in sample:
        return Document(key, (), 'no segment list (KEY.json) in the tar sample')
    listed = json.loads(sample['json'])
    texts = listed.get('texts') if isinstance(listed, dict) else listed
    if not isinstance(texts, list):
        raise SourceError(f'{key}.json: the segment list must be a JSON list of texts and nulls (or an object with such a '
                          f"'texts' list), got {type(listed).__name__}")
    images = [tar_image(sample, str(j)) for j in range(len(texts))]
    missing = [j for j, (text, image) in enumerate(zip(texts, images)) if text is None and image is None]
    if missing:
        return Document(key, (), f'no image file KEY.{missing[0]}.({"/".join(WDS_IMAGE_KEYS)}) for position {missing[0]}, a null in KEY.json')
    return Document(key, interleave(texts, images, key, lambda image, _: image))


def tar_edit(sample: dict, key: str, columns: tuple) -> Document:
    source, instruction, target = columns
    images = tar_image(sample, source), tar_image(sample, target)
    row = json.loads(sample['json']) if 'json' in sample else {}
    text = row.get(instruction) if isinstance(row, dict) else None
    if text is None and 'txt' in sample:
        text = sample['txt'].decode('utf-8')
    for name, image in zip((source, target), images):
        if image is None:
            return Document(key, (), f'no image file KEY.{name}.({"/".join(WDS_IMAGE_KEYS)}) in the tar sample')
    if text is None:
        return Document(key, (), f'no instruction (the column {instruction!r} of KEY.json, or KEY.txt) in the tar sample')
    return Document(key, (images[0], caption_of(text, instruction, key), images[1]))
