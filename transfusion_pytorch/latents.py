"""Between the modalities a user gives or gets and the latents one model packs:

    the contract's input forms  --inputs.py + the type's encoder-->  samples, token grids attached
    samples  --guidance.py (condition dropout) + packing.py-->  PackedBatch on the model's device
    a sampled latent  --the type's decoder-->  the user's layout (`decoded`)

Functions of the model: it keeps `to_samples`, `pack` and `decode_latent` as thin methods.
The encoders and decoders are fixed codecs (see `Transfusion.__init__`): encoding runs
without gradient, and decoding in the objective's reconstruction loss passes the gradient
through to the transformer.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import Tensor, nn

from .guidance import drop_text_conditions, without_eos_after_modality
from .inputs import Modality, Sample, modality_batch, normalize_samples, text_batch
from .packing import PackedBatch, pack


def encode_modality(model, modality_type: int, raw: Tensor) -> Tensor:
    """Runs the modality's encoder (if any) on one raw modality, without gradient."""
    encoder = model.modality_encoders[modality_type]
    if isinstance(encoder, nn.Identity):
        return raw
    with torch.no_grad():
        return encoder(raw[None])[0]


def decoded(model, m: int, latent: Tensor, return_latents: bool = False) -> Tensor:
    """A (*shape, dim_latent) channel-last latent in the user's layout, through the type's decoder
    unless `return_latents`."""
    if model.config.channel_first_latent[m]:
        latent = latent.movedim(-1, 0)
    if not return_latents and not isinstance(model.modality_decoders[m], nn.Identity):
        latent = model.modality_decoders[m](latent[None])[0]
    return latent


def with_token_shape(model, segment):
    """A modality segment with the grid of tokens that its type's down block makes of it."""
    if not isinstance(segment, Modality) or not model.uses_pre_post(segment.modality_type):
        return segment
    return replace(segment, token_shape = model.token_shape(segment.modality_type, segment.shape))


def to_samples(model, modalities, modality_type: int | None = None) -> tuple[list[Sample], bool]:
    """The contract's input forms -> (samples, whether they are framed by SOS / EOS)."""
    encode = partial(encode_modality, model)
    if torch.is_tensor(modalities) and not modalities.is_floating_point():
        return text_batch(modalities, model.config.num_text_tokens), False
    if torch.is_tensor(modalities):
        samples = modality_batch(modalities, modality_type, model.specs, encode)
    else:
        samples = normalize_samples(modalities, model.config.num_text_tokens, model.specs, encode)
    return [[with_token_shape(model, segment) for segment in sample] for sample in samples], True


def pack_batch(model, modalities, modality_type: int | None = None, prob_uncond: float = 0.) -> PackedBatch:
    """With `prob_uncond > 0`, samples are replaced by their unconditional versions at that rate
    (condition dropout for classifier-free guidance, see `guidance.py`)."""
    samples, wrap = to_samples(model, modalities, modality_type)
    dtype = latent_dtype(model)
    if not (prob_uncond > 0 and wrap):
        return pack(samples, model.vocab, wrap = wrap, latent_dtype = dtype).to(model.device)
    samples, dropped = drop_text_conditions(samples, prob_uncond)
    packed = pack(samples, model.vocab, latent_dtype = dtype)
    return without_eos_after_modality(packed, samples, dropped).to(model.device)


def latent_dtype(model) -> torch.dtype:
    """The dtype every latent is packed in, whatever it was given in: float32, or float64 in a
    float64 model. One rule per model, so a sample's loss never depends on the dtypes of the
    others in its batch; float32 in a bf16 / fp16 model too, because the noise, the path, the
    target and the flow loss are computed in float32 there anyway (`losses.at_least_float32`)."""
    return torch.float64 if model.token_embed.weight.dtype == torch.float64 else torch.float32
