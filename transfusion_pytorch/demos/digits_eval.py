"""Evaluation of a digits model, with numbers that mean something:

- text to image: the model draws `per_label` images for each label from the prompt "draw
  <label>"; a reader trained on the real training digits (an RBF support vector machine on
  the 64 pixels, which reads 99.4% of the held-out real digits right) says which digit each
  drawing is. Reported per label and overall.
- how the drawings are spread, in a fixed feature space: the 64 hidden ReLU features of a small
  MLP classifier trained on the real training digits (the role Inception's features play in
  FID; the reader, an SVM, has no hidden layer). `metrics.py` computes
  - the Fréchet distance between the drawings and the 360 held-out real digits, and its floor:
    the distance from as many real training digits, drawn per label as the drawings are, to
    the same held-out digits;
  - per label, the diversity ratio: the drawings' mean pairwise feature distance over the
    held-out real digits'. Guidance that pulls each label's drawings towards one prototype
    shows here, and as a larger Fréchet distance.
- captioning: for each held-out real image, the model continues the image greedily; a caption
  is right when the text it writes starts with "is <label>".
- held-out losses: the text cross-entropy and flow-matching loss on the held-out images, each
  as a text-to-image and a captioning sample, with seeded times and noise.

`Sampling` holds the options of `model.sample` that decide how a digit is drawn; its defaults
are the point that `transfusion eval --sweep` measured best on the demo (see docs/generation.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch

from ..generation import SampleOptions
from ..guidance import DEFAULT_CFG_SCALE
from . import metrics
from .digits import DRAW, IS, MAX_PIXEL, DigitsDataset, load_split


@dataclass(frozen = True, kw_only = True)
class Sampling:
    """How the digits are drawn: options of `model.sample`, checked as it checks them."""
    modality_steps: int = SampleOptions.modality_steps
    ode_method: str = SampleOptions.ode_method
    time_shift: float = SampleOptions.time_shift
    cfg_scale: float = DEFAULT_CFG_SCALE            # `sample`'s default for a model trained with condition dropout, as the demo's is
    guidance_interval: tuple[float, float] = SampleOptions.guidance_interval
    guidance_schedule: str = SampleOptions.guidance_schedule

    def __post_init__(self):
        SampleOptions(**self.options())
        object.__setattr__(self, 'guidance_interval', tuple(float(t) for t in self.guidance_interval))

    def options(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return ', '.join(f'{key} {value}' for key, value in self.options().items())


def pixels(images: torch.Tensor):
    """(n, 8, 8) pixels in [0, 16] -> (n, 64) float64 numpy array in [0, 1], what the reader and the feature map take."""
    return (images.reshape(len(images), -1).double() / MAX_PIXEL).numpy()


@lru_cache(maxsize = 2)
def real_digit_classifier(seed: int = 0):
    """(reader, its accuracy on the held-out real digits), trained on the real training split
    (in 0.1 s; a logistic regression read 95.8%, which left no room at the top of the scale)."""
    from sklearn.svm import SVC

    train, test = load_split(seed = seed)
    classifier = SVC(C = 10.).fit(pixels(train.images), train.labels.numpy())
    accuracy = float((classifier.predict(pixels(test.images)) == test.labels.numpy()).mean())
    return classifier, accuracy


def classify(images: torch.Tensor) -> torch.Tensor:
    """(n, 8, 8) pixels in [0, 16] -> (n,) predicted digits"""
    classifier, _ = real_digit_classifier()
    return torch.as_tensor(classifier.predict(pixels(images)))


@lru_cache(maxsize = 1)
def feature_network():
    """An MLP with one hidden layer of 64 ReLU units, trained on the real training digits with a
    fixed seed (a few seconds; about 97% on the held-out digits)."""
    from sklearn.neural_network import MLPClassifier

    train, _ = load_split()
    return MLPClassifier((64,), max_iter = 1000, random_state = 0).fit(pixels(train.images), train.labels.numpy())


def features(images: torch.Tensor) -> torch.Tensor:
    """(n, 8, 8) pixels -> (n, 64) float64: the feature network's hidden activations."""
    network = feature_network()
    hidden = torch.as_tensor(pixels(images)) @ torch.as_tensor(network.coefs_[0]) + torch.as_tensor(network.intercepts_[0])
    return hidden.relu()


def max_per_label() -> int:
    """The most drawings per label the real-against-real floor can match: the training digits of the rarest label."""
    return int(load_split()[0].labels.bincount().min())


def check_per_label(per_label, name: str = 'per_label'):
    if isinstance(per_label, bool) or not isinstance(per_label, int) or not 2 <= per_label <= max_per_label():
        raise ValueError(f'{name} must be an int in [2, {max_per_label()}] (the spread of a label takes two drawings, and the '
                         f'real-against-real floor as many real training digits of each label as there are drawings), got {per_label!r}')


def real_like(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Real training digits with the same number of each label as `labels` (each at most once:
    see `max_per_label`), for the real-against-real floor."""
    train, _ = load_split()
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for label in labels.unique().tolist():
        pool = torch.nonzero(train.labels == label)[:, 0]
        picked.append(pool[torch.randperm(len(pool), generator = generator)[:int((labels == label).sum())]])
    return train.images[torch.cat(picked)]


def first_modality(sample: list) -> torch.Tensor:
    return next(element[1] for element in sample if isinstance(element, tuple))


def text_after_modality(sample: list) -> list[int]:
    seen, ids = False, []
    for element in sample:
        if isinstance(element, tuple):
            if seen:
                break
            seen = True
        elif seen:
            ids.extend(element.tolist())
    return ids


@torch.no_grad()
def draw(model, codec, labels: list[int], sampling: Sampling | None = None, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """(len(labels), 8, 8) images drawn from the prompts "draw <label>", in pixels. Drawing i
    draws its noise from the seed `seed * len(labels) + i`, so two seeds share no drawing."""
    if len(labels) == 0:
        raise ValueError('labels: expected at least one label to draw, got none')
    sampling = sampling or Sampling()
    shape = codec.shape
    images = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start:start + batch_size]
        prompts = [[torch.tensor([DRAW, label])] for label in chunk]
        # the forced image is generated in full; max_length = 0: nothing after it
        samples = model.sample(
            prompts, force_modality_at_start = (0, shape), max_length = 0,
            seed = seed * len(labels) + start, return_latents = True, **sampling.options(),
        )
        images.append(codec.decode(torch.stack([first_modality(s) for s in samples])))
    return torch.cat(images)


def drawing_quality(drawn: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict:
    """Accuracy, Fréchet distance with its floor, and diversity of `drawn` (n, 8, 8) asked for `labels` (n,)."""
    _, test = load_split()
    predicted = classify(drawn)
    results = dict(text_to_image_accuracy = (predicted == labels).float().mean().item())
    for label in range(10):
        if bool((labels == label).any()):
            results[f'text_to_image_accuracy_{label}'] = (predicted[labels == label] == label).float().mean().item()

    real = features(test.images)
    drawn_features = features(drawn)
    results['frechet_distance'] = metrics.frechet_distance(drawn_features, real)
    results['frechet_distance_real'] = metrics.frechet_distance(features(real_like(labels, seed)), real)
    ratios = metrics.diversity_ratios(drawn_features, labels, real, test.labels)
    results['diversity'] = sum(ratios.values()) / len(ratios)
    results.update({f'diversity_{label}': ratio for label, ratio in ratios.items()})
    return results


@torch.no_grad()
def caption(model, codec, images: torch.Tensor, batch_size: int = 256) -> list[list[int]]:
    """The text the model writes greedily after each image (up to three words)."""
    shape = codec.shape
    latents = codec.encode(images)
    max_length = 3                      # generated after the image: up to three words
    captions = []
    for start in range(0, len(latents), batch_size):
        prompts = [[latent.to(model.device)] for latent in latents[start:start + batch_size]]
        samples = model.sample(prompts, max_length = max_length, text_temperature = 0., return_latents = True)
        captions.extend(text_after_modality(s) for s in samples)
    return captions


@torch.no_grad()
def held_out_losses(model, codec, seed: int = 0, batch_size: int = 128) -> dict:
    _, test = load_split()
    dataset = DigitsDataset(codec.encode(test.images), test.labels, caption_fraction = 0.5)
    was_training = model.training
    model.eval()
    text, flow, batches = 0., 0., 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for start in range(0, len(dataset), batch_size):
            batch = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            _, breakdown = model(batch, return_breakdown = True)
            text += breakdown.text.item()
            flow += breakdown.flow[0].item()
            batches += 1
    model.train(was_training)
    return dict(held_out_text_loss = text / batches, held_out_flow_loss = flow / batches)


def evaluate(model, codec, per_label: int = 50, sampling: Sampling | None = None, seed: int = 0, losses: bool = True,
             num_captions: int | None = None, captions: bool = True) -> dict:
    """The figures of the module docstring, as a flat dict, with the sampling settings used;
    `num_captions` limits captioning to the first held-out images (all of them by default),
    `captions = False` and `losses = False` leave captioning and the losses out."""
    check_per_label(per_label)
    sampling = sampling or Sampling()
    _, test = load_split()
    if num_captions is not None and not (isinstance(num_captions, int) and 1 <= num_captions <= len(test.labels)):
        raise ValueError(f'num_captions must be None (all) or an int in [1, {len(test.labels)}] (the held-out digits), got {num_captions!r}')
    labels = torch.tensor([label for label in range(10) for _ in range(per_label)])
    drawn = draw(model, codec, labels.tolist(), sampling, seed)
    results = dict(sampling.options(), per_label = per_label, seed = seed, **drawing_quality(drawn, labels, seed))

    if captions:
        written = caption(model, codec, test.images[:num_captions])
        correct = [ids[:2] == [IS, label] for ids, label in zip(written, test.labels[:num_captions].tolist())]
        results['caption_accuracy'] = sum(correct) / len(correct)
        results['num_captions'] = len(correct)

    results['real_classifier_accuracy'] = real_digit_classifier()[1]
    if losses:
        results.update(held_out_losses(model, codec, seed))
    return results
