"""How the digits demo turns 8 x 8 images into latents and back. A codec has

    shape        the latent grid the model samples (what `fixed_modality_shape` is)
    dim_latent   the width of a latent token
    channel_first
    encode(pixels (n, 8, 8) in [0, 16]) -> (n, *latent)
    decode((n, *latent)) -> pixels (n, 8, 8), clipped to [0, 16]
    model_kwargs()  extra `Transfusion(...)` keywords (learned down / up blocks)

- `PatchCodec`: fixed patches, no learned weights (the default);
- `UNetCodec`: the normalised image itself is the latent, `(1, 8, 8)` channel first, and the
  model learns a strided `Conv2d` down to an (8 / patch)^2 grid of tokens and a
  `ConvTranspose2d` back up: the paper's U-Net patch encoder (`pre_post_transformer_enc_dec`);
- `ModuleCodec`: any encoder / decoder pair of modules (a trained autoencoder, a diffusers
  `AutoencoderKL`), run once over the data set, without gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .digits import IMAGE_SIZE, denormalize, grid_shape, normalize, patchify, unpatchify


class PatchCodec:
    name = 'patch'
    channel_first = False

    def __init__(self, patch: int = 2):
        self.patch, self.shape, self.dim_latent = patch, grid_shape(patch), patch * patch

    def encode(self, pixels: Tensor) -> Tensor:
        return patchify(normalize(pixels), self.patch)

    def decode(self, latents: Tensor) -> Tensor:
        return denormalize(unpatchify(latents.float().cpu(), self.patch))

    def model_kwargs(self, dim: int) -> dict:
        return {}


class UNetCodec:
    name = 'unet'
    channel_first = True
    dim_latent = 1
    shape = (IMAGE_SIZE, IMAGE_SIZE)

    def __init__(self, patch: int = 2):
        grid_shape(patch)                                       # the strided convolutions round-trip 8 x 8 only if patch divides 8
        self.patch = patch

    def encode(self, pixels: Tensor) -> Tensor:
        return normalize(pixels)[:, None]                       # (n, 1, 8, 8)

    def decode(self, latents: Tensor) -> Tensor:
        return denormalize(latents.float().cpu()[:, 0])

    def model_kwargs(self, dim: int) -> dict:
        down = nn.Conv2d(1, dim, self.patch, stride = self.patch)
        up = nn.ConvTranspose2d(dim, 1, self.patch, stride = self.patch)
        return dict(pre_post_transformer_enc_dec = ((down, up),))


class ModuleCodec:
    """`encoder(normalised images (n, 1, 8, 8)) -> (n, c, h, w)` and `decoder` back, channel
    first. Saved whole with a run (`codec.pt`), so its modules' classes must be importable."""
    name = 'custom'
    channel_first = True

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prepare: nn.Module | None = None, restore: nn.Module | None = None):
        self.encoder, self.decoder = encoder.eval(), decoder.eval()
        self.prepare = prepare or nn.Identity()     # normalised (n, 1, 8, 8) -> the encoder's input
        self.restore = restore or nn.Identity()     # the decoder's output -> (n, 1, 8, 8)
        with torch.no_grad():
            probe = self.encoder(self.prepare(torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE)))
        self.dim_latent, self.shape = probe.shape[1], tuple(probe.shape[2:])

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        return torch.cat([self.encoder(self.prepare(normalize(chunk)[:, None])) for chunk in pixels.split(256)])

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        decoded = torch.cat([self.restore(self.decoder(chunk)) for chunk in latents.float().cpu().split(256)])
        return denormalize(decoded[:, 0])

    def model_kwargs(self, dim: int) -> dict:
        return {}


class Resize(nn.Module):
    """(n, c, h, w) -> (n, channels, size, size): bilinear resize, channels repeated or averaged
    (grey 8 x 8 digits in and out of an autoencoder made for larger colour images)."""

    def __init__(self, size: int, channels: int):
        super().__init__()
        self.size, self.channels = size, channels

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.interpolate(x, size = (self.size, self.size), mode = 'bilinear', align_corners = False)
        if x.shape[1] != self.channels:
            x = x.mean(1, keepdim = True).expand(-1, self.channels, -1, -1)
        return x


class KLEncoder(nn.Module):
    """A diffusers `AutoencoderKL`'s posterior mean, scaled (by its `scaling_factor`, as Stable
    Diffusion does, or by one measured on the data)."""

    def __init__(self, vae: nn.Module, scale: float):
        super().__init__()
        self.vae, self.scale = vae, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.vae.encode(x).latent_dist.mean * self.scale


class KLDecoder(nn.Module):
    def __init__(self, vae: nn.Module, scale: float):
        super().__init__()
        self.vae, self.scale = vae, scale

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z / self.scale).sample


CODECS = dict(patch = PatchCodec, unet = UNetCodec)
CUSTOM = 'custom'       # a ModuleCodec made by an example script, saved with the run


def make_codec(name: str, patch: int):
    if name not in CODECS:
        raise ValueError(f'codec must be one of {sorted(CODECS)} (or {CUSTOM!r} for a codec an example script saves with its run), got {name!r}')
    return CODECS[name](patch)
