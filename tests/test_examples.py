"""Smoke tests: every example script in examples/ runs a few steps on CPU."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('sklearn')
pytest.importorskip('matplotlib')

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / 'examples'

TINY_DIGITS = ['--dim', '16', '--depth', '1', '--heads', '1', '--dim-head', '16', '--steps', '2', '--eval-every', '2',
               '--eval-per-label', '2', '--checkpoint-every', '2', '--max-tokens', '256', '--warmup-steps', '1', '--modality-steps', '2']
TINY_EVAL = ['--per-label', '2', '--modality-steps', '2', '--captions', '10']


@pytest.fixture(autouse = True)
def one_thread():
    """One torch thread, as the digits job uses: these tiny models gain nothing from two, and a
    busy machine makes a second thread much slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_smoke_test():
    tested = {'train_toy', 'train_text', 'train_digits', 'train_digits_unet', 'train_image_only', 'train_vae', 'train_latent_with_text'}
    assert {path.stem for path in EXAMPLES.glob('*.py')} == tested
    assert not list(ROOT.glob('train_*.py')), 'the example scripts live in examples/, not the repository root'


def test_every_example_is_in_the_examples_readme_and_shows_its_command():
    table = (EXAMPLES / 'README.md').read_text()
    for path in EXAMPLES.glob('*.py'):
        assert f'python examples/{path.name}' in path.read_text(), f'{path.name} docstring: its usage line'
        assert f'python examples/{path.name}' in table, f'examples/README.md has no command for {path.name}'


def test_toy_runs_from_the_repository_root():
    """As a user runs it: `python examples/train_toy.py` in the repository root."""
    done = subprocess.run([sys.executable, 'examples/train_toy.py', '--steps', '25', '--batch-size', '4'],
                          cwd = ROOT, env = {**os.environ, 'OMP_NUM_THREADS': '1'}, capture_output = True, text = True, timeout = 300)
    assert done.returncode == 0, done.stderr
    assert 'loss fell from' in done.stdout


def test_text(tmp_path, capsys):
    history = load_example('train_text').main(['--steps', '2', '--seq-len', '32', '--rows-per-batch', '2', '--max-bytes', '20000',
                                              '--dim', '32', '--depth', '1', '--generate', '8', '--out-dir', str(tmp_path / 'text')])
    assert history and all(torch.isfinite(torch.tensor(h['loss'])) for h in history)
    assert 'def ' in capsys.readouterr().out


def test_digits(tmp_path):
    results = load_example('train_digits').main([*TINY_DIGITS, '--out-root', str(tmp_path)], eval_options = TINY_EVAL)
    assert 0 <= results['text_to_image_accuracy'] <= 1 and (tmp_path / 'digits' / 'loss.png').exists()


def test_digits_unet(tmp_path):
    results = load_example('train_digits_unet').main([*TINY_DIGITS, '--out-root', str(tmp_path)], eval_options = TINY_EVAL)
    assert 0 <= results['caption_accuracy'] <= 1 and (tmp_path / 'digits_unet' / 'pretrained' / 'codecs.pt').exists()


def test_image_only(tmp_path):
    losses = load_example('train_image_only').main(['--steps', '2', '--batch-size', '4', '--dim', '32', '--depth', '1',
                                                     '--modality-steps', '2', '--out', str(tmp_path / 'grid.png')])
    assert len(losses) == 2 and (tmp_path / 'grid.png').exists()


def test_vae(tmp_path):
    results = load_example('train_vae').main(['--vae-steps', '2', *TINY_DIGITS, '--out-root', str(tmp_path)], eval_options = TINY_EVAL)
    assert 0 <= results['text_to_image_accuracy'] <= 1 and (tmp_path / 'digits_vae' / 'codec.pt').exists()


def test_latent_with_text_through_a_local_autoencoder_kl(tmp_path):
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels = 3, out_channels = 3, latent_channels = 4, block_out_channels = (8, 8), layers_per_block = 1,
        norm_num_groups = 4, down_block_types = ('DownEncoderBlock2D',) * 2, up_block_types = ('UpDecoderBlock2D',) * 2,
    )
    vae.save_pretrained(tmp_path / 'vae')
    results = load_example('train_latent_with_text').main(
        ['--vae', str(tmp_path / 'vae'), '--image-size', '8', *TINY_DIGITS, '--out-root', str(tmp_path)], eval_options = TINY_EVAL)
    assert 0 <= results['caption_accuracy'] <= 1
