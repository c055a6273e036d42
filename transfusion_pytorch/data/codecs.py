"""Pixels to latents and back, for `prepare` (encode, once) and for sampling (decode).

A codec maps `(n, 3, h, w)` pixels in [-1, 1] to latents laid out as the model takes a
modality, `(n, h / stride, w / stride, dim_latent)` (channels last, one token per cell), and
back. It describes itself as a dict recorded in the shard manifest and the run folder.

- `PatchCodec(patch)`: the pixels cut into `patch` x `patch` patches, each flattened
  (3 * patch^2 values per token): the patchify of ViT and DiT without the learned projection
  (the model's linear layer in is that projection). Nothing pretrained, nothing to load.
- `VAECodec(path, patch)`: a diffusers autoencoder from a local folder (`AutoencoderKL` or
  another class with `encode` / `decode`, named by `_class_name` in its config.json), then
  `patch` x `patch` patches of its latent cells (Transfusion, Zhou et al., 2024, section 3,
  patches the VAE latents 2 x 2). Latents are scaled as diffusers pipelines scale them,
  `z = (latent - shift_factor) * scaling_factor` (Stable Diffusion: scaling 0.18215; SD3 and
  FLUX add a shift), and decoded as `latent = z / scaling_factor + shift_factor`. For a
  `latent_dist` (KL autoencoders) the posterior mean and standard deviation are both kept,
  scaled alike, so training can draw a fresh `mean + std * noise` each epoch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor

from ..extras import require


class CodecMismatch(ValueError):
    """A VAE that is not the one the data was encoded with."""


def patchify(x: Tensor, patch: int) -> Tensor:
    """(n, c, h, w) -> (n, h / patch, w / patch, patch * patch * c)"""
    return rearrange(x, 'n c (h p1) (w p2) -> n h w (p1 p2 c)', p1 = patch, p2 = patch)


def unpatchify(x: Tensor, patch: int) -> Tensor:
    return rearrange(x, 'n h w (p1 p2 c) -> n c (h p1) (w p2)', p1 = patch, p2 = patch)


class PatchCodec:
    stochastic = False

    def __init__(self, patch: int = 4):
        if not isinstance(patch, int) or patch <= 0:
            raise ValueError(f'patch must be a positive int, got {patch!r}')
        self.patch, self.stride, self.dim_latent = patch, patch, 3 * patch * patch

    def to(self, device) -> PatchCodec:
        return self

    def encode(self, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
        return patchify(pixels.float(), self.patch).cpu(), None

    def decode(self, latents: Tensor) -> Tensor:
        return unpatchify(latents.float().cpu(), self.patch).clamp(-1., 1.)

    def describe(self) -> dict:
        return dict(kind = 'patch', patch = self.patch, stride = self.stride, dim_latent = self.dim_latent,
                    stochastic = False, fingerprint = f'patch-{self.patch}')


def file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, 'rb') as file:
            for chunk in iter(lambda: file.read(1 << 22), b''):
                digest.update(chunk)
    return digest.hexdigest()


def posterior(out) -> tuple[Tensor, Tensor | None]:
    """(mean, std) of a KL autoencoder's `latent_dist`; (latent, None) for a deterministic one
    (`AutoencoderDC`'s `latent`, `VQModel`'s `latents`)."""
    if hasattr(out, 'latent_dist'):
        return out.latent_dist.mean, out.latent_dist.std
    return (out.latent if hasattr(out, 'latent') else out.latents), None


class VAECodec:
    def __init__(self, path: str | Path, patch: int = 1, device: str | torch.device = 'cpu'):
        self.path = Path(path)
        config_path = self.path / 'config.json'
        if not config_path.exists():
            raise FileNotFoundError(f'vae: {self.path} has no config.json (a local diffusers autoencoder folder, as save_pretrained writes)')
        try:
            config = json.loads(config_path.read_text())
        except ValueError as error:
            raise ValueError(f'vae: {config_path} is not valid JSON ({error})') from None
        diffusers = require('diffusers', f'vae: loading the autoencoder in {self.path}')
        name = config.get('_class_name', 'AutoencoderKL')
        cls = getattr(diffusers, name, None)
        if cls is None or not hasattr(cls, 'encode') or not hasattr(cls, 'decode'):
            raise ValueError(f'vae: {self.path} holds a {name!r}, not a diffusers autoencoder with encode and decode')
        self.name, self.patch = name, patch
        try:
            self.vae = cls.from_pretrained(str(self.path), low_cpu_mem_usage = False).eval().requires_grad_(False).to(device)
        except (OSError, ValueError, KeyError, TypeError) as error:     # missing or damaged weights, a config they do not fit
            raise ValueError(f'vae: {self.path} does not load as a diffusers {name} ({type(error).__name__}: {" ".join(str(error).split())})') from None
        self.scaling_factor = float(getattr(self.vae.config, 'scaling_factor', None) or 1.)
        self.shift_factor = float(getattr(self.vae.config, 'shift_factor', None) or 0.)
        self.in_channels = int(getattr(self.vae.config, 'in_channels', 3))
        with torch.no_grad():       # the downsampling factor, latent channels and kind of output, from one small encode
            out = self.vae.encode(torch.zeros(1, self.in_channels, 64, 64, device = device))
        probe, std = posterior(out)
        self.factor, self.channels, self.stochastic = 64 // probe.shape[-1], probe.shape[1], std is not None
        self.stride, self.dim_latent = self.factor * patch, self.channels * patch * patch
        self._fingerprint = None

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def to(self, device) -> VAECodec:
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> tuple[Tensor, Tensor | None]:
        if pixels.shape[1] != self.in_channels:
            raise ValueError(f'vae: expects {self.in_channels}-channel images, got {pixels.shape[1]} channels')
        mean, std = posterior(self.vae.encode(pixels.to(self.device, torch.float32)))
        mean = patchify((mean - self.shift_factor) * self.scaling_factor, self.patch).float().cpu()
        std = patchify(std * self.scaling_factor, self.patch).float().cpu() if std is not None else None
        return mean, std

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = unpatchify(latents.float(), self.patch).to(self.device)
        return self.vae.decode(z / self.scaling_factor + self.shift_factor).sample.float().cpu().clamp(-1., 1.)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            weights = sorted(p for p in self.path.iterdir() if p.suffix in ('.safetensors', '.bin'))
            self._fingerprint = file_digest([self.path / 'config.json', *weights])
        return self._fingerprint

    def describe(self) -> dict:
        return dict(kind = 'vae', path = str(self.path.resolve()), class_name = self.name, patch = self.patch, stride = self.stride,
                    dim_latent = self.dim_latent, latent_channels = self.channels, downsample = self.factor,
                    scaling_factor = self.scaling_factor, shift_factor = self.shift_factor, stochastic = self.stochastic,
                    fingerprint = self.fingerprint())


def load_codec(vae: str | Path | None, patch: int | None = None, device = 'cpu'):
    """A VAE codec when `vae` is a folder (patch default 1), the patch codec otherwise (patch default 4)."""
    if patch is not None and (not isinstance(patch, int) or patch <= 0):
        raise ValueError(f'patch must be a positive int (or None for the default), got {patch!r}')
    if vae is None:
        return PatchCodec(4 if patch is None else patch)
    return VAECodec(vae, 1 if patch is None else patch, device)


def from_description(description: dict, vae_path: str | Path | None = None, device = 'cpu'):
    """The codec a manifest or run describes (the VAE from `vae_path` or its recorded path),
    checked to be the same one. A path for the patch codec, which has no folder, is refused
    rather than ignored."""
    if description['kind'] == 'patch':
        if vae_path is not None:
            raise ValueError(f"the data was encoded by the patch codec (patch {description['patch']}), not a VAE: leave the option out")
        return PatchCodec(description['patch'])
    codec = VAECodec(vae_path or description['path'], description['patch'], device)
    check_same(description, codec.describe(), 'the recorded codec', f'the VAE at {codec.path}')
    return codec


def check_same(expected: dict, given: dict, expected_name: str, given_name: str):
    keys = ('kind', 'patch', 'fingerprint')
    if any(expected.get(k) != given.get(k) for k in keys):
        raise CodecMismatch(f'{given_name} is {summary(given)}, but {expected_name} is {summary(expected)}: '
                            f'latents of one mean other pictures in the other. Prepare the data again with the same --vae and --patch')


def summary(description: dict) -> str:
    if description['kind'] == 'patch':
        return f"the patch codec with patch {description['patch']}"
    return (f"the VAE {description.get('path')} ({description.get('class_name')}, patch {description['patch']}, "
            f"fingerprint {description['fingerprint'][:12]})")
