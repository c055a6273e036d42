"""Inputs as user code makes them: rows sliced from a batch, transposed or expanded tensors.
None of them is contiguous; each must give what its contiguous copy gives."""

import pytest
import torch

from conftest import DIM_LATENTS, NUM_TEXT_TOKENS, tiny_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def text_rows() -> dict:
    """Int[2, 4] rows, none of them contiguous."""
    wide = torch.randint(0, NUM_TEXT_TOKENS, (2, 16))
    return dict(
        sliced = wide[:, :4],
        strided = wide[:, ::4],
        transposed = torch.randint(0, NUM_TEXT_TOKENS, (4, 2)).t(),
        expanded = torch.randint(0, NUM_TEXT_TOKENS, (1, 4)).expand(2, 4),
    )


def latents() -> dict:
    """(3, DIM_LATENTS[0]) modalities, none of them contiguous."""
    return dict(
        sliced = torch.randn(3, 2 * DIM_LATENTS[0])[:, :DIM_LATENTS[0]],
        transposed = torch.randn(DIM_LATENTS[0], 3).t(),
        expanded = torch.randn(1, DIM_LATENTS[0]).expand(3, DIM_LATENTS[0]),
    )


def contiguous(value):
    if torch.is_tensor(value):
        return value.contiguous()
    if isinstance(value, tuple):
        return tuple(contiguous(v) for v in value)
    if isinstance(value, list):
        return [contiguous(v) for v in value]
    return value


def assert_same(a, b):
    assert type(a) is type(b)
    if torch.is_tensor(a) and a.is_floating_point():
        # a strided operand may take another matmul kernel: the same up to float rounding
        assert torch.allclose(a, b, atol = 1e-5), (a - b).abs().max()
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize('kind', list(text_rows()))
def test_generate_text_only(model, kind, one_thread):
    prompt = text_rows()[kind]
    assert not prompt.is_contiguous()
    for use_cache in (True, False):
        out = model.generate_text_only(prompt, 10, seed = 0, use_cache = use_cache)
        assert torch.equal(out, model.generate_text_only(prompt.contiguous(), 10, seed = 0, use_cache = use_cache))


@pytest.mark.parametrize('kind', list(latents()))
def test_sample(model, kind, one_thread):
    text = text_rows()['strided'][0]
    latent = latents()[kind]
    noise = torch.randn(DIM_LATENTS[1], 2, 2).permute(1, 2, 0)     # (2, 2, dim) noise of the forced modality, permuted
    prompts = [[text], [text, (0, latent)], [(0, latent), text[:2]]]
    options = dict(max_length = 24, seed = 0, modality_steps = 2, force_modality_at_start = (1, (2, 2)),
                   init_modality_noise = noise)
    for use_cache in (True, False):
        assert_same(model.sample(prompts, use_cache = use_cache, **options),
                    model.sample(contiguous(prompts), use_cache = use_cache, **contiguous(options)))


@pytest.mark.parametrize('kind', list(text_rows()))
def test_forward_text_rows(model, kind, one_thread):
    text = text_rows()[kind]
    torch.manual_seed(1)
    loss = model(text)
    torch.manual_seed(1)
    assert torch.equal(loss, model(text.contiguous()))
    assert torch.equal(model(text, return_loss = False), model(text.contiguous(), return_loss = False))


@pytest.mark.parametrize('kind', list(latents()))
def test_forward_samples_and_modality_batches(model, kind, one_thread):
    latent = latents()[kind]
    text = text_rows()['strided']
    batch = [[text[0], (0, latent), text[1, :2]], [(0, latent[:2]), text[1]]]
    times = torch.tensor([[0.3], [0.7]])
    torch.manual_seed(1)
    loss = model(batch, times = times)
    torch.manual_seed(1)
    assert torch.equal(loss, model(contiguous(batch), times = times))

    images = latent[None].expand(2, -1, -1)                  # Float[b ...]: one modality per sample
    torch.manual_seed(1)
    loss = model(images, modality_type = 0)
    torch.manual_seed(1)
    assert torch.equal(loss, model(images.contiguous(), modality_type = 0))


def test_forward_channel_first_modalities(one_thread):
    # channel-first latents given as a transposed view of channel-last data
    torch.manual_seed(0)
    model = tiny_model(channel_first_latent = True, dim_latent = 4, modality_default_shape = (2, 3))
    latent = torch.randn(2, 3, 4).permute(2, 0, 1)           # (4, 2, 3), not contiguous
    batch = [[torch.tensor([1, 2]), latent], [latent, torch.tensor([3])]]
    torch.manual_seed(1)
    loss = model(batch)
    torch.manual_seed(1)
    assert torch.equal(loss, model(contiguous(batch)))


def test_training_steps(tmp_path, one_thread):
    """The trainer on samples that are views into larger tensors: the same losses as on copies."""
    from transfusion_pytorch.training import TrainConfig, Trainer

    text = torch.randint(0, NUM_TEXT_TOKENS, (8, 10))
    data = torch.randn(8, 3, 2 * DIM_LATENTS[0])
    views = [[text[i, ::2], (0, data[i, :, ::2]), text[i, 1:3]] for i in range(8)]

    def losses(dataset, out_dir):
        torch.manual_seed(0)
        trainer = Trainer(tiny_model(), dataset, TrainConfig(out_dir = str(out_dir), max_steps = 3, max_tokens = 40, lr = 1e-3,
                                                             checkpoint_every = 100, log_every = 1, progress = False))
        return [round(metrics['loss'], 6) for metrics in trainer.train() if 'loss' in metrics]

    assert not views[0][0].is_contiguous() and not views[0][1][1].is_contiguous()
    got = losses(views, tmp_path / 'views')
    assert len(got) == 3 and got == losses(contiguous(views), tmp_path / 'copies')
