"""Distribution measures of generated samples against real ones, on a fixed feature space.

- Fréchet distance (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a
  Local Nash Equilibrium", 2017, https://arxiv.org/abs/1706.08500): the distance between the
  Gaussians fitted to the two sets of features,
  |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2). It sees both quality (the
  means) and diversity (the covariances). It is biased upwards at small sample sizes, so it is
  read against the distance between two real sets of the same sizes (the floor).
- diversity ratio: per label, the mean distance between two generated samples over the mean
  distance between two real ones (each mean over all pairs, which is unbiased at any sample
  size). 1 is as varied as the real data; guidance that pulls every drawing of a label towards
  the same prototype drives it down.
"""

from __future__ import annotations

import torch
from torch import Tensor


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """(n, d) and (m, d) features -> the Fréchet distance of their Gaussian fits (float64)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f'expected two (n, d) feature sets of at least two rows and the same d, got {tuple(a.shape)} and {tuple(b.shape)}')
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr((S_a^1/2 S_b S_a^1/2)^1/2) through symmetric eigendecompositions, which stay real
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min = 0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min = 0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def mean_pairwise_distance(x: Tensor) -> float:
    if len(x) < 2:
        raise ValueError(f'the mean pairwise distance needs at least two samples, got {len(x)}')
    return float(torch.pdist(x.double()).mean())


def diversity_ratios(features: Tensor, labels: Tensor, real_features: Tensor, real_labels: Tensor) -> dict[int, float]:
    """Per label present in `labels`: the generated samples' mean pairwise feature distance over
    the real samples' of that label."""
    return {int(label): mean_pairwise_distance(features[labels == label]) / mean_pairwise_distance(real_features[real_labels == label])
            for label in labels.unique().tolist()}
