"""The digits demo (train_digits.py, beside this file) with the paper's U-Net patch encoder: the
latent is the normalised 8 x 8 image itself, channel first, and the model learns a strided
Conv2d down to an (8 / patch) x (8 / patch) grid of tokens (2 x 2 with the default patch 4)
before the transformer and a ConvTranspose2d back up after it (`pre_post_transformer_enc_dec`
with `channel_first_latent`), instead of fixed patches.

    python examples/train_digits_unet.py                        # runs/digits_unet
    python examples/train_digits_unet.py --steps 200 --name unet_quick
"""

import sys

from transfusion_pytorch import cli


def main(argv = None, eval_options = ()):
    argv = sys.argv[1:] if argv is None else list(argv)
    if {'-h', '--help'} & set(argv):
        print(__doc__)
        return cli.main(['train', '--help'])
    run = cli.main(['train', '--codec', 'unet', '--name', 'digits_unet', *argv])    # later options win
    return cli.main(['eval', str(run), *eval_options])


if __name__ == '__main__':
    main()
