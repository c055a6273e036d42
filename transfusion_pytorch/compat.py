"""Names that code written for the public `transfusion-pytorch` package (0.20.0) uses, mapped
onto this package's vocabulary and configuration. They are views: nothing here has behaviour
of its own. The public package calls a modality's BOM token its start-of-modality ("som").

Its tests prime sampling with these ids, for instance `model.sample([tensor(model.som_ids[0])])`
(start with a modality of type 0) or a modality framed by `model.meta_id`,
`model.char_tokenizer('3,3')`, `get_modality_info(1).som_id` and `.eom_id`; `prompts.py`
reads such prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen = True)
class ModalityInfo:
    """What the public package's `get_modality_info(i)` tells of a modality type."""
    modality_type: int
    dim_latent: int
    default_shape: tuple[int, ...] | None
    num_dim: int | None
    channel_first_latent: bool
    add_pos_emb: bool
    encoder: nn.Module | None
    decoder: nn.Module | None
    som_id: int                 # its BOM token
    eom_id: int                 # its EOM token


class PublicNames:
    """Mixed into `Transfusion`: the ids of the structural tokens under the public package's names."""

    @property
    def sos_id(self) -> int:
        return self.vocab.sos

    @property
    def eos_id(self) -> int:
        return self.vocab.eos

    @property
    def meta_id(self) -> int:
        return self.vocab.meta

    @property
    def som_ids(self) -> list[int]:
        return [self.vocab.bom(m) for m in range(self.vocab.num_modality_types)]

    @property
    def eom_ids(self) -> list[int]:
        return [self.vocab.eom(m) for m in range(self.vocab.num_modality_types)]

    def char_tokenizer(self, text: str, device: torch.device | str | None = None) -> Tensor:
        """A shape written as text, `'3,3'`, -> its shape tokens. Only digits and ',' can be
        written (the public package has a token per ASCII character)."""
        return torch.tensor(self.vocab.encode_shape_text(text), dtype = torch.long, device = device)

    def get_modality_info(self, modality_type: int | None = None) -> ModalityInfo:
        m = 0 if modality_type is None else modality_type
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < self.num_modality_types:
            raise ValueError(f'modality_type must be an int in [0, {self.num_modality_types}), got {modality_type!r}')
        config = self.config
        encoder, decoder = self.modality_encoders[m], self.modality_decoders[m]
        return ModalityInfo(
            modality_type = m,
            dim_latent = config.dim_latent[m],
            default_shape = config.modality_default_shape[m],
            num_dim = config.modality_num_dim[m],
            channel_first_latent = config.channel_first_latent[m],
            add_pos_emb = config.add_pos_emb[m],
            encoder = None if isinstance(encoder, nn.Identity) else encoder,
            decoder = None if isinstance(decoder, nn.Identity) else decoder,
            som_id = self.vocab.bom(m),
            eom_id = self.vocab.eom(m),
        )
