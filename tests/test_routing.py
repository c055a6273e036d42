"""Separate modality weights (`routing.py`): text rows on the text weights, latent rows on their
own copies, in one attention."""

import random

import torch

from transfusion_pytorch.packing import pack
from transfusion_pytorch.routing import Routing

from conftest import random_batch, tiny_model

TRANSFORMER = dict(dim = 32, depth = 2, dim_head = 8, heads = 4, kv_heads = 2)


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def loss_with_fixed_noise(model, batch, seed = 0):
    packed = pack(model.to_samples(batch)[0], model.vocab)
    generator = torch.Generator().manual_seed(seed)
    times = torch.rand(packed.num_spans, generator = generator)
    noise = tuple(torch.randn(latents.shape, generator = generator) for latents in packed.latents)
    return model.compute_loss(packed, times, noise)


def test_routing_orders_text_rows_first_and_back():
    is_modality = torch.tensor([False, True, True, False, True, False])
    routing = Routing(is_modality)
    x = torch.arange(6)
    assert routing.num_text == 3
    assert routing.to_routed(x).tolist() == [0, 3, 5, 1, 2, 4]
    assert torch.equal(routing.to_sequence(routing.to_routed(x)), x)
    joined = routing.apply(routing.to_routed(x), lambda t: t * 10, lambda t: -t)
    assert routing.to_sequence(joined).tolist() == [0, -1, -2, 30, -4, 50]
    assert Routing(torch.zeros(4, dtype = torch.bool)).is_identity and Routing(torch.ones(4, dtype = torch.bool)).is_identity


def test_separate_weights_equal_shared_ones_when_the_copies_match(one_thread):
    """Copies set to the shared weights, and the shared adaLN moved onto the modality path:
    the same loss and gradients as the shared model, on random mixed batches (so the routing
    puts every row back where it belongs)."""
    torch.manual_seed(0)
    shared = perturbed(tiny_model(transformer = TRANSFORMER))
    separate = tiny_model(transformer = TRANSFORMER | dict(separate_modality_weights = True))
    state = shared.state_dict()
    for name, value in list(state.items()):
        for norm in ('attn_norm', 'ff_norm'):
            if f'{norm}.to_modulation' in name:
                state[name.replace(norm, f'modality_{norm}')] = state.pop(name)
    missing, unexpected = separate.load_state_dict(state, strict = False)
    assert unexpected == [] and all('modality_' in name for name in missing)
    separate.transformer.copy_text_weights_to_modality()

    for seed in range(3):
        batch = random_batch(random.Random(seed))
        a, b = loss_with_fixed_noise(shared, batch, seed), loss_with_fixed_noise(separate, batch, seed)
        torch.testing.assert_close(b.total, a.total, atol = 1e-5, rtol = 1e-5)
        grad_a = torch.autograd.grad(a.total, shared.transformer.blocks[1].attn.to_out.weight)
        # the shared projection's gradient is the sum of the text and modality copies' gradients
        attn = separate.transformer.blocks[1].attn
        grad_b = torch.autograd.grad(b.total, (attn.to_out.weight, attn.modality_to_out.weight), materialize_grads = True)
        torch.testing.assert_close(grad_b[0] + grad_b[1], grad_a[0], atol = 1e-5, rtol = 1e-4)


def test_latent_rows_use_the_modality_weights_and_text_rows_do_not(one_thread):
    torch.manual_seed(0)
    model = perturbed(tiny_model(transformer = TRANSFORMER | dict(separate_modality_weights = True))).eval()
    text = torch.randint(0, 32, (2, 9))
    mixed = [[torch.tensor([1, 2, 3]), (0, torch.randn(3, 6)), torch.tensor([4, 5])]]
    text_before, mixed_before = model(text, return_loss = False), loss_with_fixed_noise(model, mixed)
    with torch.no_grad():
        for block in model.transformer.blocks:
            block.modality_ff.proj_out.weight.mul_(2.)
            block.attn.modality_to_qkv.weight.mul_(2.)
    assert torch.equal(model(text, return_loss = False), text_before)
    assert not torch.allclose(loss_with_fixed_noise(model, mixed).flow[0], mixed_before.flow[0])
