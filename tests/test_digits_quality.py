"""The digits evaluation of how drawings are spread (issue 15): the Fréchet distance and the
diversity ratio against slow references, the reader's accuracy, independent seeds, and the
sweep of sampling settings run end to end on a tiny model."""

import json

import pytest
import torch

pytest.importorskip('sklearn')
pytest.importorskip('matplotlib')

from transfusion_pytorch import Transfusion, cli
from transfusion_pytorch.demos import digits_eval, digits_sweep, metrics
from transfusion_pytorch.demos.codecs import PatchCodec


def frechet_reference(a, b) -> float:
    """The textbook formula, with scipy's general matrix square root."""
    from scipy.linalg import sqrtm
    a, b = a.double().numpy(), b.double().numpy()
    import numpy as np
    cov_a, cov_b = np.cov(a, rowvar = False), np.cov(b, rowvar = False)
    cross = sqrtm(cov_a @ cov_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * cross))


def test_frechet_distance_against_the_textbook_formula():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator = generator) @ torch.randn(6, 6, generator = generator)
    b = torch.randn(200, 6, generator = generator) * 2 + 1
    assert metrics.frechet_distance(a, b) == pytest.approx(frechet_reference(a, b), rel = 1e-6)
    assert metrics.frechet_distance(a, a) == pytest.approx(0., abs = 1e-8)
    # a shift adds its squared length; a rotation of both sets changes nothing
    assert metrics.frechet_distance(a + torch.tensor([3., 0, 0, 0, 0, 4]), a) == pytest.approx(25., rel = 1e-6)
    rotation = torch.linalg.qr(torch.randn(6, 6, generator = generator))[0]
    assert metrics.frechet_distance(a @ rotation, b @ rotation) == pytest.approx(metrics.frechet_distance(a, b), rel = 1e-6)
    with pytest.raises(ValueError, match = r'expected two \(n, d\) feature sets of at least two rows and the same d, got \(300, 6\) and \(5, 3\)'):
        metrics.frechet_distance(a, torch.randn(5, 3))


def test_diversity_ratios():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(40, 5, generator = generator)
    real_labels = torch.arange(40) % 2
    drawn = torch.cat([real[real_labels == 0] * 0.5, real[real_labels == 1] * 3.])
    labels = torch.tensor([0] * 20 + [1] * 20)
    ratios = metrics.diversity_ratios(drawn, labels, real, real_labels)
    assert ratios == {0: pytest.approx(0.5), 1: pytest.approx(3.)}
    slow = sum(float((x - y).norm()) for i, x in enumerate(real[:5]) for y in real[i + 1:5]) / 10
    assert metrics.mean_pairwise_distance(real[:5]) == pytest.approx(slow)


def test_the_reader_reads_real_digits():
    _, accuracy = digits_eval.real_digit_classifier()
    assert accuracy >= 0.98
    _, test = digits_eval.load_split()
    # real digits against real digits: a small distance, each label about as varied as the held-out digits
    labels = torch.arange(10).repeat_interleave(30)
    quality = digits_eval.drawing_quality(digits_eval.real_like(labels, seed = 1), labels)
    assert quality['text_to_image_accuracy'] > 0.97
    assert quality['frechet_distance'] == pytest.approx(quality['frechet_distance_real'], rel = 0.5)
    assert 0.85 < quality['diversity'] < 1.15


def tiny_digits_model():
    codec = PatchCodec(4)
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens = 12, dim_latent = codec.dim_latent, modality_default_shape = codec.shape,
                        transformer = dict(dim = 16, depth = 1, dim_head = 8, heads = 2))
    with torch.no_grad():
        for parameter in model.parameters():            # the zero-initialised gates opened: the prompt matters
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model, codec


def test_seeds_share_no_drawing(one_thread):
    """`draw` seeded drawing i with seed + i, so seed 1's drawings were seed 0's shifted by one."""
    model, codec = tiny_digits_model()
    sampling = digits_eval.Sampling(modality_steps = 2)
    first, second = (digits_eval.draw(model, codec, [3, 3, 3], sampling, seed = seed) for seed in (0, 1))
    assert not any(torch.allclose(x, y) for x in first for y in second)
    assert torch.equal(first, digits_eval.draw(model, codec, [3, 3, 3], sampling, seed = 0))


def test_the_sweep_runs_on_a_tiny_model(tmp_path, capsys, one_thread):
    model, codec = tiny_digits_model()
    model.save_pretrained(tmp_path / 'tiny')
    out = tmp_path / 'sweep' / 'result.json'
    cli.main(['eval', str(tmp_path / 'tiny'), '--per-label', '2', '--modality-steps', '2', '--out', str(out),
              '--sweep', 'cfg_scale=1,2', 'guidance_interval=0:1,0.5:1', 'seed=0,1'])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result['rows']
    assert [(row['cfg_scale'], tuple(row['guidance_interval'])) for row in rows] == [(1., (0., 1.)), (1., (0.5, 1.)), (2., (0., 1.)), (2., (0.5, 1.))]
    assert result['sweep']['seed'] == [0, 1] and all(row['seeds'] == [0, 1] for row in rows)
    assert out.with_suffix('.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert '| cfg_scale | guidance_interval | accuracy | Fréchet distance | diversity |' in printed
    assert printed.count('\n| 2 | 0.5:1 |') == 1

    # a point is the mean over its seeds of what `evaluate` measures
    point = digits_eval.Sampling(modality_steps = 2, cfg_scale = 2., guidance_interval = (0.5, 1.))
    runs = [digits_eval.evaluate(model, codec, per_label = 2, sampling = point, seed = seed, losses = False, captions = False) for seed in (0, 1)]
    for key in ('text_to_image_accuracy', 'frechet_distance', 'diversity'):
        assert rows[3][key] == pytest.approx((runs[0][key] + runs[1][key]) / 2)
    # without guidance the interval changes nothing, and such points are drawn once
    assert rows[0]['frechet_distance'] == rows[1]['frechet_distance']
    assert rows[2]['frechet_distance'] != rows[3]['frechet_distance']


def test_sweep_parsing():
    axes = digits_sweep.parse_sweep(['cfg_scale=1, 2.5', 'guidance_interval=0:1,0.6:1', 'ode_method=euler', 'seed=3'])
    assert axes == dict(cfg_scale = [1., 2.5], guidance_interval = [(0., 1.), (0.6, 1.)], ode_method = ['euler'], seed = [3])
    points = digits_sweep.sweep_points(digits_eval.Sampling(modality_steps = 4), axes)
    assert len(points) == 4 and all(point.modality_steps == 4 and point.ode_method == 'euler' for point in points)


def test_the_cli_samples_as_sample_does_for_the_model(tmp_path):
    """Without --cfg-scale, `transfusion sample` and `eval` guide as `sample` would: at 3 for a
    model built with condition dropout, not at all for one built without."""
    import argparse
    none_given = argparse.Namespace(**{key: None for key in cli.SAMPLING_OPTIONS})
    for prob_uncond, scale in ((0.1, 3.), (0., 1.)):
        model = Transfusion(num_text_tokens = 12, dim_latent = 16, modality_default_shape = (2, 2), prob_uncond = prob_uncond,
                            transformer = dict(dim = 16, depth = 1, dim_head = 8, heads = 2))
        model.save_pretrained(tmp_path / str(prob_uncond))
        sampling = cli.load(str(tmp_path / str(prob_uncond))).sampling(none_given)
        assert sampling.cfg_scale == scale and sampling.guidance_interval == (0.6, 1.) and sampling.ode_method == 'midpoint'
