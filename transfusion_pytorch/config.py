"""Configuration as small keyword-only dataclasses, checked on construction."""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields

from . import flow


def closest_match(key: str, valid, cutoff: float = 0.6) -> str | None:
    """The valid key most like a mistyped one, for error messages; None when nothing is close."""
    matches = difflib.get_close_matches(key, list(valid), n = 1, cutoff = cutoff)
    return matches[0] if matches else None


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_number(value) -> bool:
    """A finite real number given as a Python int or float (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def closest_key_error(name: str, key: str, valid: list[str]) -> TypeError:
    close = closest_match(key, valid)
    hint = f"; did you mean '{close}'?" if close else ''
    return TypeError(f"{name}: unknown key '{key}'{hint} Valid keys: {', '.join(sorted(valid))}")


SINE_COSINE_PAIRS = dict(dim_head = 'rotary positions rotate pairs of dims', dim_time = 'the time features are sine and cosine pairs')


ROTARY_SCALING_KEYS = dict(
    linear = ('factor',),
    llama3 = ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'),
)


def check_rotary_scaling(scaling) -> dict:
    """A valid `rotary_scaling`, as a plain dict with float values (the context length an int)."""
    kind = scaling.get('type') if isinstance(scaling, dict) else None
    if kind not in ROTARY_SCALING_KEYS:
        raise ValueError(f"transformer.rotary_scaling must be None or a dict whose 'type' is one of "
                         f"{sorted(ROTARY_SCALING_KEYS)}, got {scaling!r}")
    expected = {'type', *ROTARY_SCALING_KEYS[kind]}
    if set(scaling) != expected:
        raise ValueError(f'transformer.rotary_scaling of type {kind!r} takes the keys {sorted(expected)}, got {sorted(scaling)}')
    values = {key: value for key, value in scaling.items() if key != 'type'}
    if not all(is_number(value) and value > 0 for value in values.values()):
        raise ValueError(f'transformer.rotary_scaling: every value must be a positive number, got {scaling!r}')
    if kind == 'llama3' and not scaling['high_freq_factor'] > scaling['low_freq_factor']:
        raise ValueError(f'transformer.rotary_scaling: high_freq_factor must exceed low_freq_factor, got {scaling!r}')
    return dict(type = kind, **{key: int(value) if key == 'original_max_position_embeddings' else float(value)
                                for key, value in values.items()})


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
    # the options below express pretrained language models exactly (see `language_models.py`);
    # each is generic and its default keeps the architecture above
    kv_heads: int | None = None         # key / value heads, grouped-query attention (Ainslie et al., 2023); None: `heads`
    dim_ff_hidden: int | None = None    # SwiGLU hidden width; None: int(dim * ff_expansion_factor * 2 / 3)
    rotary_scaling: dict | None = None  # rescaled rotary frequencies: {'type': 'linear', 'factor'} or {'type': 'llama3',
                                        # 'factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'}
    norm_eps: float | None = None       # epsilon of every RMSNorm; None: the machine epsilon of the input's float type
    attn_qkv_bias: bool = False         # biases on the query, key and value projections (Qwen2)
    attn_out_bias: bool = False         # a bias on the attention output projection
    tie_embeddings: bool = False        # the output head reuses the token embedding table (read by the model, which owns both)
    separate_modality_weights: bool = False     # latent tokens take their own copies of the attention projections,
                                        # feed-forward and norms, text tokens the originals, in one joint attention
                                        # (Liang et al., 2024, "Mixture-of-Transformers"; Shi et al., 2024, "LMFusion")
    freeze_text_weights: bool = False   # the text weights (text path of every block, final norm, embedding and output
                                        # rows of the text ids) get no gradient; new parts and structural tokens train

    def __post_init__(self):
        for name in ('dim', 'depth', 'dim_head', 'heads', 'dim_time', 'num_residual_streams', 'num_residual_fracs'):
            value = getattr(self, name)
            if not is_positive_int(value):
                raise ValueError(f'transformer.{name} must be a positive int, got {value!r}')
        for name in ('kv_heads', 'dim_ff_hidden'):
            value = getattr(self, name)
            if value is not None and not is_positive_int(value):
                raise ValueError(f'transformer.{name} must be a positive int or None, got {value!r}')
        if self.heads % self.num_kv_heads != 0:
            raise ValueError(f'transformer.kv_heads must divide heads = {self.heads}, got {self.kv_heads}')
        for name in ('dim_head', 'dim_time'):
            # rotary positions rotate pairs of a head's dims; the time features are (sin, cos) pairs
            if getattr(self, name) % 2 != 0:
                raise ValueError(f'transformer.{name} must be even ({SINE_COSINE_PAIRS[name]}), got {getattr(self, name)}')
        for name in ('unet_skips', 'unit_offset_norms', 'qk_rmsnorm', 'attn_gate_values', 'attn_laser', 'use_value_residual',
                     'attn_qkv_bias', 'attn_out_bias', 'tie_embeddings', 'separate_modality_weights', 'freeze_text_weights'):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f'transformer.{name} must be True or False, got {getattr(self, name)!r}')
        if self.use_flex_attn is not None and not isinstance(self.use_flex_attn, bool):
            raise ValueError(f'transformer.use_flex_attn must be True, False or None (on CUDA only), got {self.use_flex_attn!r}')
        for name in ('ff_expansion_factor', 'rotary_theta'):
            if not (is_number(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f'transformer.{name} must be a positive number, got {getattr(self, name)!r}')
        if self.dim_hidden < 1:
            raise ValueError(f'transformer.ff_expansion_factor {self.ff_expansion_factor} leaves the feed-forward of dim {self.dim} without a hidden unit')
        if self.norm_eps is not None and not (is_number(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f'transformer.norm_eps must be a positive float or None, got {self.norm_eps!r}')
        if self.rotary_scaling is not None:
            object.__setattr__(self, 'rotary_scaling', check_rotary_scaling(self.rotary_scaling))
        for name in ('dropout', 'attn_dropout'):
            if not (is_number(getattr(self, name)) and 0. <= getattr(self, name) < 1.):
                raise ValueError(f'transformer.{name} must lie in [0, 1), got {getattr(self, name)!r}')
        if self.attn_softcap is not None and not (is_number(self.attn_softcap) and self.attn_softcap > 0):
            raise ValueError(f'transformer.attn_softcap must be positive or None, got {self.attn_softcap!r}')
        if self.dim % self.num_residual_fracs != 0:
            raise ValueError(f'transformer.num_residual_fracs must divide dim = {self.dim}, got {self.num_residual_fracs}')

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def dim_hidden(self) -> int:
        """The SwiGLU hidden width."""
        return int(self.dim * self.ff_expansion_factor * 2 / 3) if self.dim_ff_hidden is None else self.dim_ff_hidden

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


def per_type(value, num_types: int, name: str, is_single, expected: str = 'one value') -> tuple:
    """An option given once for all modality types, or as a tuple of one value per type.
    `expected` says what one value is, for the error message."""
    if is_single(value):
        return (value,) * num_types
    if not isinstance(value, (tuple, list)) or len(value) != num_types:
        raise ValueError(f'{name} must be {expected} or a tuple of {num_types} of them (one per modality type), got {value!r}'[:400])
    for m, single in enumerate(value):
        if not is_single(single):
            raise ValueError(f'{name} of modality type {m} must be {expected}, got {single!r}'[:400])
    return tuple(value)


def is_shape(value) -> bool:
    """A shape: a tuple or a list of ints, e.g. (8, 8), [4] or () (zero axes)."""
    return isinstance(value, (tuple, list)) and all(isinstance(size, int) and not isinstance(size, bool) for size in value)


def checked_weight(name: str, value, per_modality_type: bool = False) -> float:
    """A loss weight: a finite number >= 0, as a float."""
    if not (is_number(value) and value >= 0):
        which = ' (one, or one per modality type)' if per_modality_type else ''
        raise ValueError(f'{name} must be a finite number >= 0{which}, got {value!r}')
    return float(value)


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
    min_time_before_text: float = 0.5                       # a modality that text follows draws its time from [this, 1]
                                                            # (Transfusion limits the noise of an image before its caption)
    time_distribution: str = 'logit_normal'                 # training times drawn when none are given: 'logit_normal' or 'uniform'
    time_logit_mean: float = 0.                             # logit-normal: t = sigmoid(mean + std * n), n ~ N(0, 1)
    time_logit_std: float = 1.

    def __post_init__(self):
        for name in ('text_loss_weight', 'reconstruction_loss_weight', 'velocity_consistency_loss_weight'):
            checked_weight(name, getattr(self, name))
        for weight in self.flow_loss_weight:
            checked_weight('flow_loss_weight', weight, per_modality_type = True)
        if not (is_number(self.prob_uncond) and 0. <= self.prob_uncond <= 1.):
            raise ValueError(f'prob_uncond must lie in [0, 1], got {self.prob_uncond!r}')
        if not (is_number(self.min_time_before_text) and 0. <= self.min_time_before_text < 1.):
            raise ValueError(f'min_time_before_text must lie in [0, 1) (0: no limit), got {self.min_time_before_text!r}')
        if self.time_distribution not in flow.TIME_DISTRIBUTIONS:
            raise ValueError(f'time_distribution must be one of {flow.TIME_DISTRIBUTIONS}, got {self.time_distribution!r}')
        if not is_number(self.time_logit_mean):
            raise ValueError(f'time_logit_mean must be a finite number, got {self.time_logit_mean!r}')
        if not (is_number(self.time_logit_std) and self.time_logit_std > 0):
            raise ValueError(f'time_logit_std must be a finite number > 0, got {self.time_logit_std!r}')
        for name in ('model_output_clean', 'fallback_to_default_shape_if_invalid'):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f'{name} must be True or False, got {getattr(self, name)!r}')
        if not is_positive_int(self.num_text_tokens):
            raise ValueError(f'num_text_tokens must be a positive int, got {self.num_text_tokens!r}')
        for dim in self.dim_latent:
            if not is_positive_int(dim):
                raise ValueError(f'dim_latent must be a positive int or a tuple of them, got {self.dim_latent!r}')
        for m, num_dim in enumerate(self.modality_num_dim):
            if num_dim is not None and not (isinstance(num_dim, int) and not isinstance(num_dim, bool) and num_dim >= 0):
                raise ValueError(f'modality_num_dim of type {m} must be an int >= 0 (the number of axes) or None (any), got {num_dim!r}')
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
        prob_uncond = 0.1, min_time_before_text = 0.5, time_distribution = 'logit_normal', time_logit_mean = 0., time_logit_std = 1.,
    ) -> TransfusionConfig:
        if not isinstance(transformer, (TransformerConfig, dict)):
            raise TypeError(f"transformer must be a dict of the transformer's options, e.g. dict(dim = 512, depth = 8), got {transformer!r}"[:300])
        transformer = transformer if isinstance(transformer, TransformerConfig) else TransformerConfig.from_dict(dict(transformer))
        dim_latent = transformer.dim if dim_latent is None else dim_latent
        dim_latent = tuple(dim_latent) if isinstance(dim_latent, (tuple, list)) else (dim_latent,)
        num_types = len(dim_latent)

        # a shape may be given as a list ([4] is the shape (4,)), as torch accepts sizes
        shapes = per_type(modality_default_shape, num_types, 'modality_default_shape', lambda v: v is None or is_shape(v),
                          expected = 'a shape (a tuple of ints, e.g. (8, 8)) or None')
        shapes = tuple(None if shape is None else tuple(shape) for shape in shapes)
        num_dims = per_type(modality_num_dim, num_types, 'modality_num_dim', lambda v: v is None or isinstance(v, int),
                            expected = 'an int or None')
        num_dims = tuple(len(shape) if num_dim is None and shape is not None else num_dim for shape, num_dim in zip(shapes, num_dims))

        return cls(
            num_text_tokens = num_text_tokens,
            transformer = transformer,
            dim_latent = tuple(dim_latent),
            channel_first_latent = per_type(channel_first_latent, num_types, 'channel_first_latent', lambda v: isinstance(v, bool), expected = 'True or False'),
            add_pos_emb = tuple(
                (num_dim is not None and num_dim > 0) if add is None else add
                for add, num_dim in zip(per_type(add_pos_emb, num_types, 'add_pos_emb', lambda v: v is None or isinstance(v, bool), expected = 'True, False or None'), num_dims)
            ),
            modality_default_shape = shapes,
            modality_num_dim = num_dims,
            fallback_to_default_shape_if_invalid = fallback_to_default_shape_if_invalid,
            text_loss_weight = checked_weight('text_loss_weight', text_loss_weight),
            flow_loss_weight = tuple(
                checked_weight('flow_loss_weight', weight, per_modality_type = True)
                for weight in per_type(flow_loss_weight, num_types, 'flow_loss_weight', is_number, expected = 'a finite number >= 0')
            ),
            model_output_clean = model_output_clean,
            reconstruction_loss_weight = checked_weight('reconstruction_loss_weight', reconstruction_loss_weight),
            velocity_consistency_loss_weight = checked_weight('velocity_consistency_loss_weight', velocity_consistency_loss_weight),
            prob_uncond = float(prob_uncond) if is_number(prob_uncond) else prob_uncond,
            min_time_before_text = float(min_time_before_text) if is_number(min_time_before_text) else min_time_before_text,
            time_distribution = time_distribution,
            time_logit_mean = float(time_logit_mean) if is_number(time_logit_mean) else time_logit_mean,
            time_logit_std = float(time_logit_std) if is_number(time_logit_std) else time_logit_std,
        )

    def to_dict(self) -> dict:
        return asdict(self)
