"""The GPU training path, checked on CPU (issue 17): compiled blocks on packed batches of changing
length, activation checkpointing, and compiled flex attention's forward pass. FSDP2 with
checkpointing and compile across two processes: `test_training_distributed.py`.

Tolerances:
- compiled blocks (Inductor) against eager, fp32: loss to 1e-5 relative, every gradient to
  atol 1e-5 / rtol 1e-3, as in `test_performance_equivalence.py` (the kernels sum in another
  order); the eager side runs unpadded, so the padding is checked too;
- activation checkpointing against none, fp32 eager: bitwise equal (the blocks run again with
  the same ops in the same order, dropout replayed from the saved RNG state);
- compiled flex attention's forward against SDPA: atol 1e-5, rtol 1e-4.

Compiles are slow on a small CPU: Inductor compiles once per test here, and the trainer test
counts graphs with the 'aot_eager' backend (dynamo decides when to compile again, whatever the
backend).
"""

import copy
import random
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from transfusion_pytorch.attention import attend
from transfusion_pytorch.masks import build_layout
from transfusion_pytorch.training import TrainConfig, Trainer
from transfusion_pytorch.training.parallelize import apply_activation_checkpointing, apply_compile, parallelize
from transfusion_pytorch.training.distributed import DistInfo

from conftest import NUM_TEXT_TOKENS, random_batch, random_sample, tiny_model
from test_performance_equivalence import FP32, loss_and_grads, setup
from test_training_data import ListDataset


def compiled_graphs() -> int:
    return counters['stats']['unique_graphs']


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def batches_of_changing_length(model, count: int, max_tokens: int):
    """(packed, times, noise) for `count` mixed batches of different lengths, each at most `max_tokens`."""
    rng, seen, out = random.Random(5), set(), []
    while len(out) < count:
        packed = model.pack(random_batch(rng, max_samples = 4))
        if packed.num_tokens > max_tokens or packed.num_tokens in seen or packed.num_spans == 0:
            continue
        seen.add(packed.num_tokens)
        out.append((packed, torch.rand(packed.num_spans), tuple(torch.randn_like(latents) for latents in packed.latents)))
    return out


def test_compiled_blocks_match_eager_on_batches_of_changing_length(one_thread, fresh_dynamo):
    eager, *_ = setup(0, transformer = dict(dim = 32, depth = 2, dim_head = 8, heads = 4))
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, 'inductor', max_tokens = 100)
    assert compiled.pad_to_multiple == 128

    batches = batches_of_changing_length(eager, 3, max_tokens = 100)
    assert len({packed.num_spans for packed, *_ in batches}) > 1
    for packed, times, noise in batches:
        eager_loss, eager_grads = loss_and_grads(eager, packed, times, noise)
        loss, grads = loss_and_grads(compiled, packed, times, noise)
        torch.testing.assert_close(loss, eager_loss, rtol = 1e-5, atol = 1e-6)
        assert grads.keys() == eager_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], eager_grads[name], **FP32, msg = lambda m: f'{name}: {m}')

    # every block shares one graph: the token count is padded, the number of spans dynamic
    assert compiled_graphs() == 1
    assert compiled.state_dict().keys() == eager.state_dict().keys()       # compiled in place: no `_orig_mod.` names


def test_twenty_batches_of_changing_length_compile_at_most_3_graphs(one_thread, fresh_dynamo, tmp_path):
    """A compiled, checkpointed run through the trainer: its batches change length with the
    data and with condition dropout, and a few hold text only. Its losses are the eager run's."""
    rng = random.Random(0)
    samples = [random_sample(rng) for _ in range(40)] + [[torch.randint(0, NUM_TEXT_TOKENS, (50,))] for _ in range(3)]
    data = ListDataset(samples)

    def run(name, **options):
        torch.manual_seed(0)
        model = tiny_model(prob_uncond = 0.3)
        lengths = []
        pack = model.pack
        model.pack = lambda *args, **kwargs: lengths.append(pack(*args, **kwargs)) or lengths[-1]
        config = TrainConfig(out_dir = str(tmp_path / name), max_steps = 20, max_tokens = 60, log_every = 1, checkpoint_every = 100,
                             progress = False, ema_beta = None, **options)
        history = Trainer(model, data, config).train()
        return [row['loss'] for row in history], lengths

    eager_losses, _ = run('eager')
    losses, packed = run('compiled', compile = True, compile_backend = 'aot_eager', activation_checkpointing = 'full')

    assert len(packed) == 20
    assert len({p.num_tokens for p in packed}) >= 10 and any(p.num_spans == 0 for p in packed)
    assert compiled_graphs() <= 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol = 1e-5, atol = 1e-6)


@pytest.mark.parametrize('mode, wrapped', [('selective', [False, True, False, True]), ('full', [True] * 4)])
def test_activation_checkpointing_gives_the_same_gradients(mode, wrapped, one_thread):
    """fp32, bitwise: with dropout (replayed in the recomputation), value residuals (the first
    block hands its values to the others) and hyper-connections."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    transformer = dict(dim = 32, depth = 4, dim_head = 8, heads = 4, dropout = 0.1, attn_dropout = 0.1,
                       use_value_residual = True, num_residual_streams = 2)
    model, packed, times, noise = setup(1, transformer = transformer)
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed, mode)
    assert [isinstance(block, CheckpointWrapper) for block in checkpointed.transformer.blocks] == wrapped

    def run(m):
        torch.manual_seed(3)
        m.train()
        return loss_and_grads(m, packed, times, noise)

    loss, grads = run(model)
    checkpointed_loss, checkpointed_grads = run(checkpointed)
    checkpointed_grads = {name.replace('_checkpoint_wrapped_module.', ''): grad for name, grad in checkpointed_grads.items()}
    assert torch.equal(checkpointed_loss, loss)
    assert checkpointed_grads.keys() == grads.keys()
    assert all(torch.equal(checkpointed_grads[name], grads[name]) for name in grads)
    assert checkpointed.state_dict().keys() == model.state_dict().keys()    # checkpoints keep their names


def test_checkpointing_frees_activations(one_thread):
    """What the backward pass keeps: less with 'selective', least with 'full'."""
    from transformer_helpers import saved_storage_bytes

    model, packed, times, noise = setup(2, transformer = dict(dim = 32, depth = 4, dim_head = 8, heads = 4))
    saved = {}
    for mode in (None, 'selective', 'full'):
        m = copy.deepcopy(model)
        apply_activation_checkpointing(m, mode)
        saved[mode] = saved_storage_bytes(lambda: m.compute_loss(packed, times, noise).total)
    assert saved['full'] < saved['selective'] < saved[None]


def test_value_residuals_with_compile_and_checkpointing_are_refused():
    model = tiny_model(transformer = dict(dim = 32, depth = 2, dim_head = 8, heads = 2, use_value_residual = True))
    with pytest.raises(ValueError, match = 'use_value_residual'):
        parallelize(model, None, DistInfo(0, 0, 1, torch.device('cpu')), activation_checkpointing = 'full', compile_backend = 'aot_eager')


def test_compiled_flex_attention_forward_matches_sdpa(one_thread, fresh_dynamo):
    """Inductor's CPU flex kernel (forward only: PyTorch has no flex backward on CPU), with the
    block mask the model builds for a compiled run (padded), on mixed packed batches; one graph
    for all of them."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, fullgraph = True)
    for seed in range(3):
        packed = tiny_model().pack(random_batch(random.Random(seed), max_samples = 6))
        n = packed.num_tokens
        q, k, v = (torch.randn(n, 4, 8) for _ in range(3))
        layout = build_layout(packed, use_flex_attn = True, pad_to_multiple = 128)
        padded = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, layout.num_tokens - n)).transpose(0, 1)[None] for t in (q, k, v)]
        out = flex(*padded, block_mask = layout.block_mask)[0].transpose(0, 1)[:n]           # (N, heads, dim_head)
        torch.testing.assert_close(out, attend(q, k, v, build_layout(packed)), atol = 1e-5, rtol = 1e-4)
    assert compiled_graphs() == 1


def test_a_compiled_model_still_generates(one_thread, fresh_dynamo):
    """Generation runs a new shape at every step (a KV cache); the blocks compiled for training
    run it eagerly: nothing is compiled, and the samples are the eager model's."""
    torch.manual_seed(0)
    eager = tiny_model()
    compiled = copy.deepcopy(eager)
    apply_activation_checkpointing(compiled, 'selective')
    apply_compile(compiled, 'aot_eager', max_tokens = 60)

    prompt = torch.randint(0, NUM_TEXT_TOKENS, (2, 3))
    assert torch.equal(compiled.generate_text_only(prompt, 12, seed = 0), eager.generate_text_only(prompt, 12, seed = 0))
    samples = [model.sample(seed = 0, max_length = 24, modality_steps = 2, force_modality_at_start = 1) for model in (eager, compiled)]
    flat = [[t if torch.is_tensor(t) else t[1] for t in sample] for sample in samples]
    assert len(flat[0]) == len(flat[1]) and all(torch.equal(a, b) for a, b in zip(*flat))
    assert compiled_graphs() == 0


def test_a_run_resumes_with_checkpointing_and_compile_switched_on(one_thread, fresh_dynamo, tmp_path):
    """Checkpoints keep their names under both (a digits run may be resumed with either key
    changed): 2 plain steps, then 2 checkpointed and compiled ones, end where 4 plain steps do
    (a constant learning rate: the schedule follows max_steps)."""
    rng = random.Random(1)
    data = ListDataset([random_sample(rng) for _ in range(16)])

    def run(out_dir, steps, **options):
        torch.manual_seed(0)
        config = TrainConfig(out_dir = str(out_dir), max_steps = steps, max_tokens = 60, checkpoint_every = 2, log_every = 1,
                             progress = False, ema_beta = 0.9, min_lr_ratio = 1., **options)
        trainer = Trainer(tiny_model(), data, config)
        trainer.train()
        return trainer.model.state_dict(), trainer.ema.module.state_dict()

    straight = run(tmp_path / 'straight', 4)
    run(tmp_path / 'resumed', 2)
    resumed = run(tmp_path / 'resumed', 4, activation_checkpointing = 'full', compile = True, compile_backend = 'aot_eager')
    for expected, got in zip(straight, resumed):
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol = 1e-5, rtol = 1e-5, msg = lambda m: f'{name}: {m}')
