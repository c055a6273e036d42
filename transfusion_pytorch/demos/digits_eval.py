"""Evaluation of a digits model, with numbers that mean something:

- text to image: the model draws `per_label` images for each label from the prompt "draw
  <label>"; a classifier trained on the real training digits (logistic regression on the 64
  pixels, about 96% accurate on the held-out real digits) says which digit each drawing is.
  Reported per label and overall.
- captioning: for each held-out real image, the model continues the image greedily; a caption
  is right when the text it writes starts with "is <label>".
- held-out losses: the text cross-entropy and flow-matching loss on the held-out images, each
  as a text-to-image and a captioning sample, with seeded times and noise.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .digits import DRAW, IS, DigitsDataset, load_split


@lru_cache(maxsize = 2)
def real_digit_classifier(seed: int = 0):
    """(classifier, its accuracy on the held-out real digits), trained on the real training split."""
    from sklearn.linear_model import LogisticRegression

    train, test = load_split(seed = seed)
    classifier = LogisticRegression(max_iter = 5000, C = 0.1)
    classifier.fit(train.images.reshape(len(train.labels), -1).numpy(), train.labels.numpy())
    accuracy = float((classifier.predict(test.images.reshape(len(test.labels), -1).numpy()) == test.labels.numpy()).mean())
    return classifier, accuracy


def classify(images: torch.Tensor) -> torch.Tensor:
    """(n, 8, 8) pixels in [0, 16] -> (n,) predicted digits"""
    classifier, _ = real_digit_classifier()
    return torch.as_tensor(classifier.predict(images.reshape(len(images), -1).double().numpy()))


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


def check_positive_int(**values):
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f'{name} must be a positive int, got {value!r}')


@torch.no_grad()
def draw(model, codec, labels: list[int], modality_steps: int = 16, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """(len(labels), 8, 8) images drawn from the prompts "draw <label>", in pixels."""
    if len(labels) == 0:
        raise ValueError('labels: expected at least one label to draw, got none')
    check_positive_int(modality_steps = modality_steps)
    shape = codec.shape
    images = []
    for start in range(0, len(labels), batch_size):
        chunk = labels[start:start + batch_size]
        prompts = [[torch.tensor([DRAW, label])] for label in chunk]
        # the forced image is generated in full; max_length = 0: nothing after it
        samples = model.sample(
            prompts, force_modality_at_start = (0, shape), max_length = 0,
            modality_steps = modality_steps, seed = seed + start, return_latents = True,
        )
        images.append(codec.decode(torch.stack([first_modality(s) for s in samples])))
    return torch.cat(images)


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


def evaluate(model, codec, per_label: int = 50, modality_steps: int = 16, seed: int = 0, losses: bool = True,
             num_captions: int | None = None) -> dict:
    """The figures of the module docstring, as a flat dict; `num_captions` limits captioning
    to the first held-out images (all of them by default)."""
    check_positive_int(per_label = per_label, modality_steps = modality_steps)
    _, test = load_split()
    if num_captions is not None and not (isinstance(num_captions, int) and 1 <= num_captions <= len(test.labels)):
        raise ValueError(f'num_captions must be None (all) or an int in [1, {len(test.labels)}] (the held-out digits), got {num_captions!r}')
    labels = [label for label in range(10) for _ in range(per_label)]
    drawn = draw(model, codec, labels, modality_steps, seed)
    predicted = classify(drawn)
    labels_t = torch.tensor(labels)
    results = dict(text_to_image_accuracy = (predicted == labels_t).float().mean().item())
    for label in range(10):
        results[f'text_to_image_accuracy_{label}'] = (predicted[labels_t == label] == label).float().mean().item()

    captions = caption(model, codec, test.images[:num_captions])
    correct = [ids[:2] == [IS, label] for ids, label in zip(captions, test.labels[:num_captions].tolist())]
    results['caption_accuracy'] = sum(correct) / len(correct)
    results['num_captions'] = len(correct)

    results['real_classifier_accuracy'] = real_digit_classifier()[1]
    if losses:
        results.update(held_out_losses(model, codec, seed))
    return results
