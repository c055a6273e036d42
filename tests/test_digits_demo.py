"""The digits demo: its data pipeline, config files and the `transfusion` CLI end to end on a
tiny run."""

import json

import pytest
import torch

pytest.importorskip('sklearn')
pytest.importorskip('matplotlib')

from transfusion_pytorch import cli
from transfusion_pytorch.config_files import ConfigError, parse_overrides
from transfusion_pytorch.demos.codecs import PatchCodec, UNetCodec
from transfusion_pytorch.demos.digits import DRAW, IS, DigitsDataset, load_split, patchify, tokenize, unpatchify
from transfusion_pytorch.demos.digits_job import DigitsConfig, load_config

TINY = ['--dim', '16', '--depth', '1', '--heads', '1', '--dim-head', '16', '--steps', '2', '--eval-every', '2',
        '--eval-per-label', '2', '--checkpoint-every', '2', '--max-tokens', '256', '--warmup-steps', '1', '--modality-steps', '2']


@pytest.mark.parametrize('patch', [1, 2, 4, 8])
def test_patchify_round_trips(patch):
    images = torch.randn(3, 8, 8)
    latents = patchify(images, patch)
    assert latents.shape == (3, 8 // patch, 8 // patch, patch * patch)
    assert torch.equal(unpatchify(latents, patch), images)
    # a patch holds neighbouring pixels: the top-left patch is the top-left corner
    assert torch.equal(latents[0, 0, 0], images[0, :patch, :patch].reshape(-1))


@pytest.mark.parametrize('codec', [PatchCodec(2), PatchCodec(4), UNetCodec()])
def test_codecs_round_trip_real_digits(codec):
    train, _ = load_split()
    images = train.images[:16]
    assert torch.allclose(codec.decode(codec.encode(images)), images, atol = 1e-5)
    assert codec.encode(images).shape[1:] == ((codec.dim_latent, *codec.shape) if codec.channel_first else (*codec.shape, codec.dim_latent))


def test_split_is_fixed_stratified_and_disjoint():
    train, test = load_split()
    assert len(train.labels) + len(test.labels) == 1797
    assert set(test.labels.tolist()) == set(range(10))
    flat = lambda split: {tuple(image.flatten().tolist()) for image in split.images}
    assert len(flat(train) & flat(test)) < 5          # the data set holds a few duplicate images, no more


def test_dataset_mixes_text_to_image_and_captioning():
    train, _ = load_split()
    codec = PatchCodec(2)
    dataset = DigitsDataset(codec.encode(train.images), train.labels, caption_fraction = 0.3)
    kinds = [dataset[i][0].dtype == torch.long for i in range(len(dataset))]
    assert abs(1 - sum(kinds) / len(kinds) - 0.3) < 0.01
    first = dataset[0]
    assert first[0].tolist() == [DRAW, train.labels[0].item()] and first[1].shape == (4, 4, 4)
    last = dataset[len(dataset) - 1]
    assert last[1][0].item() == IS and last[0].shape == (4, 4, 4)


def test_tokenize_rejects_unknown_words():
    assert tokenize('draw 7').tolist() == [DRAW, 7]
    with pytest.raises(ValueError, match = 'unknown word'):
        tokenize('paint 7')


# config files

def test_config_rejects_an_unknown_key_naming_the_closest(tmp_path):
    path = tmp_path / 'bad.toml'
    path.write_text('dim = 32\nflow_weight = 0.01\n')
    with pytest.raises(ConfigError, match = r"unknown key 'flow_weight'; did you mean 'flow_loss_weight'"):
        load_config(path)
    path.write_text('stepz = 10\n')
    with pytest.raises(ConfigError, match = r"unknown key 'stepz'; did you mean 'steps'"):
        load_config(path)


@pytest.mark.parametrize('text, message', [
    ('steps = "many"\n', "'steps' must be int"),
    ('steps = 0\n', "'steps' must be positive"),
    ('[model]\ndim = 3\n', "'model' is a table"),
    ('codec = "vq"\n', 'codec must be one of'),
    ('time_distribution = "cosine"\n', r"'time_distribution' must be one of \('logit_normal', 'uniform'\), got 'cosine'"),
    ('min_time_before_text = 1.0\n', r"'min_time_before_text' must lie in \[0, 1\) \(0: no limit\), got 1.0"),
])
def test_config_rejects_wrong_types_and_values(tmp_path, text, message):
    path = tmp_path / 'bad.toml'
    path.write_text(text)
    with pytest.raises(ConfigError, match = message):
        load_config(path)


def test_overrides_are_typed_and_checked(tmp_path):
    path = tmp_path / 'ok.toml'
    path.write_text('dim = 32\nlr = 1e-3\n')
    config = load_config(path, parse_overrides(DigitsConfig, ['--lr=0.01', '--steps', '7', '--name', 'x']))
    assert (config.dim, config.lr, config.steps, config.name) == (32, 0.01, 7, 'x')
    with pytest.raises(ConfigError, match = "did you mean '--max-tokens'"):
        parse_overrides(DigitsConfig, ['--max-token', '5'])
    with pytest.raises(ConfigError, match = '--steps: expected int'):
        parse_overrides(DigitsConfig, ['--steps', 'x'])


def test_cli_train_reports_a_bad_key(tmp_path, capsys):
    path = tmp_path / 'bad.toml'
    path.write_text('depht = 2\n')
    with pytest.raises(SystemExit):
        cli.main(['train', str(path)])
    assert "unknown key 'depht'; did you mean 'depth'?" in capsys.readouterr().err


# the CLI end to end on a tiny run

def test_cli_train_sample_eval(tmp_path, capsys):
    (tmp_path / 'tiny.toml').write_text(f'name = "tiny"\nout_root = "{tmp_path.as_posix()}"\n')
    cli.main(['train', str(tmp_path / 'tiny.toml'), *TINY, '--time-distribution', 'uniform', '--min-time-before-text', '0.25'])
    run = tmp_path / 'tiny'
    saved = json.loads((run / 'pretrained_ema' / 'config.json').read_text())['config']
    assert (saved['time_distribution'], saved['min_time_before_text']) == ('uniform', 0.25)       # the keys reach the model
    for name in ('config.toml', 'metrics.jsonl', 'loss.png', 'samples/step_000002.png', 'pretrained_ema/config.json'):
        assert (run / name).exists(), name
    assert any((run / 'checkpoints').iterdir())
    metrics = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert 'text_to_image_accuracy' in metrics[-1] and 'caption_accuracy' in metrics[-1]
    assert str(run) in capsys.readouterr().out

    cli.main(['sample', str(run), '--prompt', 'draw 3', '--num', '4', '--out', str(tmp_path / 'three.png'), '--modality-steps', '2'])
    assert (tmp_path / 'three.png').stat().st_size > 0
    cli.main(['sample', str(run / 'pretrained'), '--prompt', '5', '--num', '2', '--out', str(tmp_path / 'five.png')])
    assert (tmp_path / 'five.png').stat().st_size > 0

    cli.main(['eval', str(run), '--per-label', '2', '--modality-steps', '2', '--captions', '10'])
    results = json.loads((run / 'eval.json').read_text())
    for key in ('text_to_image_accuracy', 'text_to_image_accuracy_9', 'caption_accuracy', 'held_out_text_loss', 'held_out_flow_loss'):
        assert 0 <= results[key] < float('inf'), key
    assert 'captioning:' in capsys.readouterr().out


def test_cli_sample_on_another_model_writes_its_samples(tmp_path, capsys):
    from transfusion_pytorch import Transfusion
    model = Transfusion(num_text_tokens = 16, dim_latent = 8, modality_default_shape = (2,), transformer = dict(dim = 16, depth = 1, dim_head = 8, heads = 2))
    model.save_pretrained(tmp_path / 'toy')
    cli.main(['sample', str(tmp_path / 'toy'), '--num', '2', '--max-length', '16', '--modality-steps', '2', '--out', str(tmp_path / 'toy.pt')])
    samples = torch.load(tmp_path / 'toy.pt', weights_only = False)
    assert len(samples) == 2 and all(isinstance(sample, list) for sample in samples)
    with pytest.raises(SystemExit) as exit:
        cli.main(['eval', str(tmp_path / 'toy')])
    assert exit.value.code == 2 and 'transfusion eval knows the digits models' in capsys.readouterr().err


def test_evaluation_counts_are_checked():
    """`--captions -5` once captioned 355 digits (a negative slice) and `--per-label 0` ended in torch.cat."""
    from transfusion_pytorch import Transfusion
    from transfusion_pytorch.demos import digits_eval
    codec = PatchCodec(4)
    model = Transfusion(num_text_tokens = 12, dim_latent = codec.dim_latent, modality_default_shape = codec.shape,
                        transformer = dict(dim = 16, depth = 1, dim_head = 8, heads = 2))
    for options, message in [(dict(per_label = 1), r'per_label must be an int in \[2, 139\] \(the spread of a label takes two drawings'),
                             (dict(per_label = 140), r'per_label must be an int in \[2, 139\]'),
                             (dict(num_captions = -5), r'num_captions must be None \(all\) or an int in \[1, 360\]'),
                             (dict(num_captions = 361), r'num_captions must be None \(all\) or an int in \[1, 360\]')]:
        with pytest.raises(ValueError, match = message):
            digits_eval.evaluate(model, codec, **options)
    with pytest.raises(ValueError, match = 'modality_steps must be a positive int, got 0'):
        digits_eval.Sampling(modality_steps = 0)
    with pytest.raises(ValueError, match = r'guidance_interval must be two times \(t_lo, t_hi\)'):
        digits_eval.Sampling(guidance_interval = (0.7, 0.6))
    with pytest.raises(ValueError, match = 'labels: expected at least one label to draw, got none'):
        digits_eval.draw(model, codec, [])
