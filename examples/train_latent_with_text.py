"""Latents with text through a pretrained diffusers `AutoencoderKL` loaded from a local folder
(no download here: point --vae at a folder written by `AutoencoderKL.save_pretrained`, e.g. a
Stable Diffusion VAE you already have). The 8 x 8 digits are resized to the VAE's input size,
encoded once to latents (the posterior mean times the VAE's `scaling_factor`), and Transfusion
learns "draw <digit>" and captioning on them (the digits job, with the VAE as its codec);
drawings are decoded by the VAE and read by the real-digit classifier.

    python examples/train_latent_with_text.py --vae path/to/vae [--image-size 32] [--steps 800 ...]
"""

import argparse
import sys

import torch

from transfusion_pytorch import cli
from transfusion_pytorch.config_files import parse_overrides
from transfusion_pytorch.demos import digits_job
from transfusion_pytorch.demos.codecs import KLDecoder, KLEncoder, ModuleCodec, Resize


def kl_codec(path: str, image_size: int) -> ModuleCodec:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path).eval().requires_grad_(False)
    scale = float(getattr(vae.config, 'scaling_factor', 1.) or 1.)
    return ModuleCodec(
        KLEncoder(vae, scale), KLDecoder(vae, scale),
        prepare = Resize(image_size, vae.config.in_channels), restore = Resize(8, 1),
    )


def main(argv = None, eval_options = ()):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter,
                                     epilog = 'other options: the digits config keys, see `transfusion train --help`')
    parser.add_argument('--vae', required = True, help = 'a local AutoencoderKL folder (config.json and weights)')
    parser.add_argument('--image-size', type = int, default = 32, help = 'the size the digits are resized to for the VAE')
    args, rest = parser.parse_known_args(argv)

    codec = kl_codec(args.vae, args.image_size)
    print(f'AutoencoderKL latents: {codec.dim_latent} channels on a {codec.shape} grid')
    config = digits_job.load_config(None, {'name': 'digits_latent', **parse_overrides(digits_job.DigitsConfig, rest)})
    run = digits_job.train(config, codec = codec)
    return cli.main(['eval', str(run), *eval_options])


if __name__ == '__main__':
    main()
