"""Configuration as small keyword-only dataclasses, checked on construction."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields


def closest_match(key: str, valid, cutoff: float = 0.6) -> str | None:
    """The valid key most like a mistyped one, for error messages; None when nothing is close."""
    matches = difflib.get_close_matches(key, list(valid), n = 1, cutoff = cutoff)
    return matches[0] if matches else None


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def closest_key_error(name: str, key: str, valid: list[str]) -> TypeError:
    close = closest_match(key, valid)
    hint = f"; did you mean '{close}'?" if close else ''
    return TypeError(f"{name}: unknown key '{key}'{hint} Valid keys: {', '.join(sorted(valid))}")


@dataclass(frozen = True, kw_only = True)
class TransformerConfig:
    dim: int                            # width of the residual stream
    depth: int                          # number of blocks
    dim_head: int = 64                  # width of one attention head
    heads: int = 8                      # number of attention heads
    ff_expansion_factor: float = 4.     # feed-forward hidden width over dim (SwiGLU keeps 2/3 of it)
    dropout: float = 0.                 # dropout on the residual branches
    attn_dropout: float = 0.            # dropout on the attention weights
    unet_skips: bool = True             # U-ViT long skips, first half of the blocks to the second (Bao et al., 2022)
    use_flex_attn: bool | None = None   # flex attention with block masks; None: on CUDA only
    rotary_theta: float = 10000.        # base of the rotary position frequencies
    dim_time: int = 256                 # width of the sinusoidal time features
    unit_offset_norms: bool = True      # norm gains stored as g and used as g + 1 (Rubin, 2024)
    qk_rmsnorm: bool = True             # RMSNorm on queries and keys per head (Dehghani et al., 2023)
    attn_gate_values: bool = True       # a per-token, per-head sigmoid gate on the attention output (Qiu et al., 2025)
    attn_softcap: float | None = None   # bound attention logits by softcap * tanh(logit / softcap); None: off
    attn_laser: bool = False            # LASER: attention over exp(values), log of the result (Duvvuri & Dhillon, 2024)
    use_value_residual: bool = False    # mix each layer's values with the first layer's (Zhou et al., 2024)
    num_residual_streams: int = 1       # hyper-connections: number of residual streams (Zhu et al., 2024)
    num_residual_fracs: int = 1         # frac-connections: fractions of the residual width (Zhu et al., 2025)

    def __post_init__(self):
        for name in ('dim', 'depth', 'dim_head', 'heads', 'dim_time', 'num_residual_streams', 'num_residual_fracs'):
            value = getattr(self, name)
            if not is_positive_int(value):
                raise ValueError(f'transformer.{name} must be a positive int, got {value!r}')
        if self.dim_head % 2 != 0:
            raise ValueError(f'transformer.dim_head must be even for rotary positions, got {self.dim_head}')
        if self.ff_expansion_factor <= 0:
            raise ValueError(f'transformer.ff_expansion_factor must be positive, got {self.ff_expansion_factor}')
        for name in ('dropout', 'attn_dropout'):
            if not 0. <= getattr(self, name) < 1.:
                raise ValueError(f'transformer.{name} must lie in [0, 1), got {getattr(self, name)}')
        if self.attn_softcap is not None and not self.attn_softcap > 0:
            raise ValueError(f'transformer.attn_softcap must be positive or None, got {self.attn_softcap}')
        if self.dim % self.num_residual_fracs != 0:
            raise ValueError(f'transformer.num_residual_fracs must divide dim = {self.dim}, got {self.num_residual_fracs}')

    @classmethod
    def from_dict(cls, values: dict) -> TransformerConfig:
        valid = [field.name for field in fields(cls)]
        for key in values:
            if key not in valid:
                raise closest_key_error('transformer', key, valid)
        for key in ('dim', 'depth'):
            if key not in values:
                raise TypeError(f"transformer: the key '{key}' is required, got only {sorted(values)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def per_type(value, num_types: int, name: str, is_single) -> tuple:
    """An option given once for all modality types, or as a tuple of one value per type."""
    if is_single(value):
        return (value,) * num_types
    if not isinstance(value, (tuple, list)) or len(value) != num_types:
        raise ValueError(f'{name} must be one value or a tuple of {num_types} (one per modality type), got {value!r}')
    return tuple(value)


def is_shape(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(size, int) and not isinstance(size, bool) for size in value)


@dataclass(frozen = True, kw_only = True)
class TransfusionConfig:
    """The numbers and switches of a `Transfusion` model (modules such as encoders are kept apart)."""
    num_text_tokens: int
    transformer: TransformerConfig
    dim_latent: tuple[int, ...]                             # latent width of each modality type
    channel_first_latent: tuple[bool, ...]                  # latents given as (dim, *shape) instead of (*shape, dim)
    add_pos_emb: tuple[bool, ...]                           # learned axial positions over each modality's grid
                                                            # (default: on wherever the number of axes is known,
                                                            # since latent tokens share one rotary position)
    modality_default_shape: tuple[tuple[int, ...] | None, ...]  # shape to sample when the model writes an invalid one
    modality_num_dim: tuple[int | None, ...]                # number of axes of each type, None: any
    fallback_to_default_shape_if_invalid: bool = True       # sampling: an invalid shape written by the model is replaced
                                                            # by the default (with a warning); off, it is an error
    text_loss_weight: float = 1.
    flow_loss_weight: tuple[float, ...] = ()
    model_output_clean: bool = False                        # predict the clean latent, converted to a velocity (Li & He, 2025)
    reconstruction_loss_weight: float = 0.                  # weight of the decoded-prediction reconstruction loss
    velocity_consistency_loss_weight: float = 0.1           # weight of the velocity consistency loss, when an EMA model is given
    prob_uncond: float = 0.1                                # rate at which training drops a sample's text, for classifier-free guidance

    def __post_init__(self):
        for name in ('text_loss_weight', 'reconstruction_loss_weight', 'velocity_consistency_loss_weight'):
            if getattr(self, name) < 0:
                raise ValueError(f'{name} must not be negative, got {getattr(self, name)}')
        if not 0. <= self.prob_uncond <= 1.:
            raise ValueError(f'prob_uncond must lie in [0, 1], got {self.prob_uncond}')
        if not isinstance(self.num_text_tokens, int) or self.num_text_tokens <= 0:
            raise ValueError(f'num_text_tokens must be a positive int, got {self.num_text_tokens!r}')
        for dim in self.dim_latent:
            if not isinstance(dim, int) or dim <= 0:
                raise ValueError(f'dim_latent must be a positive int or a tuple of them, got {self.dim_latent!r}')
        for m, (shape, num_dim) in enumerate(zip(self.modality_default_shape, self.modality_num_dim)):
            if shape is not None and any(size <= 0 for size in shape):
                raise ValueError(f'modality_default_shape of type {m} must have positive sizes, got {shape}')
            if shape is not None and num_dim is not None and len(shape) != num_dim:
                raise ValueError(f'modality_default_shape {shape} of type {m} has {len(shape)} axes but modality_num_dim is {num_dim}')
            if self.add_pos_emb[m] and num_dim is None:
                raise ValueError(f'add_pos_emb for modality type {m} needs modality_num_dim (or modality_default_shape) to know its number of axes')

    @property
    def num_modality_types(self) -> int:
        return len(self.dim_latent)

    @classmethod
    def from_kwargs(
        cls, *, num_text_tokens, transformer, dim_latent = None, channel_first_latent = False, add_pos_emb = None,
        modality_default_shape = None, modality_num_dim = None, fallback_to_default_shape_if_invalid = True,
        text_loss_weight = 1., flow_loss_weight = 1.,
        model_output_clean = False, reconstruction_loss_weight = 0., velocity_consistency_loss_weight = 0.1,
        prob_uncond = 0.1,
    ) -> TransfusionConfig:
        transformer = transformer if isinstance(transformer, TransformerConfig) else TransformerConfig.from_dict(dict(transformer))
        dim_latent = transformer.dim if dim_latent is None else dim_latent
        dim_latent = tuple(dim_latent) if isinstance(dim_latent, (tuple, list)) else (dim_latent,)
        num_types = len(dim_latent)

        shapes = per_type(modality_default_shape, num_types, 'modality_default_shape', lambda v: v is None or is_shape(v))
        num_dims = per_type(modality_num_dim, num_types, 'modality_num_dim', lambda v: v is None or isinstance(v, int))
        num_dims = tuple(len(shape) if num_dim is None and shape is not None else num_dim for shape, num_dim in zip(shapes, num_dims))

        return cls(
            num_text_tokens = num_text_tokens,
            transformer = transformer,
            dim_latent = tuple(dim_latent),
            channel_first_latent = per_type(channel_first_latent, num_types, 'channel_first_latent', lambda v: isinstance(v, bool)),
            add_pos_emb = tuple(
                (num_dim is not None and num_dim > 0) if add is None else add
                for add, num_dim in zip(per_type(add_pos_emb, num_types, 'add_pos_emb', lambda v: v is None or isinstance(v, bool)), num_dims)
            ),
            modality_default_shape = shapes,
            modality_num_dim = num_dims,
            fallback_to_default_shape_if_invalid = bool(fallback_to_default_shape_if_invalid),
            text_loss_weight = float(text_loss_weight),
            flow_loss_weight = tuple(float(w) for w in per_type(flow_loss_weight, num_types, 'flow_loss_weight', lambda v: isinstance(v, (int, float)))),
            model_output_clean = bool(model_output_clean),
            reconstruction_loss_weight = float(reconstruction_loss_weight),
            velocity_consistency_loss_weight = float(velocity_consistency_loss_weight),
            prob_uncond = float(prob_uncond),
        )

    def to_dict(self) -> dict:
        return asdict(self)
