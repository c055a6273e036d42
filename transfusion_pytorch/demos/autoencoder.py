"""A small convolutional VAE for the 8 x 8 digits (Kingma & Welling, 2014): a normalised
(1, 8, 8) image -> a (channels, 4, 4) latent and back. `examples/train_vae.py` trains it, then
trains Transfusion on its latents. The encoder's output for Transfusion is the posterior mean,
divided by its standard deviation over the data, so the latents are about unit scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DigitsVAE(nn.Module):
    def __init__(self, channels: int = 4, hidden: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, hidden, 3, padding = 1), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 4, stride = 2, padding = 1), nn.SiLU(),      # 8 x 8 -> 4 x 4
            nn.Conv2d(hidden, 2 * channels, 1),                                     # mean and log-variance
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, hidden, 1), nn.SiLU(),
            nn.ConvTranspose2d(hidden, hidden, 4, stride = 2, padding = 1), nn.SiLU(),  # 4 x 4 -> 8 x 8
            nn.Conv2d(hidden, 1, 3, padding = 1),
        )

    def loss(self, images: Tensor, kl_weight: float = 1e-3) -> Tensor:
        mean, log_var = self.encoder(images).chunk(2, dim = 1)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        reconstruction = F.mse_loss(self.decoder(z), images)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1. - log_var).mean()
        return reconstruction + kl_weight * kl


class ScaledMean(nn.Module):
    """The VAE's posterior mean divided by `scale`: the encoder Transfusion sees."""

    def __init__(self, vae: DigitsVAE, scale: float):
        super().__init__()
        self.vae, self.scale = vae, scale

    def forward(self, images: Tensor) -> Tensor:
        return self.vae.encoder(images).chunk(2, dim = 1)[0] / self.scale


class ScaledDecoder(nn.Module):
    def __init__(self, vae: DigitsVAE, scale: float):
        super().__init__()
        self.vae, self.scale = vae, scale

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decoder(z * self.scale)
