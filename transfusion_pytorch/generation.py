"""Generation: a small state machine per row, run in lockstep over a batch.

    text  --META-->  shape  --BOM_m-->  modality (ODE steps against the prefix)
      ^                                      |
      +------- commit clean latents + EOM ---+
    text  --EOS or max_length-->  done

- text: the next token is sampled among text, META and EOS;
- shape: among the shape digits, ',' and the BOM tokens (only BOM with a fixed shape, whose
  tokens are then written for the model). At BOM the written shape is read; an invalid one
  (unreadable, wrong number of axes, or too long to fit) is replaced by the default shape,
  with a warning, and the shape tokens are rewritten so the sequence stays the one that
  `pack` would lay out for the returned sample;
- modality: noise at t = 0 is integrated to t = 1 by a fixed-grid solver, each stage one
  model call on the modality's tokens alone; then the clean latents (at t = 1, as training
  sees a finished sequence) and the EOM token are committed in one step. An adaptive solver
  (dopri5, ...) chooses its own evaluation times, so it integrates a row's modality in one go
  while the other rows wait (see `Sampler.integrate_alone`).

Every row advances through its own phase; each step is one model call for the whole batch
(two during ODE stages with classifier-free guidance: `guidance.GuidedBackend` adds the
unconditional branch below the sampler, which does not know about it). The next-token
sampler (`sampling.py`) and the solver (`solvers.py`) are pure.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from . import solvers
from .config import closest_key_error, is_positive_int
from .backends import CachedBackend, Latents, ReferenceBackend, Request, items_to_sample, sequence_length
from .guidance import Guidance, GuidedBackend, default_cfg_scale
from .inputs import Modality, Text, describe, is_text_dtype, normalize_prompt
from .sampling import sample_token
from .vocab import Vocab


@dataclass(frozen = True, kw_only = True)
class SampleOptions:
    max_length: int = 2048                          # tokens per sequence, SOS, structure and latent tokens included
    text_temperature: float = 1.                    # 0 is greedy
    text_min_p: float | None = 0.1
    text_top_k: int | None = None
    fixed_modality_shape: tuple[int, ...] | None = None     # the shape of every generated modality
    force_modality_at_start: int | tuple | None = None     # modality type, or (type, shape), started right after the prompt
    modality_steps: int = 8                         # ODE steps per modality (fixed-grid methods; midpoint: two model calls each)
    ode_method: str = 'midpoint'                    # `solvers.FIXED_METHODS`, or an adaptive one of `solvers.ADAPTIVE_METHODS`
    ode_atol: float = 1e-5                          # tolerances of an adaptive method
    ode_rtol: float = 1e-5
    time_shift: float = 1.
    init_modality_noise: Tensor | None = None       # (*shape, dim_latent) noise at t = 0 of each row's first modality
    cfg_scale: float | None = None                  # classifier-free guidance, 1 is off; None: `guidance.default_cfg_scale`
    guidance_interval: tuple[float, float] = (0.6, 1.)  # guided only for t in [t_lo, t_hi] (`guidance.Guidance`)
    guidance_schedule: str = 'constant'             # or 'linear': from no guidance at t_lo to cfg_scale at t_hi

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f'max_length must be at least 2, got {self.max_length}')
        if self.text_temperature < 0:
            raise ValueError(f'text_temperature must be >= 0, got {self.text_temperature}')
        if self.text_top_k is not None and not is_positive_int(self.text_top_k):
            raise ValueError(f'text_top_k must be None or a positive int, got {self.text_top_k!r}')
        if self.text_min_p is not None and not 0. <= self.text_min_p <= 1.:
            raise ValueError(f'text_min_p must be None or lie in [0, 1], got {self.text_min_p!r}')
        if self.fixed_modality_shape is not None:
            check_shape(self.fixed_modality_shape, 'fixed_modality_shape')
        check_method(self.ode_method, self.modality_steps)
        self.guidance(None)                         # checks the guidance options

    def guidance(self, model) -> Guidance:
        scale = self.cfg_scale if self.cfg_scale is not None else (default_cfg_scale(model) if model is not None else 1.)
        return Guidance(cfg_scale = scale, guidance_interval = self.guidance_interval, guidance_schedule = self.guidance_schedule)

    @property
    def adaptive(self) -> bool:
        return self.ode_method in solvers.ADAPTIVE_METHODS


def check_shape(shape, name: str) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or len(shape) == 0 or not all(is_positive_int(n) for n in shape):
        raise ValueError(f'{name} must be a non-empty tuple of positive ints, got {shape!r}')
    return tuple(shape)


def check_method(method: str, steps: int):
    if method not in (*solvers.FIXED_METHODS, *solvers.ADAPTIVE_METHODS):
        raise ValueError(f'ode_method must be one of {solvers.FIXED_METHODS + solvers.ADAPTIVE_METHODS}, got {method!r}')
    if not is_positive_int(steps):
        raise ValueError(f'modality_steps must be a positive int, got {steps!r}')


def check_modality(model, modality_type, shape, type_name: str, shape_name: str):
    """A modality type to generate, and its shape when one is given (None: the default)."""
    num_types = model.vocab.num_modality_types
    if isinstance(modality_type, bool) or not isinstance(modality_type, int) or not 0 <= modality_type < num_types:
        raise ValueError(f'{type_name}: the modality type must be an int in [0, {num_types}), got {modality_type!r}')
    if shape is None:
        return
    shape = check_shape(shape, shape_name)
    num_dim = model.config.modality_num_dim[modality_type]
    if num_dim is not None and len(shape) != num_dim:
        raise ValueError(f'{shape_name}: modality type {modality_type} expects {num_dim} axes (modality_num_dim), got the shape {shape}')


@dataclass
class Row:
    generator: torch.Generator | None
    items: list = field(default_factory = list)     # the sequence so far
    phase: str = 'text'                             # text, shape, modality, done
    shape_tokens: list[int] = field(default_factory = list)
    opening: tuple[int, tuple[int, ...]] | None = None      # (type, shape) of a modality whose BOM is being fed
    modality: tuple | None = None                   # (type, shape, grid, step index, stages) while denoising
    used_init_noise: bool = False
    latent_extra: int = 0                           # sum over the Latents among the items of their tokens less one

    @property
    def length(self) -> int:
        """Tokens in the sequence so far, without a pass over it (only tokens are ever removed)."""
        return len(self.items) + self.latent_extra

    def extend(self, items: list):
        self.items.extend(items)
        self.latent_extra += sum(len(item) - 1 for item in items if isinstance(item, Latents))


class Sampler:
    def __init__(self, model, options: SampleOptions, backend):
        self.model, self.options, self.backend = model, options, backend
        self.vocab: Vocab = model.vocab
        self.masks = self.allowed_masks()

    def allowed_masks(self) -> dict[str, Tensor]:
        vocab, device = self.vocab, self.model.device
        def mask_of(ids):
            mask = torch.zeros(vocab.size, dtype = torch.bool, device = device)
            mask[list(ids)] = True
            return mask
        text = range(vocab.num_text_tokens)
        boms = [vocab.bom(m) for m in range(vocab.num_modality_types)]
        digits = range(vocab.digit0, vocab.sep + 1)
        return dict(
            text = mask_of([*text, vocab.eos, *([vocab.meta] if vocab.num_modality_types > 0 else [])]),
            shape = mask_of([*digits, *boms]),
            fixed_shape = mask_of(boms),
        )

    # the loop

    def run(self, prompts: list[list], generators: list[torch.Generator | None]) -> list[list]:
        rows = [Row(generator) for generator in generators]
        self.num_rows = len(rows)
        requests = [self.open(row, prompt, index) for index, (row, prompt) in enumerate(zip(rows, prompts))]

        while any(request is not None for request in requests):
            outputs = self.backend.step(requests)
            for row, request in zip(rows, requests):
                if request is not None and request.keep:
                    row.extend(request.items)
            requests = self.advance(rows, outputs)

        return [row.items for row in rows]

    def open(self, row: Row, prompt: list, index: int = 0) -> Request:
        items = [self.vocab.sos]
        for segment in prompt:
            if isinstance(segment, Text):
                items.extend(segment.ids.tolist())
            else:
                m, shape = segment.modality_type, segment.shape
                items.extend([self.vocab.meta, *self.vocab.encode_shape(shape), self.vocab.bom(m)])
                items.extend([latents_item(self.model, m, segment.latent.reshape(-1, segment.latent.shape[-1]), shape), self.vocab.eom(m)])

        forced = self.options.force_modality_at_start
        if forced is not None:
            m, shape = forced if isinstance(forced, tuple) else (forced, self.options.fixed_modality_shape or self.default_shape(forced))
            items.extend([self.vocab.meta, *self.vocab.encode_shape(shape), self.vocab.bom(m)])
            row.opening = (m, tuple(shape))

        needed = sequence_length(items) + (self.model.num_modality_tokens(*row.opening) + 1 if row.opening is not None else 0)
        if needed > self.options.max_length:
            raise ValueError(f'`max_length` must be at least the length of prompt {index}: it takes {needed} tokens (SOS, the prompt '
                             f'and any forced modality), got max_length = {self.options.max_length}')
        return Request(items)

    def advance(self, rows: list[Row], outputs: list[Tensor | None]) -> list[Request | None]:
        requests: list[Request | None] = [None] * len(rows)
        needs_token = []

        for index, (row, output) in enumerate(zip(rows, outputs)):
            if output is None:
                continue
            if row.opening is not None:
                requests[index] = self.start_modality(index, row)
            elif row.phase == 'modality':
                requests[index] = self.ode_stage(row, output)
            elif row.length >= self.options.max_length:
                self.finish(row)
            else:
                needs_token.append(index)

        if len(needs_token) > 0:
            tokens = self.sample_tokens([rows[i] for i in needs_token], torch.stack([outputs[i] for i in needs_token]))
            for index, token in zip(needs_token, tokens):
                requests[index] = self.on_token(index, rows[index], token)

        return requests

    def sample_tokens(self, rows: list[Row], logits: Tensor) -> list[int]:
        options = self.options
        kinds = ['fixed_shape' if row.phase == 'shape' and options.fixed_modality_shape is not None else row.phase for row in rows]
        allowed = torch.stack([self.masks[kind] for kind in kinds])
        tokens = sample_token(logits, allowed, options.text_temperature, options.text_top_k, options.text_min_p,
                              [row.generator for row in rows])
        return tokens.tolist()

    # text and shape

    def on_token(self, index: int, row: Row, token: int) -> Request | None:
        vocab = self.vocab

        if row.phase == 'text':
            if token == vocab.eos:
                row.items.append(token)
                row.phase = 'done'
                return None
            if token == vocab.meta:
                row.phase, row.shape_tokens = 'shape', []
                fixed = self.options.fixed_modality_shape
                if fixed is not None:
                    row.shape_tokens = vocab.encode_shape(fixed)
                    if row.length + 1 + len(row.shape_tokens) + 1 + math.prod(fixed) + 1 > self.options.max_length:
                        row.phase = 'done'      # the fixed modality would not fit: stop before its header
                        return None
                return Request([token, *row.shape_tokens])
            return Request([token])

        if not vocab.is_bom(token):
            row.shape_tokens.append(token)
            return Request([token])

        m = vocab.modality_type_of(token)
        shape = self.read_shape(row, m)
        if shape is None:
            self.finish(row)
            return None

        written = vocab.encode_shape(shape)
        if written == row.shape_tokens:
            tokens = [token]
        else:
            # rewrite the shape, so the sequence is the one `pack` lays out for the returned sample
            self.backend.rewind(index, len(row.shape_tokens))
            del row.items[len(row.items) - len(row.shape_tokens):]
            tokens = [*written, token]

        row.opening = (m, shape)
        return Request(tokens)

    def read_shape(self, row: Row, m: int) -> tuple[int, ...] | None:
        """The shape the model wrote, or the default with a warning when it is invalid; None
        when not even the default fits in what is left of max_length."""
        model, vocab = self.model, self.vocab
        room = self.options.max_length - (row.length - len(row.shape_tokens)) - 2     # less BOM and EOM

        def fits(shape):
            return len(vocab.encode_shape(shape)) + model.num_modality_tokens(m, shape) <= room

        shape = vocab.decode_shape(row.shape_tokens)
        num_dim = model.config.modality_num_dim[m]
        if shape is not None and (num_dim is None or len(shape) == num_dim) and fits(shape):
            return shape

        default = self.default_shape(m)
        if not fits(default):
            return None
        warnings.warn(f'the model wrote an invalid shape {row.shape_tokens} for modality type {m} '
                      f'(or one that does not fit in max_length); using modality_default_shape {default}')
        return default

    def default_shape(self, m: int) -> tuple[int, ...]:
        shape = self.model.config.modality_default_shape[m]
        if shape is None:
            raise ValueError(f'modality type {m} has no modality_default_shape to fall back to')
        return shape

    def finish(self, row: Row):
        """Stops a row at max_length, dropping an unfinished modality header (META and shape)."""
        if row.phase == 'shape':
            del row.items[len(row.items) - len(row.shape_tokens) - 1:]
        row.phase = 'done'

    # modality

    def start_modality(self, index: int, row: Row) -> Request:
        m, shape = row.opening
        row.opening, row.phase = None, 'modality'
        model, options = self.model, self.options
        noise = torch.randn(math.prod(shape), model.config.dim_latent[m], generator = row.generator).to(model.device)
        given = options.init_modality_noise
        if given is not None and not row.used_init_noise:
            if given.numel() != noise.numel():
                raise ValueError(f'init_modality_noise has {given.numel()} values, the modality of shape {shape} needs {noise.numel()}')
            noise, row.used_init_noise = given.reshape(noise.shape).to(noise), True

        if options.adaptive:
            row.phase = 'text'
            return Request([latents_item(model, m, self.integrate_alone(index, m, shape, noise), shape), self.vocab.eom(m)])

        grid = solvers.time_grid(options.modality_steps, options.time_shift).tolist()
        row.modality = (m, shape, grid, 0, solvers.stages(options.ode_method, noise, grid[0], grid[1]))
        x, t = next(row.modality[-1])
        return Request([latents_item(self.model, m, x, shape)], time = t, keep = False)

    def integrate_alone(self, index: int, m: int, shape: tuple[int, ...], noise: Tensor) -> Tensor:
        """An adaptive solver picks its own times and calls the velocity function itself, so it
        cannot be stepped in lockstep with other rows: the row's modality is integrated here,
        in one go, one model call per evaluation on this row alone, while the other rows wait
        (their caches untouched). Their results do not depend on the batch either way."""
        num_rows = self.num_rows

        def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
            requests: list[Request | None] = [None] * num_rows
            requests[index] = Request([latents_item(self.model, m, x, shape)], time = float(t), keep = False)
            return self.backend.step(requests)[index]

        ends = torch.tensor([0., 1.], device = noise.device)
        return solvers.integrate(velocity_fn, noise, ends, method = self.options.ode_method,
                                 atol = self.options.ode_atol, rtol = self.options.ode_rtol)

    def ode_stage(self, row: Row, velocity: Tensor) -> Request:
        m, shape, grid, step, stages = row.modality
        try:
            x, t = stages.send(velocity)
            return Request([latents_item(self.model, m, x, shape)], time = t, keep = False)
        except StopIteration as done:
            x = done.value

        step += 1
        if step < len(grid) - 1:
            stages = solvers.stages(self.options.ode_method, x, grid[step], grid[step + 1])
            row.modality = (m, shape, grid, step, stages)
            x, t = next(stages)
            return Request([latents_item(self.model, m, x, shape)], time = t, keep = False)

        row.phase, row.modality = 'text', None
        return Request([latents_item(self.model, m, x, shape), self.vocab.eom(m)])


def latents_item(model, modality_type: int, values: Tensor, shape: tuple[int, ...]) -> Latents:
    return Latents(modality_type, values, tuple(shape), model.token_shape(modality_type, tuple(shape)))


# public entry points (Transfusion's methods delegate here)

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
    valid -= {'model', 'prompt'}
    for key in given:
        if key not in valid:
            raise closest_key_error(name, key, sorted(valid))


def row_generators(batch_size: int, generator, seed: int | None) -> list[torch.Generator | None]:
    """One generator per row, so that a row samples the same alone or in a batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(f'expected one generator per prompt ({batch_size}), got {len(generator)}')
        return list(generator)
    if generator is not None:
        return [generator] * batch_size
    if seed is not None:
        return [torch.Generator().manual_seed(seed + row) for row in range(batch_size)]
    return [None] * batch_size


def is_batch(prompt) -> bool:
    """A list of prompts (each a list) rather than one prompt."""
    return isinstance(prompt, list) and len(prompt) > 0 and all(isinstance(p, list) for p in prompt)


def to_output(model, items: list, return_latents: bool) -> list:
    """The items of a finished row -> the contract's list form: text ids and (type, modality) tuples."""
    vocab = model.vocab
    if items[-1] == vocab.eos:
        items = items[:-1]
    sample = []
    for segment in items_to_sample(items, vocab, wrapped = True):
        if isinstance(segment, Text):
            sample.append(segment.ids)
            continue
        m, latent = segment.modality_type, segment.latent                  # (*shape, dim_latent)
        if model.config.channel_first_latent[m]:
            latent = latent.movedim(-1, 0)
        if not return_latents and not isinstance(model.modality_decoders[m], torch.nn.Identity):
            latent = model.modality_decoders[m](latent[None])[0]
        sample.append((m, latent))
    return sample


def make_backend(model, batch_size: int, options: SampleOptions, use_cache: bool = True):
    """The backend of `sample`: KV-cached or not, with a second, unconditional set of rows when
    guidance is on (`cfg_scale != 1`; at 1 the guided velocity is the conditional one, so
    the unconditional branch is not run at all)."""
    def one():
        return CachedBackend(model, batch_size, options.max_length) if use_cache else ReferenceBackend(model, batch_size)
    guidance = options.guidance(model)
    if guidance.off:
        return one()
    return GuidedBackend(one(), one(), guidance, model.vocab)


def prompt_sample(model, prompt, name: str) -> list:
    """One prompt in any of its forms -> a `Sample` (empty for None or []); errors call it `name`."""
    segments = normalize_prompt(prompt, name, model.config.num_text_tokens, model.specs, model.encode_modality)
    return [model.with_token_shape(segment) for segment in segments]


def sample(model, prompt = None, *, batch_size: int | None = None, return_latents: bool = False,
           generator = None, seed: int | None = None, use_cache: bool = True, **options) -> list:
    options = SampleOptions(**options)
    if batch_size is not None and not is_positive_int(batch_size):
        raise ValueError(f'batch_size must be None or a positive int, got {batch_size!r}')
    forced = options.force_modality_at_start
    if forced is not None:
        m, shape = forced if isinstance(forced, tuple) and len(forced) == 2 else (forced, None)
        check_modality(model, m, shape, 'force_modality_at_start', 'force_modality_at_start: the shape')
    batched = is_batch(prompt) or batch_size is not None
    prompts = prompt if is_batch(prompt) else [prompt] * (batch_size or 1)
    names = [f'prompt[{i}]' for i in range(len(prompts))] if is_batch(prompt) else ['prompt'] * len(prompts)
    prompts = [prompt_sample(model, p, name) for p, name in zip(prompts, names)]

    generators = row_generators(len(prompts), generator, seed)
    backend = make_backend(model, len(prompts), options, use_cache)

    with torch.no_grad(), eval_mode(model):
        sequences = Sampler(model, options, backend).run(prompts, generators)
        samples = [to_output(model, items, return_latents) for items in sequences]

    return samples if batched else samples[0]


def generate_text_only(model, prompt: Tensor, seq_len: int, *, temperature: float = 1., min_p: float | None = 0.1,
                       top_k: int | None = None, generator = None, seed: int | None = None, use_cache: bool = True) -> Tensor:
    """Continues raw text rows (no SOS, as `model(Int[b n])` trains them) up to `seq_len`
    tokens in all; returns the (b, seq_len - n) new tokens."""
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
    batch, prompt_len = prompt.shape
    steps = max(0, seq_len - prompt_len)
    generators = row_generators(batch, generator, seed)
    backend = CachedBackend(model, batch, max(seq_len, prompt_len)) if use_cache else ReferenceBackend(model, batch, wrapped = False)

    allowed = torch.zeros(model.vocab.size, dtype = torch.bool, device = model.device)
    allowed[:model.vocab.num_text_tokens] = True

    out = torch.zeros(batch, steps, dtype = torch.long, device = prompt.device)
    tokens = prompt

    with torch.no_grad(), eval_mode(model):
        for step in range(steps):
            tokens = sample_token(backend.decode(tokens), allowed, temperature, top_k, min_p, generators)
            out[:, step] = tokens
            tokens = tokens[:, None]
    return out


def generate_modality_only(model, *, batch_size: int = 1, modality_type: int = 0,
                           fixed_modality_shape: tuple[int, ...] | None = None, modality_steps: int = SampleOptions.modality_steps,
                           ode_method: str = SampleOptions.ode_method, time_shift: float = 1., return_latents: bool = False,
                           generator = None, seed: int | None = None, use_cache: bool = True) -> Tensor:
    """A batch of modalities of one type and shape, each after SOS and its header alone:
    (batch, *shape, dim_latent), or channel first, decoded unless `return_latents`."""
    if not is_positive_int(batch_size):
        raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
    check_modality(model, modality_type, fixed_modality_shape, 'modality_type', 'fixed_modality_shape')
    check_method(ode_method, modality_steps)
    m, vocab = modality_type, model.vocab
    shape = tuple(fixed_modality_shape) if fixed_modality_shape is not None else model.config.modality_default_shape[m]
    if shape is None:
        raise ValueError(f'modality type {m} has no modality_default_shape: pass fixed_modality_shape')

    header = [vocab.sos, vocab.meta, *vocab.encode_shape(shape), vocab.bom(m)]
    length = len(header) + model.num_modality_tokens(m, shape)
    backend = CachedBackend(model, batch_size, length) if use_cache else ReferenceBackend(model, batch_size)

    generators = row_generators(batch_size, generator, seed)
    noise = torch.stack([torch.randn(math.prod(shape), model.config.dim_latent[m], generator = g) for g in generators]).to(model.device)

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        requests = [Request([latents_item(model, m, row, shape)], time = float(t), keep = False) for row in x]
        return torch.stack(backend.step(requests))

    with torch.no_grad(), eval_mode(model):
        backend.step([Request(list(header)) for _ in range(batch_size)])
        grid = solvers.time_grid(modality_steps, time_shift, device = model.device)
        latents = solvers.integrate(velocity_fn, noise, grid, method = ode_method)

        out = []
        for latent in latents:
            sample = to_output(model, [*header, latents_item(model, m, latent, shape), vocab.eom(m)], return_latents)
            out.append(sample[0][1])
    return torch.stack(out)


class eval_mode:
    """Puts a model in eval mode for a block and restores its training flag after."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)
