import random

import pytest
import torch

from transfusion_pytorch import Transfusion

NUM_TEXT_TOKENS = 32
DIM_LATENTS = (6, 4)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and other test runs may share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse = True)
def seed():
    torch.manual_seed(0)
    random.seed(0)


def tiny_model(**kwargs) -> Transfusion:
    options = dict(
        num_text_tokens = NUM_TEXT_TOKENS,
        dim_latent = DIM_LATENTS,
        modality_default_shape = ((2,), (2, 2)),
        transformer = dict(dim = 32, depth = 2, dim_head = 8, heads = 2),
    )
    options.update(kwargs)
    return Transfusion(**options)


def random_sample(rng: random.Random, max_elements: int = 5) -> list:
    """A random interleaving of text runs and modalities of type 0 (1 axis) and 1 (2 axes)."""
    sample = []
    for _ in range(rng.randint(1, max_elements)):
        kind = rng.choice(['text', 'type0', 'type1'])
        if kind == 'text':
            sample.append(torch.randint(0, NUM_TEXT_TOKENS, (rng.randint(1, 6),)))
        elif kind == 'type0':
            sample.append((0, torch.randn(rng.randint(1, 4), DIM_LATENTS[0])))
        else:
            sample.append((1, torch.randn(rng.randint(1, 3), rng.randint(1, 3), DIM_LATENTS[1])))
    return sample


def random_batch(rng: random.Random, max_samples: int = 4) -> list:
    return [random_sample(rng) for _ in range(rng.randint(1, max_samples))]


def overfit_batch() -> list:
    """The tiny fixed mixed batch that a small model must learn (the same data every call)."""
    generator = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, NUM_TEXT_TOKENS, (n,), generator = generator)
    latent = lambda *shape: torch.randn(*shape, generator = generator)
    return [
        [text(5), (0, latent(3, DIM_LATENTS[0])), text(3), (1, latent(2, 2, DIM_LATENTS[1]))],
        [(1, latent(1, 3, DIM_LATENTS[1])), text(4)],
    ]


def overfit(model, steps: int = 300, lr: float = 3e-3) -> tuple[float, float]:
    """Trains on `overfit_batch()`; returns the first loss and the mean of the last 20. Build the
    model with `min_time_before_text = 0.`: the batch's modalities are followed by text, and their
    velocity targets in [0.5, 1] take longer than 300 steps to fit."""
    torch.manual_seed(0)
    batch = overfit_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr = lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    losses = []
    for _ in range(steps):
        loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses[0], sum(losses[-20:]) / 20


OVERFIT_TRANSFORMER = dict(dim = 64, depth = 2, dim_head = 16, heads = 4)
