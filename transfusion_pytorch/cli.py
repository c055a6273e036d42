"""`transfusion`: train, sample and evaluate from the command line.

    transfusion train [CONFIG] [--key value ...]     train a job (by default the digits demo)
    transfusion sample RUN_OR_MODEL --prompt "draw 3" [--num N] [--out FILE]
    transfusion eval RUN_OR_MODEL

A CONFIG is a small TOML file of `key = value` lines (see `transfusion train --help` for the
keys); `--key value` overrides it. A RUN is a run folder written by `transfusion train`; a
MODEL a folder written by `save_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .config_files import ConfigError, describe, parse_overrides


def digits_config_class():
    from .demos.digits_job import DigitsConfig
    return DigitsConfig


# loading a run or a model

def resolve(path: str, ema: bool = True):
    """(model directory, run config or None) for a run folder or a pretrained model folder."""
    path = Path(path)
    if (path / 'config.toml').exists():
        from .demos.digits_job import load_config
        config = load_config(path / 'config.toml')
        model_dir = path / ('pretrained_ema' if ema else 'pretrained')
        if not (model_dir / 'config.json').exists():
            model_dir = path / 'pretrained'
        if not (model_dir / 'config.json').exists():
            raise SystemExit(f'{path} has no trained model yet (no pretrained/ folder): has its training finished?')
        return model_dir, config
    if (path / 'config.json').exists():
        return path, None
    raise SystemExit(f'{path} is neither a run folder (with config.toml) nor a model folder (with config.json)')


def digits_codec_of(model, config, run_dir):
    """The codec of a digits model, from its run or, for a bare model, its latent width."""
    from .demos.codecs import PatchCodec, make_codec
    from .demos.digits import NUM_TEXT_TOKENS
    from .demos.digits_job import load_codec
    if config is not None:
        return load_codec(config, Path(run_dir))
    if model.config.num_text_tokens != NUM_TEXT_TOKENS or model.num_modality_types != 1:
        return None
    if model.uses_pre_post(0):
        return make_codec('unet', 2)
    patch = round(model.config.dim_latent[0] ** 0.5)
    return PatchCodec(patch) if patch * patch == model.config.dim_latent[0] and 8 % patch == 0 else None


def load_model(path: str, ema: bool = True):
    from .model import Transfusion
    model_dir, config = resolve(path, ema)
    if config is not None and config.threads > 0:
        torch.set_num_threads(config.threads)            # as the run trained
    model = Transfusion.from_pretrained(model_dir)
    return model, config, digits_codec_of(model, config, path)


# commands

def command_train(args, extra: list[str]):
    from .demos import digits_job
    overrides = parse_overrides(digits_job.DigitsConfig, extra)
    config = digits_job.load_config(args.config, overrides)
    return digits_job.train(config)


def command_sample(args):
    from .demos import digits_eval, plots
    from .demos.digits import tokenize, detokenize
    model, config, codec = load_model(args.model, ema = not args.no_ema)
    steps = args.modality_steps or (config.modality_steps if config else 16)

    if codec is None:
        # any other model: sample in the list form and save it
        samples = model.sample(batch_size = args.num, seed = args.seed, modality_steps = steps, max_length = args.max_length)
        out = Path(args.out or 'samples.pt')
        torch.save(samples, out)
        print(f'wrote {len(samples)} samples to {out}')
        return

    words = args.prompt.split()
    if len(words) == 1 and words[0].isdigit():
        words = ['draw', words[0]]          # "3" is short for "draw 3"
    prompt = tokenize(' '.join(words))
    if len(prompt) != 2 or detokenize(prompt[:1]) != 'draw' or not 0 <= int(prompt[1]) <= 9:
        raise SystemExit(f'the digits model draws from prompts "draw <digit>", got {args.prompt!r}')
    label = int(prompt[1])
    images = digits_eval.draw(model, codec, [label] * args.num, steps, seed = args.seed)
    out = Path(args.out or f'draw_{label}.png')
    plots.save_digit_grid(images[None], out, [f'draw {label}'])
    predicted = digits_eval.classify(images)
    print(f'wrote {args.num} drawings of "draw {label}" to {out}; a classifier trained on real digits reads them as {predicted.tolist()}')


def command_eval(args):
    from .demos import digits_eval
    model, config, codec = load_model(args.model, ema = not args.no_ema)
    if codec is None:
        raise SystemExit('transfusion eval knows the digits models (12 text tokens, one image modality); this is another model')
    steps = args.modality_steps or (config.modality_steps if config else 16)
    results = digits_eval.evaluate(model, codec, per_label = args.per_label, modality_steps = steps, seed = args.seed, num_captions = args.captions)

    print(f"text to image: {results['text_to_image_accuracy']:.1%} of {10 * args.per_label} drawings read as the digit asked for "
          f"(the classifier reads {results['real_classifier_accuracy']:.1%} of held-out real digits right)")
    print('  per label: ' + '  '.join(f"{d}: {results[f'text_to_image_accuracy_{d}']:.0%}" for d in range(10)))
    print(f"captioning: {results['caption_accuracy']:.1%} of {results['num_captions']} held-out real digits captioned right")
    print(f"held-out losses: text {results['held_out_text_loss']:.4f}, flow {results['held_out_flow_loss']:.4f}")

    out = Path(args.out) if args.out else (Path(args.model) / 'eval.json' if config is not None else None)
    if out is not None:
        out.write_text(json.dumps(dict(model = str(args.model), modality_steps = steps, per_label = args.per_label, **results), indent = 2) + '\n')
        print(f'wrote {out}')
    return results


# the parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog = 'transfusion', description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest = 'command', required = True, metavar = 'COMMAND')

    train = commands.add_parser(
        'train', help = 'train a job (default: the digits demo)', formatter_class = argparse.RawDescriptionHelpFormatter,
        description = 'Train a job from a TOML config (default: the digits demo, about 10 minutes on 2 CPU cores), '
                      'writing a run folder with the config, checkpoints, metrics.jsonl, loss.png and sample grids. '
                      'Rerunning the same command resumes from the newest checkpoint.',
        epilog = 'config keys, in the TOML file as `key = value` or on the command line as --key value:\n' + describe(digits_config_class()),
    )
    train.add_argument('config', nargs = '?', help = 'a TOML file of key = value lines; omitted: the defaults below')

    sample = commands.add_parser('sample', help = 'draw images (digits model) or sample sequences from a trained model',
                                 description = 'Sample from a run folder or a saved model. For a digits model, draws --num images for '
                                               'the prompt and writes them as one PNG.')
    sample.add_argument('model', metavar = 'RUN_OR_MODEL', help = 'a run folder (runs/digits) or a save_pretrained folder')
    sample.add_argument('--prompt', default = 'draw 0', help = 'for the digits model "draw <digit>" (or just the digit); default "draw 0"')
    sample.add_argument('--num', type = int, default = 8, help = 'how many samples (default 8)')
    sample.add_argument('--out', help = 'output file (default draw_<digit>.png, or samples.pt for other models)')
    sample.add_argument('--seed', type = int, default = 0, help = 'seed of the noise (default 0)')
    sample.add_argument('--modality-steps', type = int, help = "ODE steps per image (default: the run's modality_steps, else 16)")
    sample.add_argument('--max-length', type = int, default = 256, help = 'tokens to generate per sample for models other than digits (default 256)')
    sample.add_argument('--no-ema', action = 'store_true', help = "use a run's online weights instead of its EMA weights")

    evaluate = commands.add_parser('eval', help = 'evaluate a digits model: text-to-image and captioning accuracy, held-out losses',
                                   description = 'Text-to-image accuracy (a classifier trained on real digits reads the drawings), '
                                                 'captioning accuracy on held-out real digits and held-out losses; written to '
                                                 '<run>/eval.json for a run folder.')
    evaluate.add_argument('model', metavar = 'RUN_OR_MODEL', help = 'a run folder (runs/digits) or a save_pretrained folder')
    evaluate.add_argument('--per-label', type = int, default = 50, help = 'drawings per digit (default 50)')
    evaluate.add_argument('--captions', type = int, help = 'caption only the first N held-out digits (default: all 360)')
    evaluate.add_argument('--seed', type = int, default = 0, help = 'seed of the noise (default 0)')
    evaluate.add_argument('--modality-steps', type = int, help = "ODE steps per image (default: the run's modality_steps, else 16)")
    evaluate.add_argument('--out', help = 'where to write the figures as JSON (default <run>/eval.json)')
    evaluate.add_argument('--no-ema', action = 'store_true', help = "use a run's online weights instead of its EMA weights")
    return parser


def main(argv: list[str] | None = None):
    """Runs a command; returns what it returns (the run folder for `train`, the figures for `eval`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        if argv[:1] == ['train'] and not {'-h', '--help'} & set(argv):
            # `train` takes free-form --key value overrides, which argparse would mistake for the config
            rest = argv[1:]
            config = rest.pop(0) if rest and not rest[0].startswith('-') else None
            return command_train(argparse.Namespace(config = config), rest)
        args = parser.parse_args(argv)
        return {'sample': command_sample, 'eval': command_eval}[args.command](args)
    except ConfigError as error:
        print(f'transfusion: error: {error}', file = sys.stderr)
        raise SystemExit(2)


def run():
    """The console script: `main`, exiting 0 (a returned value would be taken as an error)."""
    main()


if __name__ == '__main__':
    run()
