"""The training side of every code block of the API contract, as written (without `.cuda()`)."""

import torch
from torch import nn, randint, randn

from transfusion_pytorch import Transfusion


def assert_finite_grads(model):
    touched = [p for p in model.parameters() if p.grad is not None]
    assert len(touched) > 0
    for param in touched:
        assert torch.isfinite(param.grad).all()


def test_one_modality():
    model = Transfusion(
        num_text_tokens = 256,
        dim_latent = 384,
        modality_default_shape = (4,),  # fallback, in the case the language model did not produce a valid modality shape
        transformer = dict(
            dim = 512,
            depth = 8
        )
    )

    text_and_images = [
        [randint(0, 256, (16,)), randn(4, 384), randint(0, 256, (8,)), randn(6, 384)],
        [randint(0, 256, (16,)), randn(7, 384), randint(0, 256, (5,)), randn(2, 384), randint(0, 256, (9,))]
    ]

    loss = model(text_and_images)

    loss.backward()
    assert_finite_grads(model)
    assert all(p.grad is not None for p in model.transformer.parameters())


def test_multiple_modalities():
    model = Transfusion(
        num_text_tokens = 256,
        dim_latent = (384, 192),                 # specify multiple latent dimensions
        modality_default_shape = ((4,), (2,)),   # default shapes for first and second modality
        transformer = dict(
            dim = 512,
            depth = 8
        )
    )

    text_images_and_audio = [
        [randint(0, 256, (16,)), (0, randn(4, 384)), randint(0, 256, (8,)), (1, randn(6, 192))],
        [randint(0, 256, (16,)), randn(7, 384), randint(0, 256, (5,)), (1, randn(2, 192)), randint(0, 256, (9,))]
    ]

    loss = model(text_images_and_audio)

    loss.backward()
    assert_finite_grads(model)
    for m in range(2):
        assert model.latent_to_model[m].weight.grad.abs().sum() > 0
        assert model.model_to_velocity[m].weight.grad.abs().sum() > 0


def test_encoder_and_decoder():
    mock_encoder = nn.Conv2d(3, 384, 3, padding = 1)
    mock_decoder = nn.Conv2d(384, 3, 3, padding = 1)

    model = Transfusion(
        num_text_tokens = 12,
        dim_latent = 384,
        channel_first_latent = True,
        modality_default_shape = (4, 4),
        modality_encoder = mock_encoder,
        modality_decoder = mock_decoder,
        transformer = dict(
            dim = 512,
            depth = 8
        )
    )

    text_and_images = [
        [
            randint(0, 12, (16,)),  # 16 text tokens
            randn(3, 8, 8),         # (8 x 8) 3 channeled image
            randint(0, 12, (8,)),   # 8 text tokens
            randn(3, 7, 7)          # (7 x 7) 3 channeled image
        ],
        [
            randint(0, 12, (16,)),  # 16 text tokens
            randn(3, 8, 5),         # (8 x 5) 3 channeled image
            randint(0, 12, (5,)),   # 5 text tokens
            randn(3, 2, 16),        # (2 x 16) 3 channeled image
            randint(0, 12, (9,))    # 9 text tokens
        ]
    ]

    loss = model(text_and_images)

    loss.backward()
    assert_finite_grads(model)


def test_text_pretraining():
    model = Transfusion(
        num_text_tokens = 256,
        dim_latent = 384,
        transformer = dict(
            dim = 512,
            depth = 8,
        )
    )

    text = torch.randint(0, 256, (2, 1024))

    loss = model(text)
    loss.backward()
    assert_finite_grads(model)
