"""Which shapes a modality type can be generated with: the type's number of axes
(`modality_num_dim`), and what its learned down / up blocks (`pre_post.py`) take there and
back. The sampler asks before it accepts a shape that the model wrote (falling back to the
default, or ending the row), and the generation calls before they start a shape asked for.
"""

from __future__ import annotations


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
