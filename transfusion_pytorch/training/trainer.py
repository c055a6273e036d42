"""The trainer: one readable `train_step`, and the loop around it.

A step takes `grad_accum` micro-batches from the token-budget loader (see `data.py`), each
forward and backward under bf16 autocast where enabled and without gradient sync but for the
last; then clips the gradient norm, steps AdamW and the warmup + cosine schedule, and updates
the EMA. Each micro-batch's loss is a mean over its tokens and the micro-batches are weighted
equally, on one rank and across ranks.

Randomness by data position: the model draws its flow-matching times and noise (and dropout)
from the global torch RNG. Each micro-batch runs under a fork of that RNG seeded by
(seed, epoch, global batch index), so the noise a sample gets depends on where it is in the
data, not on how many ranks share the batch or on what ran before: N ranks reproduce one
rank with N-fold accumulation, and a resumed run the uninterrupted one. The RNG states are
also saved in checkpoints, for anything else that draws from them (callbacks).

Bad numbers: a non-finite loss or gradient holds the step back on the device (no weight,
optimizer or EMA update; the step counter, schedule and data still advance), and is reported,
by `on_nonfinite` with a warning or `NonFiniteError`, when the host reads the flags every
`check_finite_every` steps and at every log and checkpoint step (see `nonfinite.py`). A
checkpoint or pretrained model with a non-finite weight is never written.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from ..residual import ResidualMix
from ..transformer import Transformer
from . import checkpoint, distributed
from .data import SampleDataset, TokenBudgetLoader, in_the_data, packed_num_tokens
from .nonfinite import NonFiniteError, NonFiniteGuard
from .parallelize import CHECKPOINTING, STRATEGIES, gradient_sync, parallelize


@dataclass(kw_only = True)
class TrainConfig:
    out_dir: str                        # checkpoints, metrics.jsonl and the final pretrained model go here
    max_steps: int                      # optimizer steps
    max_tokens: int                     # token budget of one micro-batch on one rank
    grad_accum: int = 1                 # micro-batches per optimizer step and rank
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    decay_norms_biases_embeddings: bool = False   # AdamW decay on norm gains, biases and embeddings too
    warmup_steps: int = 0               # linear warmup from 0, then cosine decay ...
    min_lr_ratio: float = 0.1           # ... to lr * min_lr_ratio at max_steps
    grad_clip: float | None = 1.0
    ema_beta: float | None = 0.999      # None: no EMA
    bf16: bool | None = None            # autocast to bfloat16; None: on where CUDA supports it
    seed: int = 0                       # data order and per-batch noise
    strategy: str = 'ddp'               # 'ddp' or 'fsdp' when run under torchrun (FSDP with bf16: parameters gathered in bf16, gradients reduced in fp32)
    compile: bool = False               # torch.compile each transformer block; batches are padded to max_tokens (see parallelize.py)
    compile_backend: str = 'inductor'   # with compile: the torch.compile backend ('aot_eager' traces the same graphs without generating kernels)
    activation_checkpointing: str | None = None     # None, 'selective' (every other block) or 'full' (every block)
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    eval_every: int | None = None       # with `eval_dataset`
    progress: bool = True               # tqdm bar on rank 0
    tensorboard: bool = False           # also write TensorBoard scalars, if tensorboard is installed
    on_nonfinite: str = 'stop'          # a non-finite loss or gradient: 'stop' (raise NonFiniteError) or 'skip' the step
    check_finite_every: int = 10        # steps between the host's reads of the non-finite flag, besides log and checkpoint steps (docs/performance.md)

    def __post_init__(self):
        for name in ('max_steps', 'max_tokens', 'grad_accum', 'checkpoint_every', 'keep_last', 'log_every', 'check_finite_every'):
            if getattr(self, name) <= 0:
                raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
        # checked here, not when the optimizer or the EMA is made: a run's config is whole before anything is written
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f'lr must be a finite number >= 0, got {self.lr}')
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f'weight_decay must be a finite number >= 0, got {self.weight_decay}')
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f'betas must be two numbers in [0, 1), got {self.betas}')
        if self.warmup_steps < 0:
            raise ValueError(f'warmup_steps must be >= 0, got {self.warmup_steps}')
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f'min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}')
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f'grad_clip must be positive or None, got {self.grad_clip}')
        if self.ema_beta is not None and not 0 <= self.ema_beta < 1:
            raise ValueError(f'ema_beta must lie in [0, 1) or be None, got {self.ema_beta}')
        if self.strategy not in STRATEGIES:
            raise ValueError(f'strategy must be one of {STRATEGIES}, got {self.strategy!r}')
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(f'activation_checkpointing must be one of {CHECKPOINTING}, got {self.activation_checkpointing!r}')
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(f'compile_backend must name a torch.compile backend, got {self.compile_backend!r}')
        if self.on_nonfinite not in ('stop', 'skip'):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")


def param_groups(model: nn.Module, weight_decay: float, decay_all: bool) -> list[dict]:
    """AdamW groups: no decay on norm gains, biases and embedding tables unless `decay_all`;
    unit-offset norms (Rubin, 2024) are decayed, towards a gain of 1.

    Nor on the weights that start at the identity and are stored as such: the U-ViT skip
    projections ([I, 0] on (x, skip)) and the hyper-connection static read / mix / write
    matrices. Decay would pull them towards zero, that is, towards scaling the residual stream
    down (the reason unit-offset norms exist); they hold a few (2 dim² per skip, (streams x
    fracs)² per branch) of the model's parameters."""
    no_decay = set()
    if not decay_all:
        for module in model.modules():
            # a unit-offset norm stores gain - 1, so decay pulls it towards the identity: it keeps its decay
            if getattr(module, 'unit_offset', False):
                continue
            if isinstance(module, (nn.Embedding, nn.RMSNorm, nn.LayerNorm)):
                no_decay.update(id(p) for p in module.parameters(recurse = False))
            if isinstance(module, Transformer):
                no_decay.update(id(p) for p in module.skip_projs.parameters())
            if isinstance(module, ResidualMix):
                no_decay.update(id(p) for p in (module.static_read, module.static_mix, module.static_write))
        no_decay.update(id(p) for name, p in model.named_parameters() if name.endswith('bias'))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        dict(params = [p for p in trainable if id(p) not in no_decay], weight_decay = weight_decay),
        dict(params = [p for p in trainable if id(p) in no_decay], weight_decay = 0.),
    ]


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1., (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1. - min_ratio) * 0.5 * (1. + math.cos(math.pi * progress))
    return factor


def batch_seed(seed: int, epoch: int, global_index: int) -> int:
    return hash((seed, epoch, global_index)) % (2 ** 63)


class Every:
    """A callback run every `every` steps on all ranks (sampling under FSDP needs them all):
    `fn(trainer, step)` may return a dict of metrics to log."""

    def __init__(self, every: int, fn: Callable):
        self.every, self.fn = every, fn

    def __call__(self, trainer: Trainer, step: int) -> dict | None:
        return self.fn(trainer, step) if step % self.every == 0 else None


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        dataset: SampleDataset,             # or a loader: anything with next_batch(), state_dict() and load_state_dict()
        config: TrainConfig,
        *,
        eval_dataset: SampleDataset | None = None,
        callbacks: list[Callable] = (),
        num_tokens: Callable[[list], int] | None = None,
        device: str | None = None,
    ):
        self.config, self.callbacks, self.eval_dataset = config, list(callbacks), eval_dataset
        self.dist = distributed.setup(device)
        self.out_dir = Path(config.out_dir)

        bf16 = config.bf16 if config.bf16 is not None else self.dist.device.type == 'cuda' and torch.cuda.is_bf16_supported()
        self.autocast = torch.autocast(self.dist.device.type, dtype = torch.bfloat16) if bf16 else nullcontext()

        self.model = model      # the plain model; checkpointed, compiled and sharded in place
        self.ema = model.create_ema(config.ema_beta) if config.ema_beta is not None else None
        self.wrapped = parallelize(
            model, self.ema, self.dist, config.strategy, activation_checkpointing = config.activation_checkpointing,
            compile_backend = config.compile_backend if config.compile else None, max_tokens = config.max_tokens, bf16 = bf16,
        )

        self.num_tokens = num_tokens or packed_num_tokens(model)
        # a loader of its own (`next_batch`, `state_dict`, `load_state_dict`), such as the streaming
        # loader over prepared shards of `transfusion_pytorch.data`, is used as it is
        self.loader = dataset if is_loader(dataset) else self.make_loader(dataset, multiple_of = config.grad_accum)

        self.optimizer = torch.optim.AdamW(
            param_groups(model, config.weight_decay, config.decay_norms_biases_embeddings),
            # fused on CPU too: the kernel reads the step counter and the non-finite flag on the
            # device, where the for-loop implementation reads its step counter with `.item()`
            lr = config.lr, betas = config.betas, fused = True,
        )
        self.trainable = [p for group in self.optimizer.param_groups for p in group['params']]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(config.warmup_steps, config.max_steps, config.min_lr_ratio))
        self.step = 0
        self.guard = NonFiniteGuard(config.on_nonfinite, self.dist)

        self.writer = None
        if self.dist.is_main:
            self.out_dir.mkdir(parents = True, exist_ok = True)
            if config.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.writer = SummaryWriter(self.out_dir / 'tensorboard')
                except ImportError:
                    print('tensorboard is not installed; metrics go to metrics.jsonl only')

    def make_loader(self, dataset: SampleDataset, multiple_of: int = 1, shuffle: bool = True) -> TokenBudgetLoader:
        return TokenBudgetLoader(
            dataset, self.config.max_tokens, self.num_tokens, seed = self.config.seed, shuffle = shuffle,
            rank = self.dist.rank, world_size = self.dist.world_size, multiple_of = multiple_of,
        )

    # one step

    def forward_backward(self, batch, scale: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batch's loss, and its per-sample (text, flow) losses for reporting bad numbers."""
        devices = [self.dist.device] if self.dist.device.type == 'cuda' else []
        with torch.random.fork_rng(devices = devices, device_type = self.dist.device.type):
            torch.manual_seed(batch_seed(self.config.seed, batch.epoch, batch.global_index))
            with self.autocast:
                try:
                    loss, breakdown = self.wrapped(batch.samples, return_breakdown = True)
                except (TypeError, ValueError) as error:         # a sample the model refuses, named by its place in the data
                    retold = in_the_data(error, batch.indices, getattr(self.loader, 'sample_name', None))
                    if retold is None:
                        raise
                    raise retold from None
            (loss * scale).backward()
        return loss.detach(), (breakdown.per_sample_text, breakdown.per_sample_flow)

    def train_step(self) -> dict:
        self.wrapped.train()
        accum, losses, tokens, per_sample = self.config.grad_accum, [], 0, []
        for micro in range(accum):
            batch = self.loader.next_batch()
            with gradient_sync(self.wrapped, sync = micro == accum - 1):
                loss, sample_losses = self.forward_backward(batch, scale = 1. / accum)
            losses.append(loss)
            per_sample.append((batch, *sample_losses))
            tokens += batch.num_tokens

        # a parameter no batch of this step used (a modality type absent from all of them) takes
        # an AdamW step on a zero gradient: FSDP reduce-scatters zeros for it anyway, and filling
        # them in here makes one process, DDP and FSDP agree
        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

        # the norm before clipping; clipping to inf leaves the gradient as it is
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else float('inf')
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        loss = torch.stack(losses).mean()

        skip = self.guard.flag(self.step + 1, loss, grad_norm, per_sample)
        # the fused kernel leaves the weights and moments as they are where the flag is set, and
        # takes its step counter back: `torch.amp.GradScaler`'s way of skipping a step without a sync
        self.optimizer.found_inf = skip.float()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none = True)
        if self.ema is not None:
            self.ema.update(skip = skip)
        self.step += 1
        skipped = self.guard.check() if self.check_due() else []
        grad_norm = grad_norm if self.config.grad_clip is not None else None
        return dict(loss = loss, grad_norm = grad_norm, tokens = tokens, skipped = skipped)

    def check_due(self) -> bool:
        """Whether the host reads the flags after this step: every `check_finite_every` steps,
        at log and checkpoint steps (a checkpoint is never written past a bad step) and at the end."""
        config, step = self.config, self.step
        return any(step % every == 0 for every in (config.check_finite_every, config.log_every, config.checkpoint_every)) \
            or step == config.max_steps

    # the loop

    def train(self) -> list[dict]:
        """Runs until `max_steps`, resuming from the newest good checkpoint in `out_dir`.
        Returns the metrics logged on this rank."""
        self.resume()
        config, history = self.config, []
        progress = tqdm(total = config.max_steps, initial = self.step, desc = 'training', disable = not (config.progress and self.dist.is_main))
        window_tokens, window_start = 0, time.perf_counter()

        while self.step < config.max_steps:
            out = self.train_step()
            progress.update(1)
            window_tokens += out['tokens']
            metrics = {}

            if self.step % config.log_every == 0 or self.step == config.max_steps:
                elapsed = time.perf_counter() - window_start
                metrics = dict(
                    loss = distributed.mean_across_ranks(out['loss']).item(),
                    lr = self.scheduler.get_last_lr()[0],
                    tokens_per_s = distributed.sum_across_ranks(torch.tensor(float(window_tokens), device = self.dist.device)).item() / elapsed,
                )
                if out['grad_norm'] is not None:
                    metrics['grad_norm'] = float(out['grad_norm'].full_tensor() if hasattr(out['grad_norm'], 'full_tensor') else out['grad_norm'])
                progress.set_postfix(loss = f"{metrics['loss']:.4f}", tok_s = f"{metrics['tokens_per_s']:.0f}")
                window_tokens, window_start = 0, time.perf_counter()

            if out['skipped']:
                metrics['skipped'] = len(out['skipped'])       # steps skipped since the last check
            if config.eval_every and self.eval_dataset is not None and self.step % config.eval_every == 0:
                metrics['eval_loss'] = self.evaluate(self.eval_dataset)
            for callback in self.callbacks:
                metrics.update(callback(self, self.step) or {})
            if metrics:
                self.log(metrics)
                history.append(dict(step = self.step, **metrics))

            if self.step % config.checkpoint_every == 0 or self.step == config.max_steps:
                self.save_checkpoint()

        progress.close()
        self.save_pretrained(self.out_dir / 'pretrained')
        return history

    @torch.no_grad()
    def evaluate(self, dataset: SampleDataset) -> float:
        """Mean loss over `dataset` (each rank its share, in a fixed order and with fixed noise),
        weighted by batch, with the online model."""
        loader = self.make_loader(dataset, shuffle = False)
        self.wrapped.eval()
        total, count = torch.zeros((), device = self.dist.device), 0
        for _ in range(len(loader)):
            batch = loader.next_batch()
            with torch.random.fork_rng(devices = [self.dist.device] if self.dist.device.type == 'cuda' else [], device_type = self.dist.device.type):
                torch.manual_seed(batch_seed(self.config.seed, -1, batch.global_index))
                with self.autocast:
                    total += self.wrapped(batch.samples).float()
            count += 1
        self.wrapped.train()
        return (distributed.sum_across_ranks(total) / distributed.sum_across_ranks(torch.tensor(float(count), device = self.dist.device))).item()

    def log(self, metrics: dict):
        if not self.dist.is_main:
            return
        with open(self.out_dir / 'metrics.jsonl', 'a') as file:
            file.write(json.dumps(dict(step = self.step, **metrics)) + '\n')
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, self.step)

    # checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / 'checkpoints'

    def assert_finite_weights(self, what: str):
        modules = [('model', self.model)] + ([('ema', self.ema)] if self.ema is not None else [])
        for prefix, module in modules:
            for name, value in module.state_dict().items():
                local = value.to_local() if hasattr(value, 'to_local') else value
                if torch.is_tensor(local) and local.is_floating_point() and not bool(torch.isfinite(local).all()):
                    raise NonFiniteError(f'{prefix}.{name} has non-finite values at step {self.step}: not writing the {what}')

    def save_checkpoint(self) -> Path:
        self.assert_finite_weights('checkpoint')
        state = dict(scheduler = self.scheduler.state_dict(), config = asdict(self.config))
        # each rank's own data position: a streaming loader's ranks are at different ones
        return checkpoint.save(self.checkpoint_dir, self.step, self.wrapped, self.optimizer, self.ema, state, self.config.keep_last,
                               rank_state = dict(data = self.loader.state_dict()))

    def resume(self) -> bool:
        """Restores the newest good checkpoint (if any), each rank its own data position, and
        drops the metrics logged after it."""
        state = checkpoint.load_latest(self.checkpoint_dir, self.wrapped, self.optimizer, self.ema)
        if state is not None:
            self.step = state['step']
            self.scheduler.load_state_dict(state['scheduler'])
            self.loader.load_state_dict(state['data'])
        if self.dist.is_main:
            drop_metrics_after(self.out_dir / 'metrics.jsonl', self.step)
        return state is not None

    def save_pretrained(self, directory: Path):
        """The online model and, as `<directory>_ema`, the EMA model, gathered to full tensors on rank 0."""
        self.assert_finite_weights('pretrained model')
        options = StateDictOptions(full_state_dict = True, cpu_offload = True)
        targets = [(self.model, self.wrapped, directory)]
        if self.ema is not None:
            targets.append((self.ema.module, self.ema.module, directory.with_name(directory.name + '_ema')))
        for model, module, path in targets:
            state = get_model_state_dict(module, options = options)
            if self.dist.is_main:
                model.save_pretrained(path, state_dict = state)
        distributed.barrier()


def is_loader(data) -> bool:
    return all(callable(getattr(data, name, None)) for name in ('next_batch', 'state_dict', 'load_state_dict'))


def drop_metrics_after(path: Path, step: int) -> int:
    """Rewrites `metrics.jsonl` without its rows past `step`; returns how many it dropped.

    A run that stops after its last checkpoint has logged steps that the resumed run trains
    again: without this the file would hold those steps twice, the lost run's and the resumed
    run's. A line cut short by a kill mid-write is dropped too (it is the last line, logged after
    the last checkpoint). The file is replaced atomically, so a kill here leaves the old one."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends = True)
    kept = [line for line in lines if logged_step(line) is not None and logged_step(line) <= step]
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(''.join(line if line.endswith('\n') else line + '\n' for line in kept))
    os.replace(tmp, path)
    return len(lines) - len(kept)


def logged_step(line: str) -> int | None:
    """The step of a metrics.jsonl line, or None for a line that is not a whole JSON row."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row.get('step') if isinstance(row, dict) and isinstance(row.get('step'), int) else None
