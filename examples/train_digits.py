"""Transfusion on scikit-learn's 8 x 8 handwritten digits: one small model learns to draw a
digit from the text "draw <digit>" and to caption a digit image with "is <digit>".

This is the default job of `transfusion train` (transfusion_pytorch/demos/digits_job.py):
the script trains it, then evaluates the trained model as `transfusion eval` does. Every
config key is an option (`transfusion train --help` lists them):

    python examples/train_digits.py                           # the demo: under 2 minutes on 2 idle CPU cores
    python examples/train_digits.py --steps 200 --name quick  # a shorter run, in runs/quick
"""

import sys

from transfusion_pytorch import cli


def main(argv = None, eval_options = ()):
    argv = sys.argv[1:] if argv is None else list(argv)
    if {'-h', '--help'} & set(argv):
        print(__doc__)
        return cli.main(['train', '--help'])
    run = cli.main(['train', *argv])
    return cli.main(['eval', str(run), *eval_options])


if __name__ == '__main__':
    main()
