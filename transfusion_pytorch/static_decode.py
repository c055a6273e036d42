"""Decoding steps of fixed shapes, replayed from CUDA graphs.

A decoding step of a small batch is launch-bound: hundreds of small kernels per token, each
launched from Python. gpt-fast's pattern (https://github.com/pytorch-labs/gpt-fast) removes the
launches: the step reads its inputs from static buffers, attends over a preallocated cache
indexed by position with a mask over all of it, and so has the same shapes at every call; it is
recorded once in a CUDA graph (`torch.cuda.CUDAGraph`) and replayed.

`StaticBackend` is `CachedBackend` with two such steps:

- one text token per row (`generate_text_only`, and `sample`'s text between modalities): token
  ids, rotary positions and cache slots as (B,) tensors;
- the ODE stages of a modality of one type and shape (`sample`'s modalities, and
  `generate_modality_only`): latents (B, n, dim_latent), times, positions and the slot where
  each row's span starts. Its tokens attend to the cached prefix and their own span.

Rows that take no part in a step run on stale inputs and write only to the cache's spare slot;
their outputs are dropped. Every other request (a prompt, a modality committed with its EOM, a
shape written by the model) takes `CachedBackend`'s dynamic path, in the same step. A step's
outputs are copies: the graph's output buffers are overwritten by its next replay.

Where a step runs: captured in a CUDA graph on CUDA (`capture_cuda_graph`); eagerly elsewhere,
which is the same computation (the tests compare it with the dynamic path on CPU). With
`compile = True` the step is `torch.compile`d first. The graphs are captured at a step's first
call and dropped when the cache grows (`KVCache.reserve`), after which they are captured again:
the cache doubles, so a generation captures a handful of times.

Not captured (run eagerly, with the same static shapes): the modality step of a model with
`separate_modality_weights`, whose routing counts its rows on the host.

Sampling the next token (`sampling.sample_token`, one generator per row) stays outside the
graph, so the tokens drawn are those of the dynamic path for the same logits.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .backends import CachedBackend, Latents, Request
from .packing import grid_coords


def capture_cuda_graph(fn, warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """Records `fn()` in a CUDA graph and returns (graph, fn's outputs); `graph.replay()` then
    reruns it, its outputs written to the same tensors. `fn` takes no arguments: it reads static
    input buffers, and may write only to buffers that outlive the graph (the KV cache) and must
    be idempotent (warm-up runs it for real). It runs `warmup` times on a side stream first, as
    capture needs (lazy initialisation of cuBLAS and of the kernels' workspaces). Under autocast,
    the casts of the weights cached by the warm-up are read by the graph: replay it inside the
    same autocast region. Each graph has a memory pool of its own: graphs that shared one would
    have to be replayed in the order of their capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


class Runner:
    """Runs a static step: eagerly, compiled, or replayed from a CUDA graph captured at its first
    call. A step that cannot be captured (a user's module that reads a value on the host, say)
    runs eagerly, with a warning."""

    def __init__(self, step, capture: bool, compile: bool | str):
        self.step, self.capture = step, capture
        backend = compile if isinstance(compile, str) else 'inductor'
        self.fn = torch.compile(step.forward, dynamic = False, backend = backend) if compile else step.forward
        self.graph, self.outputs = None, None

    def __call__(self):
        if not self.capture:
            return self.fn()
        if self.graph is None:
            try:
                self.graph, self.outputs = capture_cuda_graph(self.fn)
            except RuntimeError as error:
                warnings.warn(f'static decoding: the {type(self.step).__name__} could not be captured in a CUDA graph, it runs '
                              f'eagerly (static_decode = False takes the dynamic path): {error}')
                self.capture = False
                return self.fn()
        self.graph.replay()
        return self.outputs


class TextStep:
    """One text token per row -> (B, vocab) logits. Inputs: `ints` (3, B): token ids, rotary
    positions and cache slots (the spare slot for a row that takes no part)."""

    def __init__(self, backend: StaticBackend):
        self.model, self.cache = backend.model, backend.cache
        self.ints = torch.zeros(3, backend.batch_size, dtype = torch.long, device = backend.model.device)

    def forward(self) -> Tensor:
        model, cache = self.model, self.cache
        tokens, positions, slots = self.ints.unbind(0)
        cache.prepare_static(slots[:, None], slots + 1, text = True)
        hidden = model.transformer(model.token_embed(tokens), None, positions, cache = cache)
        return model.to_logits(hidden)


class ModalityStep:
    """One ODE stage of a modality of type m and `shape` per row -> (B, n, dim_latent)
    velocities. Inputs: `values` (B, n, dim_latent) latents, `times` (B,) and `ints` (3, B):
    rotary positions, the slot of each span's first token and the end of what its tokens see
    (start + tokens; past the spare slot for a row that takes no part)."""

    def __init__(self, backend: StaticBackend, m: int, shape: tuple[int, ...], token_shape: tuple[int, ...] | None):
        model, device, batch = backend.model, backend.model.device, backend.batch_size
        self.model, self.cache, self.m, self.shape = model, backend.cache, m, shape
        self.num_latents, self.num_tokens = math.prod(shape), math.prod(token_shape or shape)
        self.values = torch.zeros(batch, self.num_latents, model.config.dim_latent[m], device = device)
        self.times = torch.zeros(batch, device = device)
        self.ints = torch.zeros(3, batch, dtype = torch.long, device = device)
        # constants of the step, made here: a graph cannot copy from the host
        self.offsets = torch.arange(self.num_tokens, device = device)
        self.token_span = torch.arange(batch, device = device).repeat_interleave(self.num_tokens)
        self.coords = grid_coords(token_shape or shape).to(device).repeat(batch, 1) if model.config.add_pos_emb[m] else None

    def forward(self) -> Tensor:
        model, cache, m = self.model, self.cache, self.m
        batch, _, dim_latent = self.values.shape
        positions, starts, ends = self.ints.unbind(0)
        slots = torch.clamp(starts[:, None] + self.offsets, max = cache.spare_slot)
        cache.prepare_static(slots, ends, text = False)

        # as CachedBackend.embed and latents_output, for B spans of one shape
        dtype = model.token_embed.weight.dtype
        shapes = [self.shape] * batch
        latents = self.values.view(-1, dim_latent)
        x = model.latents_to_tokens(m, latents.to(dtype), shapes)
        if self.coords is not None:
            x = x + model.pos_embs[m](self.coords)
        hidden = model.transformer(x.to(dtype), None, positions.repeat_interleave(self.num_tokens), self.times, self.token_span,
                                   cache = cache)
        output = model.tokens_to_output(m, hidden, shapes).float()
        times = self.times.repeat_interleave(self.num_latents)[:, None]
        return model.output_to_velocity(output, latents.to(output), times).reshape(batch, self.num_latents, dim_latent)


class StaticBackend(CachedBackend):
    """`CachedBackend` whose text tokens and ODE stages run as static steps (module docstring).
    `capture`: replay them from CUDA graphs (default: on CUDA); `compile`: `torch.compile` them
    (True: with inductor; or the name of a `torch.compile` backend)."""

    def __init__(self, model, batch_size: int, max_len: int, capture: bool | None = None, compile: bool | str = False):
        super().__init__(model, batch_size, max_len)
        self.batch_size = batch_size
        self.capture = model.device.type == 'cuda' if capture is None else capture
        self.compile = compile
        self.steps: dict = {}
        self.version = self.cache.version
        # the text step whose positions and slots on the device are those of every row's next
        # token (it just fed every row): `generate_text_only` then copies nothing from the host
        self.text_follows: Runner | None = None

    def runner(self, key, build) -> Runner:
        """The step of `key`, built at its first use and again after the cache has grown."""
        if self.version != self.cache.version:
            self.steps, self.version = {}, self.cache.version
        if key not in self.steps:
            step = build()
            uncapturable = key != 'text' and self.model.config.transformer.separate_modality_weights
            self.steps[key] = Runner(step, self.capture and not uncapturable, self.compile)
        return self.steps[key]

    def rewind(self, row: int, num: int):
        self.text_follows = None
        super().rewind(row, num)

    def step(self, requests: list[Request | None]) -> list[Tensor | None]:
        outputs: list[Tensor | None] = [None] * len(requests)
        text, groups, rest = [], {}, []
        for row, request in enumerate(requests):
            if request is None or len(request.items) == 0:
                continue
            item = request.items[0] if len(request.items) == 1 else None
            if request.keep and type(item) is int:
                text.append(row)
            elif not request.keep and isinstance(item, Latents):
                groups.setdefault((item.modality_type, item.shape, item.token_shape), []).append(row)
            else:
                rest.append(row)

        if len(rest) > 0:
            self.text_follows = None
            dynamic = super().step([request if row in rest else None for row, request in enumerate(requests)])
            for row in rest:
                outputs[row] = dynamic[row]
        if len(text) > 0:
            logits = self.text_step(text, torch.tensor([requests[row].items[0] for row in text]))
            for row in text:
                outputs[row] = logits[row]
        for key, rows in groups.items():
            velocities = self.modality_step(key, rows, requests)
            for row in rows:
                outputs[row] = velocities[row]
        return outputs

    def decode(self, tokens: Tensor) -> Tensor:
        """As `CachedBackend.decode`; one token per row takes the static step, with the ids
        copied on the device (a prompt, several tokens per row, the dynamic path)."""
        if tokens.shape[1] != 1:
            self.text_follows = None
            return super().decode(tokens)
        return self.text_step(list(range(self.batch_size)), tokens[:, 0])

    def text_step(self, rows: list[int], tokens: Tensor) -> Tensor:
        """Feeds token `tokens[i]` to row `rows[i]`, and keeps it -> (B, vocab) logits (rows not fed: garbage)."""
        cache = self.cache
        cache.reserve(max(cache.lengths[row] for row in rows) + 1)
        positions, slots = [0] * self.batch_size, [cache.spare_slot] * self.batch_size
        for row in rows:
            positions[row], slots[row] = self.cursors[row].position, cache.lengths[row]
            self.cursors[row].position += 1

        runner = self.runner('text', lambda: TextStep(self))
        ints, every_row = runner.step.ints, len(rows) == self.batch_size
        if every_row and self.text_follows is runner:
            ints[1:].add_(1)
        else:
            ints[1:].copy_(torch.tensor([positions, slots]), non_blocking = True)
        if every_row:
            ints[0].copy_(tokens, non_blocking = True)
        else:
            ints[0, rows] = tokens.to(ints.device, non_blocking = True)
        logits = runner().clone()
        cache.commit([1 if row in rows else 0 for row in range(self.batch_size)])
        self.text_follows = runner if every_row else None
        return logits

    def modality_step(self, key: tuple, rows: list[int], requests: list[Request | None]) -> Tensor:
        """One ODE stage of the modalities of type and shape `key` of `rows` (not kept) -> (B, n, dim_latent)."""
        m, shape, token_shape = key
        cache, batch = self.cache, self.batch_size
        num_tokens = len(requests[rows[0]].items[0])
        cache.reserve(max(cache.lengths[row] for row in rows) + num_tokens)
        runner = self.runner(key, lambda: ModalityStep(self, m, shape, token_shape))
        self.text_follows = None
        step = runner.step

        positions, starts, ends, times = [0] * batch, [cache.spare_slot] * batch, [cache.spare_slot + 1] * batch, [0.] * batch
        for row in rows:
            request = requests[row]
            positions[row], starts[row], times[row] = self.cursors[row].position, cache.lengths[row], request.time
            ends[row] = starts[row] + num_tokens
            step.values[row].copy_(request.items[0].values, non_blocking = True)
        step.ints.copy_(torch.tensor([positions, starts, ends]), non_blocking = True)
        step.times.copy_(torch.tensor(times), non_blocking = True)
        return runner().clone()
