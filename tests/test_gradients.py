"""Every trainable parameter takes part in the loss, under every option of the tables of docs/usage.md.

A parameter that is created but never used takes no gradient, is saved and counted for
nothing, and makes DDP without `find_unused_parameters` fail. Each case below builds the
model with one option (or a group of them), moves every parameter off its starting value (so
that zero-initialised paths, such as the adaLN-zero gates, pass a gradient on), runs one
batch that holds text and both modality types, and checks that every parameter with
`requires_grad` gets a non-zero gradient.

What legitimately gets none, and why:
- the modality encoders and decoders are fixed codecs, frozen on construction
  (`requires_grad` False): the encoder runs before noising, without gradient; the decoder is
  only used to sample and, with the reconstruction loss, to pass a gradient on to the
  transformer. The test checks they are frozen, and that nothing else is;
- a modality type absent from a batch leaves its own projections without gradient; the batch
  here holds every type, and modalities of at least 2 x 2 tokens, since the axial position
  MLPs see coordinate 0 only on a one-cell axis (a zero input gives a zero weight gradient).
"""

import pytest
import torch
from torch import nn

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, tiny_model

TRANSFORMER = dict(dim = 32, depth = 2, dim_head = 8, heads = 2)


def codecs():
    return dict(modality_encoder = (nn.Linear(3, DIM_LATENTS[0]), None), modality_decoder = (nn.Linear(DIM_LATENTS[0], 3), None))


def pre_post_type1():
    down = nn.Conv2d(DIM_LATENTS[1], TRANSFORMER['dim'], kernel_size = 2, stride = 2)
    up = nn.ConvTranspose2d(TRANSFORMER['dim'], DIM_LATENTS[1], kernel_size = 2, stride = 2)
    return dict(channel_first_latent = (False, True), pre_post_transformer_enc_dec = (None, (down, up)))


def pre_post_both_types():
    type0 = (nn.Conv1d(DIM_LATENTS[0], TRANSFORMER['dim'], 1), nn.Conv1d(TRANSFORMER['dim'], DIM_LATENTS[0], 1))
    return dict(channel_first_latent = True, pre_post_transformer_enc_dec = (type0, pre_post_type1()['pre_post_transformer_enc_dec'][1]))


OPTIONS = dict(
    defaults = dict(),
    # transformer options
    unit_offset_norms_off = dict(transformer = dict(unit_offset_norms = False)),
    unet_skips_off = dict(transformer = dict(unet_skips = False)),
    odd_depth_with_skips = dict(transformer = dict(depth = 3)),
    one_block = dict(transformer = dict(depth = 1)),
    qk_rmsnorm_off = dict(transformer = dict(qk_rmsnorm = False)),
    attn_gate_values_off = dict(transformer = dict(attn_gate_values = False)),
    softcap = dict(transformer = dict(attn_softcap = 5.)),
    laser = dict(transformer = dict(attn_laser = True)),
    value_residual = dict(transformer = dict(use_value_residual = True)),
    hyper_connections = dict(transformer = dict(num_residual_streams = 3)),
    frac_connections = dict(transformer = dict(num_residual_fracs = 4)),
    hyper_and_frac = dict(transformer = dict(num_residual_streams = 2, num_residual_fracs = 2)),
    dropout = dict(transformer = dict(dropout = 0.1, attn_dropout = 0.1)),
    wider_ff_and_heads = dict(transformer = dict(ff_expansion_factor = 2., dim_head = 16, heads = 4)),
    language_model_shape = dict(transformer = dict(
        heads = 4, kv_heads = 2, dim_ff_hidden = 40, norm_eps = 1e-5, attn_qkv_bias = True, attn_out_bias = True, tie_embeddings = True,
        rotary_scaling = dict(type = 'llama3', factor = 8., low_freq_factor = 1., high_freq_factor = 4., original_max_position_embeddings = 4),
    )),
    separate_modality_weights = dict(transformer = dict(separate_modality_weights = True, kv_heads = 1)),
    frozen_text_weights = dict(transformer = dict(freeze_text_weights = True)),
    frozen_text_with_separate_weights = dict(transformer = dict(freeze_text_weights = True, separate_modality_weights = True, tie_embeddings = True)),
    # modality options
    no_pos_emb = dict(add_pos_emb = False),
    any_number_of_axes = dict(modality_default_shape = None, modality_num_dim = None),
    pre_post_one_type = pre_post_type1,
    pre_post_every_type = pre_post_both_types,
    encoders_and_decoders = codecs,
    model_output_clean = dict(model_output_clean = True),
    reconstruction_loss = lambda: dict(**codecs(), reconstruction_loss_weight = 0.5),
    reconstruction_loss_without_codecs = dict(reconstruction_loss_weight = 0.5),
    velocity_consistency = dict(velocity_consistency_loss_weight = 0.5),
    everything = lambda: dict(
        **pre_post_type1(), **codecs(), model_output_clean = True, reconstruction_loss_weight = 0.5,
        transformer = dict(depth = 3, attn_softcap = 5., attn_laser = True, use_value_residual = True, num_residual_streams = 2, num_residual_fracs = 2),
    ),
)


def build(name):
    options = OPTIONS[name]
    options = dict(options() if callable(options) else options)
    options['transformer'] = {**TRANSFORMER, **options.get('transformer', {})}
    return tiny_model(prob_uncond = 0., **options)


def batch_for(model):
    """Text and both modality types, every modality at least 2 cells wide on each axis (4 x 4
    under a stride-2 down block), raw where the type has an encoder."""
    type0 = torch.randn(3, 3) if isinstance(model.modality_encoders[0], nn.Linear) else torch.randn(3, DIM_LATENTS[0])
    if model.config.channel_first_latent[0]:
        type0 = type0.T
    type1 = lambda *shape: torch.randn(DIM_LATENTS[1], *shape) if model.config.channel_first_latent[1] else torch.randn(*shape, DIM_LATENTS[1])
    text = lambda n: torch.randint(0, NUM_TEXT_TOKENS, (n,))
    return [
        [text(3), (0, type0), text(2), (1, type1(4, 4)), text(2)],
        [(1, type1(4, 2)), text(3)],
    ]


@pytest.mark.parametrize('name', list(OPTIONS))
def test_every_trainable_parameter_gets_a_gradient(name, one_thread):
    torch.manual_seed(0)
    model = build(name)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.train(name == 'dropout')

    kwargs = {}
    if name in ('velocity_consistency', 'everything'):
        ema = model.create_ema()
        with torch.no_grad():
            for parameter in ema.ema_model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
        kwargs['velocity_consistency_ema_model'] = ema

    model(batch_for(model), **kwargs).backward()

    codec_ids = {id(p) for codec in (*model.modality_encoders, *model.modality_decoders) for p in codec.parameters()}
    if model.config.transformer.freeze_text_weights:        # the text weights, and the text ids' rows of the tables
        codec_ids |= {id(p) for module in model.transformer.text_modules() for p in module.parameters()}
        codec_ids |= {id(model.token_embed.weight), id(model.to_logits.weight)}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert {id(p) for p in model.parameters() if not p.requires_grad} == codec_ids, frozen

    without = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not bool(p.grad.abs().sum() > 0))]
    assert without == [], f'{name}: no gradient for {without}'


def test_pre_post_types_have_no_linear_projections():
    model = build('pre_post_one_type')
    keys = set(model.state_dict())
    assert not any(key.startswith(('latent_to_model.1.', 'model_to_velocity.1.')) for key in keys)
    # the other type keeps its keys, under the same names as in a model without down / up blocks
    plain = {key for key in build('defaults').state_dict() if key.startswith(('latent_to_model.', 'model_to_velocity.'))}
    assert {key for key in keys if key.startswith(('latent_to_model.', 'model_to_velocity.'))} == {k for k in plain if '.0.' in k}
