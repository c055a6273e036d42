"""What `sample` starts from and what it returns: prompts in, samples out.

A prompt is None or `[]`, a text tensor, a `(modality_type, tensor)` tuple, or a list of these
(a None element stands for nothing). Its text may hold the structural ids of the vocabulary,
as prompts written for the public package do (`model.som_ids`, `model.meta_id`,
`model.char_tokenizer('3,3')`, `model.eom_ids`, ...). They mean what they mean in a sequence:

- META, shape tokens and BOM_m right before a modality of type m are that modality's header,
  and EOM_m right after it its end. The sequence writes them itself, so they are checked
  against the modality (type and shape) and dropped;
- a prompt that ends with BOM_m, with or without META and a shape before it, opens a modality
  of type m: generation starts by denoising it (of the shape written, else of
  `fixed_modality_shape` or the type's default shape);
- any other structural id (SOS, EOS, a stray META or EOM, a header that opens nothing) is an
  error naming the element and the position.

A returned sample is in the list form `model(...)` trains on, and always alternates text and
modalities, starting and ending with text: `[text, (m, x), text, (m, x), text]`, where a text
may be empty. Structural tokens are not part of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from .backends import items_to_sample
from .inputs import Modality, Sample, Text, normalize_prompt
from .latents import decoded, encode_modality, with_token_shape
from .vocab import Vocab


@dataclass(frozen = True)
class Prompt:
    segments: Sample = field(default_factory = list)    # text (text ids only) and modalities
    opening: tuple[int, tuple[int, ...] | None] | None = None  # the modality its last BOM opens: (type, shape or None)


def is_batch(prompt) -> bool:
    """A list of prompts (each a list, or None) rather than one prompt, whose elements are never lists."""
    return (isinstance(prompt, list) and any(isinstance(p, list) for p in prompt)
            and all(p is None or isinstance(p, list) for p in prompt))


def normalize(model, prompt, name: str) -> Prompt:
    """One prompt in any of its forms -> a `Prompt`; errors call it `name`."""
    vocab = model.vocab
    pairs = normalize_prompt(prompt, name, model.config.num_text_tokens, model.specs, partial(encode_modality, model), vocab.size)

    segments, text, closes = [], [], None          # text: the pending (id, where, position) of the current text run
    for where, segment in pairs:
        if isinstance(segment, Text):
            ids = segment.ids.tolist()
            skip = int(closes is not None and len(ids) > 0 and ids[0] == closes)   # the EOM of the modality just before
            text.extend((token, where, position) for position, token in enumerate(ids) if position >= skip)
            closes = closes if len(ids) == 0 else None
            continue

        header = take_header(text, vocab)
        if header is not None:
            m, shape, at = header
            if m != segment.modality_type or (shape is not None and shape != segment.shape):
                raise ValueError(f'{at}: the header before the modality {where} announces modality type {m} of shape {shape}, '
                                 f'the modality is of type {segment.modality_type} and shape {segment.shape}')
        segments.extend(flush(text, vocab))
        segments.append(with_token_shape(model, segment))
        closes = vocab.eom(segment.modality_type)

    header = take_header(text, vocab)
    segments.extend(flush(text, vocab))
    opening = None
    if header is not None:
        opening = header[:2]
        if header[1] is not None:
            check_opening_shape(model, *opening, header[2])
    return Prompt(segments, opening)


def take_header(text: list, vocab: Vocab):
    """Removes a trailing `[META shape] BOM_m` from the pending text; returns (m, shape or None,
    where) or None when the text does not end with BOM."""
    if len(text) == 0 or not vocab.is_bom(text[-1][0]):
        return None
    bom, where, _ = text.pop()
    m = vocab.modality_type_of(bom)
    start = len(text)
    while start > 0 and vocab.is_shape_token(text[start - 1][0]):
        start -= 1
    if start == 0 or text[start - 1][0] != vocab.meta:
        return m, None, where                                   # BOM alone: the shape is not given
    shape_tokens = [token for token, _, _ in text[start:]]
    shape = vocab.decode_shape(shape_tokens)
    if shape is None:
        raise ValueError(f'{where}: the shape tokens before BOM_{m} do not spell a shape, got '
                         f'{[vocab.name(t) for t in shape_tokens]}')
    del text[start - 1:]
    return m, shape, where


def flush(text: list, vocab: Vocab) -> list[Text]:
    """The pending text run as a Text segment (none when empty), checked to hold text ids only."""
    if len(text) == 0:
        return []
    for token, where, position in text:
        if token >= vocab.num_text_tokens:
            raise ValueError(
                f'{where}: the id {token} ({vocab.name(token)}) at position {position} is a structural id; a prompt may hold them '
                f'only around a modality: META, its shape and BOM_m right before a modality of type m (or ending the prompt, '
                f'to start one), EOM_m right after it')
    ids = torch.tensor([token for token, _, _ in text], dtype = torch.long)
    text.clear()
    return [Text(ids)]


def check_opening_shape(model, m: int, shape: tuple[int, ...], where: str):
    num_dim = model.config.modality_num_dim[m]
    if num_dim is not None and len(shape) != num_dim:
        raise ValueError(f'{where}: the prompt opens modality type {m} with the shape {shape}, but that type has '
                         f'{num_dim} axes (modality_num_dim)')


def to_output(model, items: list, return_latents: bool) -> list:
    """The items of a finished row -> the list form: text tensors and `(type, modality)`
    tuples, alternating, starting and ending with text (empty where there is none)."""
    vocab = model.vocab
    if items[-1] == vocab.eos:
        items = items[:-1]
    segments = items_to_sample(items, vocab, wrapped = True)
    device = next((s.latent.device for s in segments if isinstance(s, Modality)), torch.device('cpu'))

    sample = []
    for segment in segments:
        if isinstance(segment, Text):
            sample.append(segment.ids)
            continue
        if len(sample) == 0 or isinstance(sample[-1], tuple):
            sample.append(torch.zeros(0, dtype = torch.long, device = device))
        sample.append((segment.modality_type, decoded(model, segment.modality_type, segment.latent, return_latents)))
    if isinstance(sample[-1], tuple):
        sample.append(torch.zeros(0, dtype = torch.long, device = device))
    return sample

