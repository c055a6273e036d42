"""The token vocabulary: text ids first, then the structural tokens that frame a sequence.

Layout of the ids (T = num_text_tokens, M = number of modality types)::

    [0, T)              text
    T + 0               start of sequence  (SOS)
    T + 1               end of sequence    (EOS)
    T + 2               meta: a modality's shape follows
    T + 3 ... T + 12    the digits 0-9 of the shape
    T + 13              the separator ',' between the axes of the shape
    T + 14 + 2m         begin of a modality of type m  (BOM_m)
    T + 15 + 2m         end of a modality of type m    (EOM_m)

The shape has its own digits, apart from the text vocabulary, so that a model can announce
the shape of a modality it is about to generate whatever tokenizer the text uses.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_DIGITS = 10


@dataclass(frozen = True)
class Vocab:
    num_text_tokens: int
    num_modality_types: int

    @property
    def sos(self) -> int:
        return self.num_text_tokens

    @property
    def eos(self) -> int:
        return self.num_text_tokens + 1

    @property
    def meta(self) -> int:
        return self.num_text_tokens + 2

    @property
    def digit0(self) -> int:
        return self.num_text_tokens + 3

    @property
    def sep(self) -> int:
        return self.digit0 + NUM_DIGITS

    def bom(self, modality_type: int) -> int:
        return self.sep + 1 + 2 * modality_type

    def eom(self, modality_type: int) -> int:
        return self.sep + 2 + 2 * modality_type

    @property
    def size(self) -> int:
        return self.sep + 1 + 2 * self.num_modality_types

    # kinds of token

    def is_bom(self, token: int) -> bool:
        return token > self.sep and (token - self.sep - 1) % 2 == 0 and token < self.size

    def is_eom(self, token: int) -> bool:
        return token > self.sep and (token - self.sep - 1) % 2 == 1 and token < self.size

    def modality_type_of(self, token: int) -> int:
        """The modality type of a BOM or EOM token."""
        return (token - self.sep - 1) // 2

    def is_shape_token(self, token: int) -> bool:
        return self.digit0 <= token <= self.sep

    def name(self, token: int) -> str:
        """How error messages call an id."""
        names = {self.sos: 'SOS', self.eos: 'EOS', self.meta: 'META', self.sep: "the shape separator ','"}
        if 0 <= token < self.num_text_tokens:
            return f'the text id {token}'
        if token in names:
            return names[token]
        if self.digit0 <= token < self.sep:
            return f'the shape digit {token - self.digit0}'
        if self.is_bom(token) or self.is_eom(token):
            return f"{'BOM' if self.is_bom(token) else 'EOM'}_{self.modality_type_of(token)}"
        return f'{token}, outside the vocabulary'

    # shapes written as tokens

    def encode_shape(self, shape: tuple[int, ...]) -> list[int]:
        """`(8, 8)` -> the tokens of the string "8,8". A zero-dim shape `()` is written as nothing."""
        return self.encode_shape_text(','.join(str(int(size)) for size in shape))

    def encode_shape_text(self, text: str) -> list[int]:
        """"8,8" -> its shape tokens: the digits and ',' are the only characters they can write."""
        if not all(char.isdigit() and char.isascii() or char == ',' for char in text):
            raise ValueError(f"shape tokens can only write the digits 0-9 and ',', got {text!r}")
        return [self.sep if char == ',' else self.digit0 + int(char) for char in text]

    def decode_shape(self, tokens: list[int]) -> tuple[int, ...] | None:
        """The inverse of `encode_shape`; None where the tokens do not spell a valid shape
        (a stray token, an empty axis, a leading zero or a zero-sized axis)."""
        chars = []
        for token in tokens:
            if token == self.sep:
                chars.append(',')
            elif self.digit0 <= token < self.digit0 + NUM_DIGITS:
                chars.append(str(token - self.digit0))
            else:
                return None

        text = ''.join(chars)
        if text == '':
            return ()

        axes = text.split(',')
        if any(axis == '' or axis.startswith('0') for axis in axes):
            return None

        return tuple(int(axis) for axis in axes)
