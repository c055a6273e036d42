"""The generation calls of `Transfusion` (its methods delegate here): `sample`, `sample_one`,
`sample_many`, `generate_text_only` and `generate_modality_only`. Each checks its arguments,
turns prompts into items (`prompts.py`), sets up a backend (`backends.py`: KV-cached or the
slow reference, guided or not; `static_decode.py`: KV-cached with static steps replayed from
CUDA graphs, the default on CUDA) and runs: the sampler's state machine (`sampler.py`) for
`sample`, a plain decoding loop for text alone, one ODE integration for modalities alone.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import fields

import torch
from torch import Tensor

from . import solvers
from .backends import CachedBackend, ReferenceBackend, Request
from .config import closest_key_error, is_positive_int
from .guidance import GuidedBackend
from .inputs import describe, is_text_dtype
from .prompts import Prompt, decoded, is_batch, normalize, to_output
from .sampler import (SampleOptions, Sampler, check_method, check_modality, check_solver_numbers, check_text_sampling, latents_item,
                      requested_length, row_limit, start_items)
from .shapes import shape_problem
from .sampling import sample_token
from .static_decode import StaticBackend


def check_options(name: str, given: dict, *accepting):
    """A keyword that none of `accepting` (functions, dataclasses) takes is an error naming it,
    the closest valid one and all of them, rather than Python's bare TypeError."""
    valid = set()
    for target in accepting:
        if inspect.isclass(target):
            valid.update(f.name for f in fields(target))
        else:
            valid.update(name for name, parameter in inspect.signature(target).parameters.items()
                         if parameter.kind == parameter.KEYWORD_ONLY or parameter.kind == parameter.POSITIONAL_OR_KEYWORD)
    valid -= {'model', 'prompt', 'prompts', 'names'}
    for key in given:
        if key not in valid:
            raise closest_key_error(name, key, sorted(valid))


def check_switch(name: str, value, none_too: bool = False):
    """A switch is True or False (or None where that means the default): 'no' is not False."""
    if not isinstance(value, bool) and not (none_too and value is None):
        raise ValueError(f'{name} must be True{", False or None" if none_too else " or False"}, got {value!r}')


def use_kv_cache(use_cache: bool | None, cache_kv: bool | None) -> bool:
    """The KV-cache switch, by either of its names (`cache_kv` is the public package's); on by default."""
    check_switch('use_cache', use_cache, none_too = True)
    check_switch('cache_kv', cache_kv, none_too = True)
    if use_cache is not None and cache_kv is not None and use_cache != cache_kv:
        raise ValueError(f'use_cache and cache_kv are two names of one switch, got use_cache = {use_cache} and cache_kv = {cache_kv}')
    return next((value for value in (use_cache, cache_kv) if value is not None), True)


def use_static_decode(model, static_decode: bool | None, use_cache: bool) -> bool:
    """Whether decoding runs static steps (`static_decode.py`): by default on CUDA, where they are
    replayed from CUDA graphs, and not elsewhere, where the dynamic path is faster (True runs the
    same static steps eagerly). They need the KV cache."""
    check_switch('static_decode', static_decode, none_too = True)
    if static_decode and not use_cache:
        raise ValueError('static_decode = True needs the KV cache: it cannot be combined with use_cache = False (or cache_kv = False)')
    return use_cache and (model.device.type == 'cuda' if static_decode is None else static_decode)


def cached_backend(model, batch_size: int, max_len: int, static: bool) -> CachedBackend:
    return StaticBackend(model, batch_size, max_len) if static else CachedBackend(model, batch_size, max_len)


def row_generators(batch_size: int, generator, seed: int | None) -> list[torch.Generator | None]:
    """One generator per row, so that a row samples the same alone or in a batch: the one given
    for all rows, one given per row, or row i seeded with `seed + i`."""
    if generator is not None and seed is not None:
        raise ValueError(f'pass generator or seed, not both: got generator = {describe(generator)} and seed = {seed!r}')
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f'seed must be None or an int, got {describe(seed)}')
    is_generator = lambda g: isinstance(g, torch.Generator)
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(f'expected one generator per prompt ({batch_size}), got {len(generator)}')
        if not all(g is None or is_generator(g) for g in generator):
            raise ValueError(f'generator: each must be a torch.Generator or None, got {[type(g).__name__ for g in generator]}')
        return list(generator)
    if generator is not None and not is_generator(generator):
        raise ValueError(f'generator must be None, a torch.Generator or a list of them (one per prompt), got {describe(generator)}')
    if generator is not None:
        return [generator] * batch_size
    if seed is not None:
        return [torch.Generator().manual_seed(seed + row) for row in range(batch_size)]
    return [None] * batch_size


def make_backend(model, prompts: list[Prompt | list], options: SampleOptions, use_cache: bool = True, static: bool = False):
    """The backend of `sample`: KV-cached (bounded by the longest row: its prompt and the budget;
    with static steps or not) or not, with a second, unconditional set of rows when guidance is on (`cfg_scale != 1`;
    at 1 the guided velocity is the conditional one, so the unconditional branch is not run)."""
    prompts = [p if isinstance(p, Prompt) else Prompt(list(p)) for p in prompts]
    capacity = max(row_limit(requested_length(model, *start_items(model, p, options)), options) for p in prompts)

    def one():
        return cached_backend(model, len(prompts), capacity, static) if use_cache else ReferenceBackend(model, len(prompts))
    guidance = options.guidance(model)
    if guidance.off:
        return one()
    return GuidedBackend(one(), one(), guidance, model.vocab)


def sample(model, prompt = None, *, batch_size: int | None = None, **kwargs) -> list:
    """One prompt (or `batch_size` copies of it), or a list of prompts (each a list)."""
    if batch_size is not None and not is_positive_int(batch_size):
        raise ValueError(f'batch_size must be None or a positive int, got {batch_size!r}')
    batched = is_batch(prompt) or batch_size is not None
    prompts = prompt if is_batch(prompt) else [prompt] * (batch_size or 1)
    names = [f'prompt[{i}]' for i in range(len(prompts))] if is_batch(prompt) else ['prompt'] * len(prompts)
    samples = sample_prompts(model, prompts, names, **kwargs)
    return samples if batched else samples[0]


def sample_many(model, prompts = None, **kwargs) -> list:
    """The public package's batched call: each element of the list `prompts` is one prompt, in
    any of its forms (None too); anything else is one prompt."""
    prompts = prompts if isinstance(prompts, list) else [prompts]
    return sample_prompts(model, prompts, [f'prompts[{i}]' for i in range(len(prompts))], **kwargs)


def sample_prompts(model, prompts: list, names: list[str], *, return_latents: bool = False, generator = None,
                   seed: int | None = None, use_cache: bool | None = None, cache_kv: bool | None = None,
                   static_decode: bool | None = None, **options) -> list:
    """Samples one row per prompt; `names` are how errors call the prompts. `static_decode`:
    `use_static_decode`."""
    options = SampleOptions(**options)
    check_switch('return_latents', return_latents)
    forced = options.force_modality_at_start
    if forced is not None:
        m, shape = forced if isinstance(forced, tuple) and len(forced) == 2 else (forced, None)
        check_modality(model, m, shape, 'force_modality_at_start', 'force_modality_at_start: the shape')
    use_cache = use_kv_cache(use_cache, cache_kv)
    static = use_static_decode(model, static_decode, use_cache)
    if len(prompts) == 0:
        return []
    prompts = [normalize(model, p, name) for p, name in zip(prompts, names)]

    generators = row_generators(len(prompts), generator, seed)
    backend = make_backend(model, prompts, options, use_cache, static)

    with torch.no_grad(), eval_mode(model):
        sequences = Sampler(model, options, backend).run(prompts, generators)
        return [to_output(model, items, return_latents) for items in sequences]


def generate_text_only(model, prompt: Tensor, seq_len: int, *, temperature: float = 1., min_p: float | None = 0.1,
                       top_k: int | None = None, generator = None, seed: int | None = None,
                       use_cache: bool | None = None, cache_kv: bool | None = None, static_decode: bool | None = None) -> Tensor:
    """Continues raw text rows (no SOS, as `model(Int[b n])` trains them) up to `seq_len`
    tokens in all; returns the (b, seq_len - n) new tokens. `static_decode`: `use_static_decode`."""
    if not torch.is_tensor(prompt) or prompt.ndim != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f'`prompt` must be an Int[b n] tensor of at least one row of at least one token, got {describe(prompt)}')
    if not is_text_dtype(prompt.dtype):
        raise TypeError(f'`prompt` must be an integer tensor (torch.long), got {describe(prompt)}')
    vocab_size = model.vocab.size
    if bool(((prompt < 0) | (prompt >= vocab_size)).any()):
        # text ids, or ids of the model's vocabulary such as SOS, when training framed rows with it
        raise ValueError(f'`prompt`: ids must lie in [0, vocab size) = [0, {vocab_size}) (text ids below num_text_tokens = '
                         f'{model.config.num_text_tokens}, then the ids of model.vocab such as SOS), got {describe(prompt)} '
                         f'with values in [{int(prompt.min())}, {int(prompt.max())}]')
    prompt = prompt.long()
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise TypeError(f'`seq_len` must be an int, got {describe(seq_len)}')
    if seq_len < 0:
        raise ValueError(f'`seq_len` must be >= 0 (the length of the rows, prompt included), got {seq_len}')
    check_text_sampling(temperature, top_k, min_p)
    batch, prompt_len = prompt.shape
    steps = max(0, seq_len - prompt_len)
    generators = row_generators(batch, generator, seed)
    use_cache = use_kv_cache(use_cache, cache_kv)
    static = use_static_decode(model, static_decode, use_cache)
    backend = cached_backend(model, batch, max(seq_len, prompt_len), static) if use_cache else ReferenceBackend(model, batch, wrapped = False)

    allowed = torch.zeros(model.vocab.size, dtype = torch.bool, device = model.device)
    allowed[:model.vocab.num_text_tokens] = True

    # on the model's device, moved to the prompt's once at the end: a prompt on the host must
    # not cost a copy from the device (a wait on it) at every step
    out = torch.zeros(batch, steps, dtype = torch.long, device = model.device)
    tokens = prompt

    with torch.no_grad(), eval_mode(model):
        for step in range(steps):
            tokens = sample_token(backend.decode(tokens), allowed, temperature, top_k, min_p, generators)
            out[:, step] = tokens
            tokens = tokens[:, None]
    return out.to(prompt.device)


def generate_modality_only(model, *, batch_size: int = 1, modality_type: int = 0,
                           fixed_modality_shape: tuple[int, ...] | None = None, modality_steps: int = SampleOptions.modality_steps,
                           ode_method: str = SampleOptions.ode_method, ode_atol: float = 1e-5, ode_rtol: float = 1e-5,
                           time_shift: float = 1., return_latents: bool = False, generator = None, seed: int | None = None,
                           use_cache: bool | None = None, cache_kv: bool | None = None, static_decode: bool | None = None) -> Tensor:
    """A batch of modalities of one type and shape, each after SOS and its header alone:
    (batch, *shape, dim_latent), or channel first, decoded unless `return_latents`. Each row is
    what `sample(force_modality_at_start = (modality_type, shape), max_length = 0)` draws with
    its generator: fixed-grid methods step all rows together, an adaptive one (which picks its
    own times from the error of what it integrates) integrates each row alone. `static_decode`:
    `use_static_decode`."""
    if not is_positive_int(batch_size):
        raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
    check_modality(model, modality_type, fixed_modality_shape, 'modality_type', 'fixed_modality_shape')
    check_method(ode_method, modality_steps)
    check_solver_numbers(time_shift, ode_atol, ode_rtol)
    check_switch('return_latents', return_latents)
    m, vocab = modality_type, model.vocab
    shape = tuple(fixed_modality_shape) if fixed_modality_shape is not None else model.config.modality_default_shape[m]
    if shape is None:
        raise ValueError(f'modality type {m} has no modality_default_shape: pass fixed_modality_shape')
    problem = shape_problem(model, m, shape)
    if problem is not None:
        name = 'fixed_modality_shape' if fixed_modality_shape is not None else 'modality_default_shape'
        raise ValueError(f'{name}: a modality of type {m} cannot be generated with the shape {shape}: {problem}')

    header = [vocab.sos, vocab.meta, *vocab.encode_shape(shape), vocab.bom(m)]
    length = len(header) + model.num_modality_tokens(m, shape)
    use_cache = use_kv_cache(use_cache, cache_kv)
    static = use_static_decode(model, static_decode, use_cache)
    backend = cached_backend(model, batch_size, length, static) if use_cache else ReferenceBackend(model, batch_size)

    generators = row_generators(batch_size, generator, seed)
    noise = torch.stack([torch.randn(math.prod(shape), model.config.dim_latent[m], generator = g) for g in generators]).to(model.device)

    def velocity_of(rows: list[int]):
        def velocity_fn(x: Tensor, t: Tensor) -> Tensor:      # x: (len(rows), n, dim_latent)
            requests: list[Request | None] = [None] * batch_size
            for row, values in zip(rows, x):
                requests[row] = Request([latents_item(model, m, values, shape)], time = float(t), keep = False)
            outputs = backend.step(requests)
            return torch.stack([outputs[row] for row in rows])
        return velocity_fn

    with torch.no_grad(), eval_mode(model):
        backend.step([Request(list(header)) for _ in range(batch_size)])
        grid = solvers.time_grid(modality_steps, time_shift, device = model.device)
        groups = [[row] for row in range(batch_size)] if ode_method in solvers.ADAPTIVE_METHODS else [list(range(batch_size))]
        latents = torch.cat([solvers.integrate(velocity_of(rows), noise[rows], grid, method = ode_method, atol = ode_atol, rtol = ode_rtol)
                             for rows in groups])

        return torch.stack([decoded(model, m, latent.reshape(*shape, -1), return_latents) for latent in latents])


class eval_mode:
    """Puts a model in eval mode for a block and restores its training flag after."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
