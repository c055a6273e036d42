"""The sampler: a small state machine per row, run in lockstep over a batch.

    text  --META-->  shape  --BOM_m-->  modality (ODE steps against the prefix)
      ^                                      |
      +------- commit clean latents + EOM ---+
    text  --EOS or the row's budget-->  done

- text: the next token is sampled among text, META and EOS;
- shape: among the shape digits, ',' and the BOM tokens (only the BOM of the types that a
  fixed shape suits and that fit, whose tokens are then written for the model). At BOM the
  written shape is read; one that cannot be used (unreadable, wrong number of axes, not taken
  there and back by the type's down / up blocks, too long to fit: `shapes.read_shape`,
  lengths by arithmetic first) is replaced by the default shape with a warning (an error with
  `fallback_to_default_shape_if_invalid` off), or ends the row with a warning when the type
  has no usable default; rewritten, the shape tokens keep the sequence the one that `pack`
  would lay out for the returned sample;
- modality (`ode_stage.py`): noise at t = 0 is integrated to t = 1 by a fixed-grid solver,
  each stage one model call on the modality's tokens alone; then the clean latents (at t = 1,
  as training sees a finished sequence) and the EOM token are committed in one step. An adaptive solver
  (dopri5, ...) chooses its own evaluation times, so it integrates a row's modality in one go
  while the other rows wait (see `ode_stage.integrate_alone`).

A row whose prompt opens a modality (ends with BOM, see `prompts.py`), or with
`force_modality_at_start`, starts in the modality phase.

The budget. `max_length` is the number of tokens a row may generate after its prompt, and it
is never exceeded. Generated are all the tokens the sequence grows by: text, EOS, and every
modality's META, shape tokens, BOM, latent tokens (as many as it takes in the sequence) and
EOM, so that the budget bounds the compute and the KV cache (preallocated for the longest
request plus the budget). What the caller asks for is not counted and always generated in
full: SOS, the prompt as given (each modality with its header and EOM) and the modality to
start with, which the prompt opens (ends with its BOM) or `force_modality_at_start` asks for
(its header, latent tokens and EOM). A modality the model starts itself that would not fit is
not started: the row ends there. `max_total_length` bounds the whole row instead, everything
included.

Every row advances through its own phase; each step is one model call for the whole batch
(two during ODE stages with classifier-free guidance: `guidance.GuidedBackend` adds the
unconditional branch below the sampler, which does not know about it). The next-token
sampler (`sampling.py`) and the solver (`solvers.py`) are pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import solvers
from .backends import Latents, Request, sequence_length
from .config import is_number, is_positive_int
from .guidance import Guidance, default_cfg_scale
from .inputs import Text, describe
from .prompts import Prompt
from .sampling import sample_token
from .ode_stage import ModalityStage, check_noise, initial_noise, integrate_alone, latents_item
from .shapes import misfit, read_shape, shape_problem, types_for_fixed_shape
from .vocab import Vocab


@dataclass(frozen = True, kw_only = True)
class SampleOptions:
    max_length: int = 2048                          # tokens a row generates after the prompt (and the modality it asks for)
    max_total_length: int | None = None             # tokens per row in all, SOS and the prompt included; None: no such bound
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
    init_modality_noise: Tensor | None = None       # noise at t = 0 of every modality a row generates: (*shape, dim_latent),
                                                    # or (n, d) of which the first rows and columns are taken
    cfg_scale: float | None = None                  # classifier-free guidance, 1 is off; None: `guidance.default_cfg_scale`
    guidance_interval: tuple[float, float] = (0.6, 1.)  # guided only for t in [t_lo, t_hi] (`guidance.Guidance`)
    guidance_schedule: str = 'constant'             # or 'linear': from no guidance at t_lo to cfg_scale at t_hi

    def __post_init__(self):
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 0:
            raise ValueError(f'max_length must be an int >= 0 (the tokens to generate after the prompt), got {self.max_length!r}')
        if self.max_total_length is not None and not is_positive_int(self.max_total_length):
            raise ValueError(f'max_total_length must be None or a positive int (the tokens of a row, prompt included), '
                             f'got {self.max_total_length!r}')
        noise = self.init_modality_noise
        if noise is not None and not (torch.is_tensor(noise) and noise.is_floating_point() and noise.ndim >= 2):
            raise ValueError(f'init_modality_noise must be a float tensor of shape (*shape, dim_latent) or (n, d), got {describe(noise)}')
        if noise is not None and not bool(noise.isfinite().all()):
            raise ValueError(f'init_modality_noise must be finite, got NaN or inf in {describe(noise)}')
        check_text_sampling(self.text_temperature, self.text_top_k, self.text_min_p, prefix = 'text_')
        if self.fixed_modality_shape is not None:
            check_shape(self.fixed_modality_shape, 'fixed_modality_shape')
        check_method(self.ode_method, self.modality_steps)
        check_solver_numbers(self.time_shift, self.ode_atol, self.ode_rtol)
        self.guidance(None)                         # checks the guidance options

    def guidance(self, model) -> Guidance:
        """The guidance weights of `model`'s samples; `cfg_scale = None` is `default_cfg_scale(model)`."""
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


def check_solver_numbers(time_shift, atol, rtol):
    """Checked at the call, not when a modality starts (after the prompt and some text)."""
    if not is_number(time_shift) or time_shift <= 0:
        raise ValueError(f'time_shift must be a finite number > 0 (1 is no shift), got {time_shift!r}')
    for name, value in (('ode_atol', atol), ('ode_rtol', rtol)):
        if not is_number(value) or value < 0:
            raise ValueError(f'{name} must be a finite number >= 0 (a tolerance of the adaptive ODE methods), got {value!r}')
    if atol == 0 and rtol == 0:
        raise ValueError('ode_atol and ode_rtol cannot both be 0: an adaptive ODE method would never accept a step')


def check_text_sampling(temperature, top_k, min_p, prefix: str = ''):
    """The next-token options of `sample` (named `text_...`) and of `generate_text_only`."""
    if not is_number(temperature) or temperature < 0:
        raise ValueError(f'{prefix}temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}')
    if top_k is not None and not is_positive_int(top_k):
        raise ValueError(f'{prefix}top_k must be None or a positive int, got {top_k!r}')
    if min_p is not None and not (is_number(min_p) and 0. <= min_p <= 1.):
        raise ValueError(f'{prefix}min_p must be None or lie in [0, 1], got {min_p!r}')


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
    boms: Tensor | None = None                      # with fixed_modality_shape: the BOM tokens of the types it fits
    opening: tuple[int, tuple[int, ...]] | None = None      # (type, shape) of a modality whose BOM is being fed
    modality: ModalityStage | None = None           # while a fixed-grid solver denoises its modality
    limit: int = 0                                  # the most tokens the row may hold (prompt and budget)
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
        self.fixed_types = types_for_fixed_shape(model, options.fixed_modality_shape)

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
        )

    # the loop

    def run(self, prompts: list[Prompt | list], generators: list[torch.Generator | None]) -> list[list]:
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

    def open(self, row: Row, prompt: Prompt | list, index: int = 0) -> Request:
        """The row's first request: SOS, the prompt and the header of a modality to start with."""
        prompt = prompt if isinstance(prompt, Prompt) else Prompt(list(prompt))
        items, row.opening = start_items(self.model, prompt, self.options)
        requested = requested_length(self.model, items, row.opening)
        row.limit = row_limit(requested, self.options)
        if row.limit < requested:
            raise ValueError(f'max_total_length = {self.options.max_total_length} is less than the {requested} tokens that prompt '
                             f'{index} asks for (SOS, the prompt, and a modality that it opens or force_modality_at_start asks for)')
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
            elif row.length >= row.limit:
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
        allowed = torch.stack([row.boms if row.phase == 'shape' and row.boms is not None else self.masks[row.phase] for row in rows])
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
                row.phase, row.shape_tokens, row.boms = 'shape', [], None
                fixed = self.options.fixed_modality_shape
                if fixed is not None:
                    # the model picks among the types that the fixed shape suits and that still fit
                    noise = self.options.init_modality_noise
                    types = [m for m in self.fixed_types if misfit(self.model, noise, row.limit, row.length, m, fixed) is None]
                    if len(types) == 0:
                        row.phase = 'done'      # no fixed modality would fit: stop before its header
                        return None
                    row.shape_tokens = vocab.encode_shape(fixed)
                    row.boms = torch.zeros_like(self.masks['shape'])
                    row.boms[[vocab.bom(m) for m in types]] = True
                return Request([token, *row.shape_tokens])
            return Request([token])

        if not vocab.is_bom(token):
            row.shape_tokens.append(token)
            return Request([token])

        m = vocab.modality_type_of(token)
        start = row.length - len(row.shape_tokens) - 1          # where its META is
        shape = read_shape(self.model, self.options.init_modality_noise, row.shape_tokens, start, row.limit, m)
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

    def finish(self, row: Row):
        """Stops a row at its budget, dropping an unfinished modality header (META and shape)."""
        if row.phase == 'shape':
            del row.items[len(row.items) - len(row.shape_tokens) - 1:]
        row.phase = 'done'

    # modality

    def start_modality(self, index: int, row: Row) -> Request:
        m, shape = row.opening
        row.opening, row.phase = None, 'modality'
        noise = initial_noise(self.model, self.options, row.generator, m, shape)
        if self.options.adaptive:
            row.phase = 'text'
            clean = integrate_alone(self.backend, self.model, self.options, index, self.num_rows, m, shape, noise)
            return Request([latents_item(self.model, m, clean, shape), self.vocab.eom(m)])
        row.modality, request = ModalityStage.start(self.model, self.options, m, shape, noise)
        return request

    def ode_stage(self, row: Row, velocity: Tensor) -> Request:
        request, done = row.modality.advance(velocity)
        if done:
            row.phase, row.modality = 'text', None
        return request


def header_items(vocab: Vocab, m: int, shape: tuple[int, ...]) -> list[int]:
    return [vocab.meta, *vocab.encode_shape(shape), vocab.bom(m)]


def start_items(model, prompt: Prompt, options: SampleOptions) -> tuple[list, tuple | None]:
    """A prompt's items (SOS, its segments, the header of a modality to start with) and that
    modality's (type, shape). It is the one `force_modality_at_start` asks for, else the one
    the prompt opens (as in the public package, where the forced BOM follows the prompt's and
    is the one that counts); without a shape, of `fixed_modality_shape` or the default."""
    vocab = model.vocab
    items = [vocab.sos]
    for segment in prompt.segments:
        if isinstance(segment, Text):
            items.extend(segment.ids.tolist())
        else:
            m, shape = segment.modality_type, segment.shape
            items.extend([*header_items(vocab, m, shape), latents_item(model, m, segment.latent.reshape(-1, segment.latent.shape[-1]), shape), vocab.eom(m)])

    forced = options.force_modality_at_start
    if forced is None and prompt.opening is None:
        return items, None
    m, shape = (forced if isinstance(forced, tuple) else (forced, None)) if forced is not None else prompt.opening
    source = 'force_modality_at_start' if forced is not None else 'the prompt'
    if shape is None:
        source = 'fixed_modality_shape' if options.fixed_modality_shape is not None else 'modality_default_shape'
        shape = options.fixed_modality_shape or model.config.modality_default_shape[m]
    if shape is None and forced is not None:
        raise ValueError(f'modality type {m} has no modality_default_shape to fall back to')
    if shape is None:
        raise ValueError(f'the prompt opens modality type {m} without a shape, and that type has no modality_default_shape '
                         f'(write META and the shape before its BOM, or pass fixed_modality_shape)')
    shape = tuple(shape)
    problem = shape_problem(model, m, shape)
    if problem is not None:
        raise ValueError(f'{source}: a modality of type {m} cannot be generated with the shape {shape}: {problem}')
    if options.init_modality_noise is not None:
        check_noise(options.init_modality_noise, m, shape, model.config.dim_latent[m])
    items.extend(header_items(vocab, m, shape))
    return items, (m, shape)


def requested_length(model, items: list, opening: tuple | None) -> int:
    """The tokens a row holds before it generates anything of its own: SOS, the prompt and the
    modality to start with (header, latent tokens and EOM), which is always generated in full."""
    return sequence_length(items) + (model.num_modality_tokens(*opening) + 1 if opening is not None else 0)


def row_limit(requested: int, options: SampleOptions) -> int:
    """The most tokens a row may hold: what it was asked for and `max_length` more, within `max_total_length`."""
    limit = requested + options.max_length
    return limit if options.max_total_length is None else min(limit, options.max_total_length)
