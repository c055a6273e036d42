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
    assert all(name.endswith('bias') or 'embed' in name or 'norm' in name or 'skip_projs' in name for name in no_decay)
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


def test_identity_initialised_weights_do_not_decay():
    """U-ViT skip projections and hyper-connection static matrices start at the identity;
    decay would pull them to zero, so they are in the group without decay (unless decay_all)."""
    model = tiny_model(transformer = dict(dim = 32, depth = 4, dim_head = 8, heads = 2, num_residual_streams = 2, num_residual_fracs = 2))
    decay, no_decay = (names_in(model, group) for group in param_groups(model, 0.1, decay_all = False))
    skips = {f'transformer.skip_projs.{i}.weight' for i in range(2)}
    statics = {name for name, _ in model.named_parameters() if name.rsplit('.', 1)[-1] in ('static_read', 'static_mix', 'static_write')}
    assert len(statics) == 4 * 2 * 3                                    # 4 blocks, 2 branches, read / mix / write
    assert skips | statics <= no_decay and not (skips | statics) & decay
    # their neighbours keep their decay: the dynamic weights and scales, the projections
    assert {'transformer.blocks.0.mixes.0.to_dynamic.weight', 'transformer.blocks.0.mixes.0.dynamic_scale',
            'transformer.blocks.0.attn.to_qkv.weight'} <= decay
    assert skips | statics <= names_in(model, param_groups(model, 0.1, decay_all = True)[0])

    # one AdamW step on a zero gradient leaves them exactly where they were
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(param_groups(model, 0.5, decay_all = False), lr = 0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[name], before[name]) for name in skips | statics)
    assert not torch.equal(params['transformer.blocks.0.attn.to_qkv.weight'], before['transformer.blocks.0.attn.to_qkv.weight'])
