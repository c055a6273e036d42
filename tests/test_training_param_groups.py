import torch
from torch import nn

from transfusion_pytorch.training.trainer import param_groups

from conftest import tiny_model


def names_in(model, group):
    ids = {id(p) for p in group['params']}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_unit_offset_norms_decay_towards_identity_others_do_not_decay():
    model = tiny_model(transformer = dict(dim = 32, depth = 2, dim_head = 8, heads = 2, unit_offset_norms = True))
    decay, no_decay = (names_in(model, group) for group in param_groups(model, 0.1, decay_all = False))
    assert 'transformer.final_norm.weight' in decay                    # stored as gain - 1
    assert 'token_embed.weight' in no_decay
    assert all(name.endswith('bias') or 'embed' in name or 'norm' in name for name in no_decay)
    assert not any(name.endswith('bias') for name in decay)

    plain = tiny_model(transformer = dict(dim = 32, depth = 2, dim_head = 8, heads = 2, unit_offset_norms = False))
    decay, no_decay = (names_in(plain, group) for group in param_groups(plain, 0.1, decay_all = False))
    assert 'transformer.final_norm.weight' in no_decay                  # decay would pull a plain gain to zero

    everything = param_groups(plain, 0.1, decay_all = True)
    assert sum(p.numel() for p in everything[0]['params']) == sum(p.numel() for p in plain.parameters())


def test_weight_decay_moves_a_unit_offset_gain_towards_one():
    model = tiny_model(transformer = dict(dim = 32, depth = 1, dim_head = 8, heads = 2))
    norm = model.transformer.final_norm
    with torch.no_grad():
        norm.weight.fill_(0.5)                                          # gain 1.5
    optimizer = torch.optim.AdamW(param_groups(model, 0.5, decay_all = False), lr = 0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert (norm.weight < 0.5).all() and (norm.weight > 0).all()        # gain moves from 1.5 towards 1
