"""Which shapes a modality type can be generated with: the type's number of axes
(`modality_num_dim`), and what its learned down / up blocks (`pre_post.py`) take there and
back. The generation calls ask before they start a shape asked for; the sampler, through
`read_shape`, before it accepts a shape that the model wrote (falling back to the default, or
ending the row), and through `misfit` whether a modality still fits in the row's budget.
"""

from __future__ import annotations

import math
import warnings

from .ode_stage import noise_holds


TOO_LONG = "it does not fit in what is left of the row's max_length / max_total_length"


def axes_problem(model, m: int, shape: tuple[int, ...]) -> str | None:
    num_dim = model.config.modality_num_dim[m]
    if num_dim is not None and len(shape) != num_dim:
        return f'modality type {m} takes {num_dim} {"axis" if num_dim == 1 else "axes"} (modality_num_dim)'
    return None


def round_trip_problem(model, m: int, shape: tuple[int, ...]) -> str | None:
    """Why the type's learned down / up blocks cannot take a latent of `shape` there and back
    (worked out once per shape, without allocating it: `pre_post.py`); None when they can, or
    when the type has none."""
    return model.pre_post[m].round_trip_problem(shape) if model.uses_pre_post(m) else None


def shape_problem(model, m: int, shape: tuple[int, ...]) -> str | None:
    """Why a modality of type m cannot be generated with `shape`; None when it can."""
    return axes_problem(model, m, shape) or round_trip_problem(model, m, shape)


def types_for_fixed_shape(model, fixed: tuple[int, ...] | None) -> list[int]:
    """The modality types that `fixed_modality_shape` suits: the model may start only those. An
    error at the call when it suits none."""
    if fixed is None:
        return []
    fixed = tuple(fixed)
    problems = {m: shape_problem(model, m, fixed) for m in range(model.vocab.num_modality_types)}
    types = [m for m, problem in problems.items() if problem is None]
    if len(types) == 0:
        raise ValueError(f'fixed_modality_shape {fixed} suits no modality type: '
                         + '; '.join(f'for type {m}, {problem}' for m, problem in problems.items()))
    return types


def read_shape(model, noise, shape_tokens: list[int], start: int, limit: int, m: int) -> tuple[int, ...] | None:
    """The shape the model wrote (`shape_tokens`, after a META at `start`, before the BOM of
    type m) when it can be used; else the default with a warning, or None: the row ends there
    (when not even the default fits in the row's `limit`, or with a warning when the type has
    no usable default). Unusable is a shape that does not parse, has the wrong number of axes,
    that the type's down / up blocks cannot take there and back, or that does not fit. With
    `fallback_to_default_shape_if_invalid` off, a shape that is invalid (not only too long) is
    an error. `noise`: `init_modality_noise`, which must hold enough for the shape."""
    vocab = model.vocab
    fallback = model.config.fallback_to_default_shape_if_invalid
    written = vocab.decode_shape(shape_tokens)
    shown = written if written is not None else [vocab.name(t) for t in shape_tokens]
    fits = lambda shape, cheap = False: misfit(model, noise, limit, start, m, shape, cheap)

    invalid = 'it spells no shape' if written is None else axes_problem(model, m, written)
    unfit = None if invalid else fits(written, cheap = True)        # arithmetic, before any module runs
    if invalid is None and unfit is None:
        invalid = round_trip_problem(model, m, written)
    if invalid is None and unfit is None:
        unfit = fits(written)
    if invalid is None and unfit is None:
        return written
    if invalid is not None and not fallback:
        raise ValueError(f'the model wrote an invalid shape {shown} for modality type {m} ({invalid}), '
                         f'and fallback_to_default_shape_if_invalid is off')
    if not fallback:
        return None                 # a valid shape that does not fit ends the row, as the budget does

    why = f'the model wrote {"an invalid shape" if invalid else "a shape that does not fit"} {shown} for modality type {m} ({invalid or unfit})'
    default = model.config.modality_default_shape[m]
    problem = 'it has none' if default is None else shape_problem(model, m, default)
    if problem is not None:
        warnings.warn(f'{why}; the row ends there, as modality_default_shape cannot stand in ({problem})')
        return None
    unfit = fits(default)
    if unfit == TOO_LONG:
        return None                 # not even the default fits: the row ends at its budget
    if unfit is not None:
        warnings.warn(f'{why}; the row ends there, as modality_default_shape {default} cannot stand in ({unfit})')
        return None
    warnings.warn(f'{why}; using modality_default_shape {default}')
    return default


def misfit(model, noise, limit: int, start: int, m: int, shape: tuple[int, ...], cheap: bool = False) -> str | None:
    """Why a modality of type m and `shape` whose META would be at `start` does not fit in a
    row of at most `limit` tokens (its tokens up to EOM past the limit, or more noise than
    `noise`, the `init_modality_noise`, holds); None when it fits. `cheap`: only what
    arithmetic on the shape tells, before the type's down block is asked for its number of tokens."""
    header = start + 1 + len(model.vocab.encode_shape(shape)) + 1       # META, shape tokens, BOM
    if header + 2 > limit:                                              # at least one token and EOM
        return TOO_LONG
    if not (cheap and model.uses_pre_post(m)) and header + model.num_modality_tokens(m, shape) + 1 > limit:
        return TOO_LONG
    if noise is not None and not noise_holds(noise, math.prod(shape), model.config.dim_latent[m]):
        return f'init_modality_noise of shape {tuple(noise.shape)} holds too little noise for it'
    return None
