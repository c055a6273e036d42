import json
import random

import pytest
import torch
from torch import nn

from transfusion_pytorch import Transfusion

from conftest import DIM_LATENTS, random_batch, tiny_model


def fixed_loss(model, batch, seed = 0):
    """The loss of `batch` with times and noise drawn from a fixed seed (the same for every model)."""
    packed = model.pack(batch)
    generator = torch.Generator().manual_seed(seed)
    times = torch.rand(packed.num_spans, generator = generator)
    noise = tuple(torch.randn(latents.shape, generator = generator) for latents in packed.latents)
    return model.compute_loss(packed, times, noise)


def trained_a_little(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr = 1e-2)
    for _ in range(3):
        model(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_round_trip_reproduces_outputs_exactly(tmp_path):
    batch = random_batch(random.Random(0), max_samples = 4) + [[torch.tensor([1, 2]), (1, torch.randn(2, 3, DIM_LATENTS[1]))]]
    model = trained_a_little(tiny_model(flow_loss_weight = (1., 2.), text_loss_weight = 0.5), batch).eval()
    model.save_pretrained(tmp_path)

    loaded = Transfusion.from_pretrained(tmp_path).eval()

    assert loaded.config == model.config
    expected, got = fixed_loss(model, batch), fixed_loss(loaded, batch)
    assert torch.equal(expected.total, got.total)
    assert torch.equal(expected.per_sample_text, got.per_sample_text)
    assert torch.equal(expected.per_sample_flow.nan_to_num(), got.per_sample_flow.nan_to_num())
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key

    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['config']['transformer']['dim'] == 32
    assert not (tmp_path / 'codecs.pt').exists()


def test_encoders_with_weights_are_saved(tmp_path):
    encoder = nn.Linear(3, DIM_LATENTS[0])                  # raw (n, 3) -> latents (n, 6)
    decoder = nn.Linear(DIM_LATENTS[0], 3)
    model = tiny_model(modality_encoder = (encoder, None), modality_decoder = (decoder, None)).eval()
    batch = [[torch.tensor([3, 4]), (0, torch.randn(4, 3)), (1, torch.randn(1, 2, DIM_LATENTS[1]))]]
    model.save_pretrained(tmp_path)

    loaded = Transfusion.from_pretrained(tmp_path).eval()

    assert isinstance(loaded.modality_encoders[0], nn.Linear) and isinstance(loaded.modality_encoders[1], nn.Identity)
    assert torch.equal(loaded.modality_encoders[0].weight, encoder.weight)
    assert torch.equal(loaded.modality_decoders[0].weight, decoder.weight)
    assert torch.equal(fixed_loss(model, batch).total, fixed_loss(loaded, batch).total)

    # encoders passed by hand take the place of the pickled ones
    other = nn.Linear(3, DIM_LATENTS[0])
    by_hand = Transfusion.from_pretrained(tmp_path, modality_encoder = (other, None), modality_decoder = (decoder, None))
    assert by_hand.modality_encoders[0] is other


def test_not_a_pretrained_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match = 'config.json'):
        Transfusion.from_pretrained(tmp_path)


def test_ema_follows_the_online_model():
    model = tiny_model()
    ema = model.create_ema(beta = 0.5)
    before = model.to_logits.weight.detach().clone()
    ema.update()                                                    # first update copies
    assert torch.equal(ema.ema_model.to_logits.weight, before)
    with torch.no_grad():
        model.to_logits.weight.add_(1.)
    ema.update()
    torch.testing.assert_close(ema.ema_model.to_logits.weight, before + 0.5)
    assert not any(p.requires_grad for p in ema.parameters())


def test_every_option_and_pre_post_blocks_round_trip(tmp_path):
    down = nn.Conv2d(DIM_LATENTS[1], 32, kernel_size = 2, stride = 2)
    up = nn.ConvTranspose2d(32, DIM_LATENTS[1], kernel_size = 2, stride = 2)
    model = tiny_model(
        transformer = dict(dim = 32, depth = 2, dim_head = 8, heads = 2, attn_laser = True, attn_softcap = 5.,
                           use_value_residual = True, num_residual_streams = 2, num_residual_fracs = 2),
        channel_first_latent = (False, True), pre_post_transformer_enc_dec = (None, (down, up)),
        model_output_clean = True, reconstruction_loss_weight = 0.1,
    )
    batch = [[torch.tensor([3, 4]), (1, torch.randn(DIM_LATENTS[1], 2, 4)), (0, torch.randn(2, DIM_LATENTS[0]))]]
    model = trained_a_little(model, batch).eval()
    model.save_pretrained(tmp_path)

    loaded = Transfusion.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    assert isinstance(loaded.pre_post[1].encoder, nn.Conv2d)
    assert torch.equal(fixed_loss(model, batch).total, fixed_loss(loaded, batch).total)
