"""Two stages: first a small convolutional VAE learns to compress the 8 x 8 digits into a
4 x 4 grid of 4-channel latents; then Transfusion learns "draw <digit>" and captioning on
those latents (the digits job, with the VAE as its codec), and is evaluated on the decoded
drawings as `transfusion eval` does.

    python examples/train_vae.py [--vae-steps 1500] [--steps 800 and any other digits config key]
"""

import argparse
import sys

import torch

from transfusion_pytorch import cli
from transfusion_pytorch.config_files import parse_overrides
from transfusion_pytorch.demos import digits_job
from transfusion_pytorch.demos.autoencoder import DigitsVAE, ScaledDecoder, ScaledMean
from transfusion_pytorch.demos.codecs import ModuleCodec
from transfusion_pytorch.demos.digits import load_split, normalize


def train_vae(steps: int, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> DigitsVAE:
    torch.manual_seed(seed)
    train, test = load_split()
    images, held_out = normalize(train.images)[:, None], normalize(test.images)[:, None]
    vae = DigitsVAE()
    optimizer = torch.optim.AdamW(vae.parameters(), lr = lr)
    for step in range(1, steps + 1):
        loss = vae.loss(images[torch.randint(0, len(images), (batch_size,))])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == steps:
            with torch.no_grad():
                mean = vae.encoder(held_out).chunk(2, dim = 1)[0]
                error = torch.nn.functional.mse_loss(vae.decoder(mean), held_out).item()
            print(f'vae step {step:5d}  loss {loss.item():.4f}  held-out reconstruction mse {error:.4f} (images in [-1, 1])')
    return vae.eval()


def vae_codec(vae: DigitsVAE) -> ModuleCodec:
    train, _ = load_split()
    with torch.no_grad():
        scale = vae.encoder(normalize(train.images)[:, None]).chunk(2, dim = 1)[0].std().item()
    return ModuleCodec(ScaledMean(vae, scale), ScaledDecoder(vae, scale))


def main(argv = None, eval_options = ()):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter,
                                     epilog = 'other options: the digits config keys, see `transfusion train --help`')
    parser.add_argument('--vae-steps', type = int, default = 1500)
    args, rest = parser.parse_known_args(argv)

    codec = vae_codec(train_vae(args.vae_steps))
    config = digits_job.load_config(None, {'name': 'digits_vae', **parse_overrides(digits_job.DigitsConfig, rest)})
    run = digits_job.train(config, codec = codec)
    return cli.main(['eval', str(run), *eval_options])


if __name__ == '__main__':
    main()
