"""Text to ids and back: UTF-8 bytes (vocabulary 256, nothing to load), or a Hugging Face
tokenizer from a local folder (`AutoTokenizer.from_pretrained`).

Each tokenizer describes itself as a small dict that goes into the shard manifest and the
run folder. Its `fingerprint` is what training compares: shards tokenized one way are refused
by a run that tokenizes another (`check_same`). For a Hugging Face tokenizer the fingerprint is
the SHA-256 of its full definition (`tokenizer.json`: vocabulary, merges, normalizer,
pre-tokenizer), so a moved or renamed folder still matches and a retrained one does not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..extras import require


class TokenizerMismatch(ValueError):
    """Data tokenized with one tokenizer, used with another."""


class ByteTokenizer:
    """UTF-8 bytes as ids, 0..255."""
    vocab_size = 256

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode('utf-8')) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode('utf-8', errors = 'replace')

    def describe(self) -> dict:
        return dict(kind = 'bytes', vocab_size = 256, fingerprint = 'utf-8-bytes')


TOKENIZER_FILES = ('tokenizer_config.json', 'tokenizer.json')      # what a tokenizer's save_pretrained writes


class HFTokenizer:
    """A Hugging Face tokenizer from a local folder; captions are encoded without special
    tokens (the model adds its own start and end)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f'tokenizer: {self.path} is not a folder (a local Hugging Face tokenizer folder, as save_pretrained writes)')
        if not any((self.path / name).exists() for name in TOKENIZER_FILES):
            raise FileNotFoundError(f'tokenizer: {self.path} has no {" or ".join(TOKENIZER_FILES)} (a local Hugging Face tokenizer '
                                    'folder, as save_pretrained writes)')
        transformers = require('transformers', f'tokenizer: loading the tokenizer in {self.path}')
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path))
        except (OSError, ValueError, KeyError, TypeError) as error:     # a damaged folder; transformers' messages run over several lines
            raise ValueError(f'tokenizer: {self.path} does not load as a Hugging Face tokenizer '
                             f'({type(error).__name__}: {" ".join(str(error).split())})') from None
        self.vocab_size = len(self.tokenizer)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens = False)['input_ids']

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens = True)

    def fingerprint(self) -> str:
        backend = getattr(self.tokenizer, 'backend_tokenizer', None)
        definition = backend.to_str() if backend is not None else json.dumps(sorted(self.tokenizer.get_vocab().items()))
        return hashlib.sha256(f'{type(self.tokenizer).__name__}\n{definition}'.encode()).hexdigest()

    def describe(self) -> dict:
        return dict(kind = 'huggingface', path = str(self.path.resolve()), vocab_size = self.vocab_size,
                    fingerprint = self.fingerprint(), name = type(self.tokenizer).__name__)


def load_tokenizer(path: str | Path | None):
    """`path` None: UTF-8 bytes; otherwise a local Hugging Face tokenizer folder."""
    return ByteTokenizer() if path is None else HFTokenizer(path)


def from_description(description: dict, path: str | Path | None = None):
    """The tokenizer a manifest or run describes, loaded from `path` (or its recorded path)
    and checked to be the same one. A path for UTF-8 bytes, which have no folder, is refused
    rather than ignored."""
    if description['kind'] == 'bytes':
        if path is not None:
            raise ValueError('the data was tokenized as UTF-8 bytes, which need no tokenizer folder: leave the option out')
        return ByteTokenizer()
    tokenizer = HFTokenizer(path or description['path'])
    check_same(description, tokenizer.describe(), 'the recorded tokenizer', f'the tokenizer at {tokenizer.path}')
    return tokenizer


def check_same(expected: dict, given: dict, expected_name: str, given_name: str):
    if expected['fingerprint'] != given['fingerprint'] or expected['vocab_size'] != given['vocab_size']:
        raise TokenizerMismatch(
            f'{given_name} was tokenized with {summary(given)}, but {expected_name} uses {summary(expected)}: '
            f'ids of one mean other words in the other. Prepare the data again with the same --tokenizer')


def summary(description: dict) -> str:
    if description['kind'] == 'bytes':
        return 'UTF-8 bytes (vocabulary 256)'
    return f"the tokenizer {description.get('path')} (vocabulary {description['vocab_size']}, fingerprint {description['fingerprint'][:12]})"
