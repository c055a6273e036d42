import json
import random

import pytest
import torch
from safetensors import safe_open
from torch import nn

from transfusion_pytorch import Transfusion

from conftest import DIM_LATENTS, random_batch, tiny_model
from test_options import make_pre_post


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


# shared weights, atomic writes

def tied_pre_post(dim_latent = DIM_LATENTS[1], dim = 32):
    down = nn.Conv2d(dim_latent, dim, kernel_size = 2, stride = 2)
    up = nn.ConvTranspose2d(dim, dim_latent, kernel_size = 2, stride = 2)
    up.weight = down.weight                                         # (dim, dim_latent, 2, 2) both
    return down, up


def shared_models():
    """(name, model, batch, which parameters must be one tensor after loading)"""
    down, up = tied_pre_post()
    tied_up = tiny_model(channel_first_latent = (False, True), pre_post_transformer_enc_dec = (None, (down, up)))
    pair = tied_pre_post(dim_latent = 4)
    one_pair_two_types = tiny_model(dim_latent = (4, 4), modality_default_shape = ((2, 2), (2, 2)), channel_first_latent = True,
                                    pre_post_transformer_enc_dec = (pair, pair))
    tied_head = tiny_model()
    tied_head.to_logits.weight = tied_head.token_embed.weight
    image = lambda m: (m, torch.randn(4, 4, 2))
    return [
        ('up tied to down', tied_up, [[torch.tensor([1, 2]), image(1)]], [('pre_post.1.encoder.weight', 'pre_post.1.decoder.weight')]),
        ('one pair for two types', one_pair_two_types, [[torch.tensor([1]), image(0), image(1)]],
         [('pre_post.0.encoder.weight', 'pre_post.1.encoder.weight', 'pre_post.0.decoder.weight', 'pre_post.1.decoder.weight'),
          ('pre_post.0.encoder.bias', 'pre_post.1.encoder.bias')]),
        ('output head tied to the embedding', tied_head, [[torch.tensor([1, 2, 3]), (0, torch.randn(2, DIM_LATENTS[0]))]],
         [('to_logits.weight', 'token_embed.weight')]),
    ]


@pytest.mark.parametrize('case', range(3), ids = [case[0] for case in shared_models()])
def test_shared_weights_are_saved_once_and_shared_again_on_load(tmp_path, case):
    name, model, batch, groups = shared_models()[case]
    model = trained_a_little(model, batch).eval()
    model.save_pretrained(tmp_path)

    with safe_open(tmp_path / 'model.safetensors', framework = 'pt') as file:
        keys, metadata = set(file.keys()), file.metadata()
    for group in groups:
        assert len(keys & set(group)) == 1, (group, keys & set(group))          # written once
        assert all(metadata[alias] in group for alias in set(group) - keys)     # the others are aliases

    loaded = Transfusion.from_pretrained(tmp_path)
    for group in groups:
        assert len({id(loaded.get_parameter(n)) for n in group}) == 1, group    # one tensor again
    assert torch.equal(fixed_loss(model, batch).total, fixed_loss(loaded, batch).total)

    with torch.no_grad():                                                       # and they stay tied in training
        loaded.get_parameter(groups[0][0]).add_(1.)
    assert torch.equal(loaded.get_parameter(groups[0][0]), loaded.get_parameter(groups[0][-1]))


def test_a_failed_save_leaves_the_previous_model(tmp_path, monkeypatch):
    model = tiny_model(modality_encoder = (nn.Linear(3, DIM_LATENTS[0]), None)).eval()
    target = tmp_path / 'pretrained'

    def fail(*args, **kwargs):
        raise OSError('disk full')
    import transfusion_pytorch.pretrained as pretrained
    monkeypatch.setattr(pretrained.torch, 'save', fail)                         # codecs.pt is written last
    with pytest.raises(OSError, match = 'disk full'):
        model.save_pretrained(target)
    assert not target.exists() and list(tmp_path.iterdir()) == []               # nothing half-written, no temporary left
    monkeypatch.undo()

    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    changed = tiny_model(modality_encoder = (nn.Linear(3, DIM_LATENTS[0]), None)).eval()
    monkeypatch.setattr(pretrained.torch, 'save', fail)
    with pytest.raises(OSError):
        changed.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before       # the previous model, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ['pretrained']
    monkeypatch.undo()

    changed.save_pretrained(target)                                             # a good save replaces it
    assert torch.equal(Transfusion.from_pretrained(target).to_logits.weight, changed.to_logits.weight)


def test_save_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match = r'holds files that are not part of a saved model \(notes.txt\)'):
        tiny_model().save_pretrained(tmp_path)
    assert (tmp_path / 'notes.txt').read_text() == 'mine'
    with pytest.raises(ValueError, match = 'notes.txt exists and is not a directory'):
        tiny_model().save_pretrained(tmp_path / 'notes.txt')


# from_pretrained: codecs passed and saved, eval mode

def model_with_every_codec():
    encoder, decoder = nn.Linear(3, DIM_LATENTS[0]), nn.Linear(DIM_LATENTS[0], 3)
    return tiny_model(modality_encoder = (encoder, None), modality_decoder = (decoder, None),
                      channel_first_latent = (False, True), pre_post_transformer_enc_dec = make_pre_post())


def test_passed_codecs_are_merged_with_the_saved_ones(tmp_path, caplog):
    model = model_with_every_codec().eval()
    batch = [[torch.tensor([3, 4]), (0, torch.randn(4, 3)), (1, torch.randn(DIM_LATENTS[1], 2, 4))]]
    model.save_pretrained(tmp_path)

    # only an encoder: the saved decoder and down / up blocks are kept; the replacement is named
    other = nn.Linear(3, DIM_LATENTS[0])
    with caplog.at_level('INFO', logger = 'transfusion_pytorch.pretrained'):
        loaded = Transfusion.from_pretrained(tmp_path, modality_encoder = (other, None))
    assert 'the modules passed replace the saved modality_encoder[0]' in caplog.text
    assert 'decoder' not in caplog.text
    assert loaded.modality_encoders[0] is other
    assert torch.equal(loaded.modality_decoders[0].weight, model.modality_decoders[0].weight)
    assert isinstance(loaded.pre_post[1].encoder, nn.Conv2d)
    sample = loaded.sample(max_length = 16, force_modality_at_start = (0, (2,)), seed = 0)
    assert sample[1][1].shape == (2, 3)                                         # decoded by the saved decoder

    # encoder and decoder passed for a model that also has down / up blocks (the call docs/training.md shows)
    by_hand = Transfusion.from_pretrained(tmp_path, modality_encoder = (model.modality_encoders[0], None),
                                          modality_decoder = (model.modality_decoders[0], None))
    assert torch.equal(fixed_loss(model, batch).total, fixed_loss(by_hand, batch).total)

    # everything passed: codecs.pt is not read at all (here it is unreadable); the down / up
    # blocks passed take the trained weights from model.safetensors
    (tmp_path / 'codecs.pt').write_bytes(b'not a pickle')
    with pytest.raises(ValueError, match = 'codecs.pt: the saved encoders / decoders / down-up blocks cannot be loaded'):
        Transfusion.from_pretrained(tmp_path)
    everything = Transfusion.from_pretrained(
        tmp_path, modality_encoder = (model.modality_encoders[0], None), modality_decoder = (model.modality_decoders[0], None),
        pre_post_transformer_enc_dec = make_pre_post(),
    )
    assert torch.equal(fixed_loss(model, batch).total, fixed_loss(everything, batch).total)

    # a down / up block for a type that had none cannot take the saved weights
    with pytest.raises(ValueError, match = r'model.safetensors does not match the config: missing \[.*pre_post.0'):
        Transfusion.from_pretrained(tmp_path, pre_post_transformer_enc_dec = ((nn.Linear(DIM_LATENTS[0], 32), nn.Linear(32, DIM_LATENTS[0])), make_pre_post()[1]),
                                    modality_encoder = (model.modality_encoders[0], None), modality_decoder = (model.modality_decoders[0], None))


def test_from_pretrained_returns_the_model_in_eval_mode(tmp_path):
    model_with_every_codec().save_pretrained(tmp_path)
    loaded = Transfusion.from_pretrained(tmp_path)
    assert not any(module.training for module in loaded.modules())
    assert loaded.train().training and not loaded.modality_encoders[0].training

    # no condition dropout on the first call: with prob_uncond = 1 it would drop the text every time
    tiny_model(prob_uncond = 1.).save_pretrained(tmp_path / 'always_drops')
    loaded = Transfusion.from_pretrained(tmp_path / 'always_drops')
    batch = [[torch.tensor([3, 4, 5]), (0, torch.randn(2, DIM_LATENTS[0]))]]
    torch.manual_seed(0)
    first = loaded(batch)
    torch.manual_seed(0)
    assert torch.equal(first, loaded(batch, prob_uncond = 0.))


def test_a_folder_saved_with_the_dead_projections_still_loads(tmp_path):
    """Folders written before types with down / up blocks stopped making linear projections."""
    model = tiny_model(channel_first_latent = (False, True), pre_post_transformer_enc_dec = make_pre_post()).eval()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    weights = load_file(tmp_path / 'model.safetensors')
    weights.update({'latent_to_model.1.weight': torch.zeros(32, DIM_LATENTS[1]), 'model_to_velocity.1.bias': torch.zeros(DIM_LATENTS[1])})
    save_file(weights, tmp_path / 'model.safetensors')
    loaded = Transfusion.from_pretrained(tmp_path)
    assert torch.equal(loaded.to_logits.weight, model.to_logits.weight)


def test_training_a_model_with_a_frozen_batchnorm_encoder_and_tied_blocks(tmp_path, one_thread):
    """Through the trainer: the encoder's running statistics and weights do not move (no
    training mode, no weight decay), the tied down / up blocks train as one tensor, and
    train() ends by writing both pretrained folders, which load with the same encoder."""
    from transfusion_pytorch.training import TrainConfig, train
    from test_training_data import ListDataset

    encoder = nn.Sequential(nn.Conv1d(3, DIM_LATENTS[0], 1), nn.BatchNorm1d(DIM_LATENTS[0]))
    with torch.no_grad():
        encoder[1].running_mean.uniform_(-1, 1)
    encoder.eval()
    down, up = tied_pre_post()
    model = tiny_model(channel_first_latent = True, modality_encoder = (encoder, None), pre_post_transformer_enc_dec = (None, (down, up)))
    encoder_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    down_before = down.weight.detach().clone()

    generator = torch.Generator().manual_seed(0)
    data = ListDataset([
        [torch.randint(0, 32, (3,), generator = generator), (0, torch.randn(3, 4, generator = generator) * 3 + 2),
         (1, torch.randn(DIM_LATENTS[1], 2, 4, generator = generator))]
        for _ in range(8)
    ])
    train(model, data, TrainConfig(out_dir = str(tmp_path), max_steps = 3, max_tokens = 64, progress = False, ema_beta = 0.5, lr = 1e-2))

    assert all(torch.equal(encoder_before[k], v) for k, v in encoder.state_dict().items())
    assert up.weight is down.weight and not torch.equal(down.weight, down_before)
    for folder in ('pretrained', 'pretrained_ema'):
        loaded = Transfusion.from_pretrained(tmp_path / folder)
        assert all(torch.equal(encoder_before[k], v) for k, v in loaded.modality_encoders[0].state_dict().items())
        assert loaded.pre_post[1].decoder.weight is loaded.pre_post[1].encoder.weight
