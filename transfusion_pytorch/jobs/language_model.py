"""The image-text job started from a pretrained Hugging Face causal LM (`language_model`).

- The model is `Transfusion.from_language_model(folder, ...)`: its width, depth, heads and
  head width are the LM's, so the job's `dim`, `depth`, `heads` and `dim_head` are not given.
- The data must be tokenized with the LM's tokenizer, since its ids index the LM's embedding:
  byte-tokenized data, or a tokenizer with more ids than the LM's `vocab_size`, is refused;
  when the LM folder holds a tokenizer (as a Hub checkpoint does), the data's must be that one
  (the data package's fingerprint check, `tokenizers.check_same`). The vocab size may exceed the
  tokenizer's (Qwen2.5 pads 151,665 ids to 151,936).
- The run folder's `language_model.json` records the LM's path, architecture, vocab size and
  fingerprint (`fingerprint`); a rerun from another LM is refused, a rerun from the same LM
  moved elsewhere goes on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config_files import ConfigError
from ..data import tokenizers
from ..data.shards import write_json

RECORD = 'language_model.json'
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model')
SAMPLES, SAMPLE_BYTES = 16, 1 << 16


def fingerprint(folder: Path) -> str:
    """SHA-256 of the LM's config.json and, for each safetensors file, its name, size, header
    (every tensor's name, dtype, shape and offset) and 16 evenly spaced 64 KiB samples of its
    bytes. Reading a few MB instead of every byte keeps it instant for an LM of any size, and
    still tells apart two fine-tunes of one base (they differ in nearly every byte); an edit of
    a single tensor could go unseen."""
    from ..language_models import read_config, tensor_files
    digest = hashlib.sha256(json.dumps(read_config(folder), sort_keys = True).encode())
    for path in sorted(set(tensor_files(folder).values())):
        size = path.stat().st_size
        digest.update(f'\n{path.name} {size}\n'.encode())
        with open(path, 'rb') as file:
            header = int.from_bytes(file.read(8), 'little')
            digest.update(file.read(header))
            start, span = 8 + header, max(size - 8 - header - SAMPLE_BYTES, 0)
            for index in range(SAMPLES):
                file.seek(start + span * index // (SAMPLES - 1))
                digest.update(file.read(SAMPLE_BYTES))
    return digest.hexdigest()


def describe(folder: str | Path) -> dict:
    """What a run records of its LM; an LM folder that cannot be read is a ConfigError naming the key."""
    from ..language_models import family_of, read_config
    folder = Path(folder)
    try:
        config = read_config(folder)
        architecture = family_of(config).name
        return dict(path = str(folder.resolve()), architecture = architecture, vocab_size = config['vocab_size'],
                    fingerprint = fingerprint(folder))
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise ConfigError(f"'language_model': {error}") from None


def has_tokenizer(folder: str | Path) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def check_tokenizer(folder: str | Path, vocab_size: int, data_tokenizer: dict, data_name: str):
    """The data's tokenizer (a manifest's description) is the LM's, as far as the LM folder says."""
    folder = Path(folder)
    advice = f'prepare the data again with --tokenizer {folder}' if has_tokenizer(folder) else \
        "prepare the data again with the language model's own tokenizer (--tokenizer)"
    if data_tokenizer['kind'] == 'bytes':
        raise tokenizers.TokenizerMismatch(f'{data_name} was tokenized as UTF-8 bytes, but the language model {folder} reads the '
                                           f'ids of its own tokenizer: {advice}')
    if data_tokenizer['vocab_size'] > vocab_size:
        raise tokenizers.TokenizerMismatch(f'{data_name} was tokenized with {tokenizers.summary(data_tokenizer)}, more ids than '
                                           f'the vocab_size {vocab_size} of the language model {folder}, so it is not its tokenizer: {advice}')
    if has_tokenizer(folder):
        tokenizers.check_same(tokenizers.HFTokenizer(folder).describe(), data_tokenizer, f'the language model {folder}', data_name)


def check_rerun(description: dict | None, run_dir: Path):
    """A rerun starts from the LM its run started from (`describe`; None: from none, as it did)."""
    if not (run_dir / 'config.toml').exists():
        return
    recorded = json.loads((run_dir / RECORD).read_text()) if (run_dir / RECORD).exists() else None
    again = 'use another --name, or delete the folder to start over'
    if recorded is None and description is not None:
        raise ConfigError(f"{run_dir} holds a run that did not start from a language model, and 'language_model' is "
                          f"{description['path']} now: {again}")
    if recorded is None:
        return
    if description is None:
        raise ConfigError(f"{run_dir} holds a run started from the language model {recorded['path']}: give it as --language-model "
                          f"(its folder, if it moved) to resume; or {again}")
    if description['fingerprint'] != recorded['fingerprint']:
        raise ConfigError(f"{run_dir} holds a run started from the language model {recorded['path']} ({recorded['architecture']}, "
                          f"fingerprint {recorded['fingerprint'][:12]}), but 'language_model' = {description['path']} is another "
                          f"one ({description['architecture']}, fingerprint {description['fingerprint'][:12]}): {again}")


def record(run_dir: Path, description: dict):
    write_json(run_dir / RECORD, description)
