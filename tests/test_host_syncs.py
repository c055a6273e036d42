"""A training step makes the host wait for the device only where it must (issue 21 item 2).

On a GPU every `.item()`, `.tolist()`, `bool(tensor)`, `nonzero`, boolean-mask index or copy to
the CPU of a device tensor stalls the host until the device has caught up, so a small model's
step costs the host's time and the device's one after the other. On CPU they are cheap, but the
same calls run, so they are counted here: by a `TorchFunctionMode` for the Python-level calls and
a `TorchDispatchMode` for the aten ops that read device memory from C++ (`_local_scalar_dense`,
`nonzero`, ...), each counted once with the line that made it.

Packing is host-side by design (the loader's samples are Python lists of CPU tensors, packed and
then moved to the device; `packing.py`), so `loader.next_batch` and `model.pack` are not counted.
Everything from the packed batch on the device to the end of the optimizer and EMA step is.
"""

import collections
import contextlib
import traceback

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from transfusion_pytorch.training import TrainConfig, Trainer

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, tiny_model


pytestmark = pytest.mark.usefixtures('one_thread')

SYNC_FUNCTIONS = {
    Tensor.item, Tensor.tolist, Tensor.cpu, Tensor.numpy, Tensor.__bool__, Tensor.__int__, Tensor.__float__,
    Tensor.__index__, Tensor.nonzero, torch.nonzero, torch.equal, torch.allclose, torch.masked_select, Tensor.masked_select,
    torch.unique, Tensor.unique, torch.unique_consecutive,
}
SYNC_OPS = {'_local_scalar_dense', 'nonzero', 'masked_select', '_unique2', 'unique_consecutive', 'unique_dim'}


class HostSyncs:
    """Counts the calls that wait for the device, by (call, file:line of the caller)."""

    def __init__(self):
        self.calls = collections.Counter()
        self.counting, self.inside = True, 0

    def record(self, name: str):
        frames = [f for f in traceback.extract_stack()[:-2] if 'transfusion_pytorch' in f.filename or '/torch/' in f.filename]
        where = f'{frames[-1].filename.rsplit("/", 2)[-1]}:{frames[-1].lineno}' if frames else '?'
        self.calls[f'{name} at {where}'] += 1

    @contextlib.contextmanager
    def paused(self):
        counting, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = counting

    def pausing(self, fn):
        def wrapped(*args, **kwargs):
            with self.paused():
                return fn(*args, **kwargs)
        return wrapped

    @contextlib.contextmanager
    def __call__(self):
        with FunctionCounter(self), OpCounter(self):
            yield self


class FunctionCounter(TorchFunctionMode):
    def __init__(self, syncs: HostSyncs):
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func, types, args = (), kwargs = None):
        counted = self.syncs.counting and self.syncs.inside == 0 and (func in SYNC_FUNCTIONS or is_mask_index(func, args))
        if counted:
            self.syncs.record(getattr(func, '__name__', str(func)))
        self.syncs.inside += counted        # the aten ops under a counted call are the same sync
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.syncs.inside -= counted


def is_mask_index(func, args) -> bool:
    """x[mask] and x[mask] = y with a bool tensor: the size of the result depends on the values."""
    if func not in (Tensor.__getitem__, Tensor.__setitem__) or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in index)


class OpCounter(TorchDispatchMode):
    def __init__(self, syncs: HostSyncs):
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args = (), kwargs = None):
        if self.syncs.counting and self.syncs.inside == 0 and func.overloadpacket.__name__ in SYNC_OPS:
            self.syncs.record(f'aten.{func.overloadpacket.__name__}')
        return func(*args, **(kwargs or {}))


def mixed_dataset(size = 24, equal_lengths = False):
    """Text, modalities of both types and text-only samples, of different lengths (per-sample
    attention) or all of one length (padded attention)."""
    generator = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, NUM_TEXT_TOKENS, (n,), generator = generator)
    samples = []
    for i in range(size):
        if equal_lengths:
            samples.append([text(3), (0, torch.randn(2, DIM_LATENTS[0], generator = generator)), text(2)])
        elif i % 3 == 0:
            samples.append([text(2 + i % 5)])
        elif i % 3 == 1:
            samples.append([text(3), (0, torch.randn(1 + i % 3, DIM_LATENTS[0], generator = generator)), text(2)])
        else:
            samples.append([(1, torch.randn(2, 1 + i % 2, DIM_LATENTS[1], generator = generator)), text(4)])
    return samples


def make_trainer(tmp_path, data, **overrides):
    torch.manual_seed(0)
    options = dict(out_dir = str(tmp_path), max_steps = 100, max_tokens = 64, progress = False, ema_beta = 0.9,
                   log_every = 100, checkpoint_every = 100, check_finite_every = 100)
    options.update(overrides)
    return Trainer(tiny_model(), data, TrainConfig(**options))


def count_step_syncs(trainer, steps: int, warmup: int = 2) -> collections.Counter:
    """The host syncs of `steps` training steps after `warmup` ones, packing not counted."""
    for _ in range(warmup):
        trainer.train_step()
    syncs = HostSyncs()
    trainer.loader.next_batch = syncs.pausing(trainer.loader.next_batch)
    trainer.model.pack = syncs.pausing(trainer.model.pack)
    with syncs():
        for _ in range(steps):
            trainer.train_step()
    return syncs.calls


def test_the_counter_sees_each_kind_of_sync():
    syncs = HostSyncs()
    x = torch.randn(5)
    with syncs():
        x.sum().item()
        x.tolist()
        bool(x.sum() > 0)
        int(x.argmax())
        (x > 0).nonzero()
        x[x > 0]
        x.cpu()
        with syncs.paused():
            x.sum().item()
    kinds = sorted(key.split(' at ')[0] for key in syncs.calls.elements())
    assert kinds == sorted(['item', 'tolist', '__bool__', '__int__', 'nonzero', '__getitem__', 'cpu']), syncs.calls


@pytest.mark.parametrize('equal_lengths', [False, True], ids = ['per-sample attention', 'padded attention'])
@pytest.mark.parametrize('grad_accum', [1, 2])
def test_training_steps_make_no_host_sync(tmp_path, equal_lengths, grad_accum):
    """Forward, loss, backward, clipping, the non-finite flag, the fused AdamW step, the
    schedule and the EMA: not one sync in 4 steps that neither log, check nor checkpoint.

    None remain. The ones this removed: the mask layout's sample lengths and per-sample
    modality test (now host integers from packing), the text-target positions' `nonzero`
    (found when packing), the non-finite guard's `.tolist()` every step (now a device flag
    read every `check_finite_every` steps), the EMA's `num_updates == 0` and the for-loop
    AdamW's `step.item()` per parameter (now the fused kernel, on CPU too)."""
    trainer = make_trainer(tmp_path, mixed_dataset(equal_lengths = equal_lengths), grad_accum = grad_accum)
    calls = count_step_syncs(trainer, steps = 4)
    assert calls == collections.Counter(), f'host syncs in 4 steps: {dict(calls)}'


def test_the_nonfinite_flag_is_read_once_every_check_finite_every_steps(tmp_path):
    """The one sync left by design: reading the flags of the steps since the last read."""
    trainer = make_trainer(tmp_path, mixed_dataset(), check_finite_every = 3)
    calls = count_step_syncs(trainer, steps = 6, warmup = 3)        # checks after steps 6 and 9
    assert sum(calls.values()) == 2 and all(key.startswith('tolist at nonfinite.py') for key in calls), dict(calls)


def test_separate_modality_weights_make_no_host_sync(tmp_path):
    """Routing rows to the text and modality weights splits the residual stream at the number
    of text rows: a size, taken from the packed batch's host-side records."""
    torch.manual_seed(0)
    config = TrainConfig(out_dir = str(tmp_path), max_steps = 100, max_tokens = 64, progress = False, ema_beta = None,
                         log_every = 100, checkpoint_every = 100, check_finite_every = 100)
    trainer = Trainer(tiny_model(transformer = dict(dim = 32, depth = 2, dim_head = 8, heads = 2, separate_modality_weights = True)),
                      mixed_dataset(), config)
    calls = count_step_syncs(trainer, steps = 2)
    assert calls == collections.Counter(), dict(calls)


def test_the_packed_batch_moves_to_the_device_without_blocking():
    """A blocking host-to-GPU copy synchronises the stream: the batch's copies are queued instead."""
    from conftest import overfit_batch
    from transfusion_pytorch.packing import PackedBatch

    model = tiny_model()
    packed = model.pack(overfit_batch())
    calls = []

    class Copies(TorchFunctionMode):
        def __torch_function__(self, func, types, args = (), kwargs = None):
            if func is Tensor.to:
                calls.append((kwargs or {}).get('non_blocking', False))
            return func(*args, **(kwargs or {}))

    with Copies():
        moved = packed.to('cpu')
    tensors = [v for v in vars(packed).values() if torch.is_tensor(v)] + \
              [t for v in vars(packed).values() if isinstance(v, tuple) and v and all(torch.is_tensor(t) for t in v) for t in v]
    assert len(calls) == len(tensors) and all(calls)
    assert isinstance(moved, PackedBatch) and torch.equal(moved.text_index, packed.text_index)


def test_the_flex_attention_block_mask_is_built_without_a_sync():
    """On CUDA the layout is a flex attention block mask, built each step: on the device, unread."""
    from conftest import overfit_batch
    from transfusion_pytorch.masks import build_layout

    packed = tiny_model().pack(overfit_batch())
    build_layout(packed, use_flex_attn = True)
    syncs = HostSyncs()
    with syncs():
        build_layout(packed, use_flex_attn = True)
        build_layout(packed, use_flex_attn = True, pad_to_multiple = 128)
    assert syncs.calls == collections.Counter(), dict(syncs.calls)
