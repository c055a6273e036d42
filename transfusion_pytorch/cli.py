"""`transfusion`: train, sample and evaluate from the command line.

    transfusion train [CONFIG] [--key value ...]     train a job (by default the digits demo; --job image_text)
    transfusion sample RUN_OR_MODEL --prompt "draw 3" [--num N] [--out FILE] [--shape WxH]
    transfusion eval RUN_OR_MODEL [--cfg-scale S ...] [--sweep KEY=V1,V2 ...]
    transfusion shapes OUT                           write the walk-through set of captioned drawings
    transfusion prepare SOURCE --out DIR             encode captioned images (or text) into shards
    transfusion caption RUN PICTURE                  caption a picture with an image-text run

A CONFIG is a small TOML file of `key = value` lines (see `transfusion train --help` for the
keys); `--key value` overrides it. A RUN is a run folder written by `transfusion train`; a
MODEL a folder written by `save_pretrained`. An error in what is asked (a bad option, number,
prompt or config, a missing run) is one line, `transfusion: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .cli_options import SAMPLING_OPTIONS, Parser, UsageError, add_run_options, add_sampling_options, given_options, int_at_least  # noqa: F401
from .cli_options import output_path, positive_int, write_json
from .config_files import ConfigError, describe, parse_overrides
from .jobs.commands import COMMANDS as JOB_COMMANDS, add_parsers, image_text_keys


# loading a run or a model

@dataclass
class Loaded:
    """A run folder or a model folder, loaded for `sample` or `eval`."""
    path: Path
    model: object                   # Transfusion
    config: object | None           # the run's DigitsConfig; None for a model folder
    codec: object | None            # the digits codec; None for a model that is not a digits model

    @property
    def kind(self) -> str:
        """What a prompt means to it: 'digits' ("draw <digit>" through the digits vocabulary) or
        'model' (any other model: no tokenizer is saved with it, so no text prompt)."""
        return 'digits' if self.codec is not None else 'model'

    def sampling(self, args):
        """The sampling settings asked for: each option given, else the defaults of `sample`
        for this model (the guidance scale as `guidance.default_cfg_scale` sets it), with the
        run's modality_steps for a run folder."""
        from .demos.digits_eval import Sampling
        from .guidance import default_cfg_scale
        given = given_options(args)
        if 'modality_steps' not in given and self.config is not None:
            given['modality_steps'] = self.config.modality_steps
        given.setdefault('cfg_scale', default_cfg_scale(self.model))
        try:
            return Sampling(**given)
        except ValueError as error:
            raise UsageError(str(error)) from None


def resolve(path: str, ema: bool = True):
    """(model directory, run config or None) for a run folder or a pretrained model folder."""
    path = Path(path)
    if (path / 'config.toml').exists():
        from .demos.digits_job import load_run_config
        config = load_run_config(path)
        model_dir = path / ('pretrained_ema' if ema else 'pretrained')
        if not (model_dir / 'config.json').exists():
            model_dir = path / 'pretrained'
        if not (model_dir / 'config.json').exists():
            raise UsageError(f'{path} has no trained model yet (no pretrained/ folder): has its training finished?')
        return model_dir, config
    if (path / 'config.json').exists():
        if not ema:
            raise UsageError(f"--no-ema picks a run folder's online weights; {path} is a model folder, with one set of weights")
        return path, None
    raise UsageError(f'{path} is neither a run folder (with config.toml) nor a model folder (with config.json)')


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


def load(path: str, ema: bool = True, threads: int | None = None) -> Loaded:
    """`threads`: torch CPU threads (default: as the run trained, or the torch default)."""
    from .model import Transfusion
    model_dir, config = resolve(path, ema)
    if threads is None and config is not None:
        threads = config.threads                        # as the run trained
    if threads:
        torch.set_num_threads(threads)
    try:
        model = Transfusion.from_pretrained(model_dir)
    except ValueError as error:                         # a config.json or weights that do not load (bad JSON included)
        raise UsageError(f'cannot load the model in {model_dir}: {error}') from None
    return Loaded(Path(path), model, config, digits_codec_of(model, config, path))



# commands

def command_train(args, extra: list[str]):
    from .jobs import commands
    if commands.job_of(args.config, extra) == 'image_text':
        return commands.train_image_text(args.config, extra)
    from .demos import digits_job
    from .training.checkpoint import CheckpointError
    overrides = parse_overrides(digits_job.DigitsConfig, extra)
    config = digits_job.load_config(args.config, overrides)
    try:
        return digits_job.train(config)
    except CheckpointError as error:        # no usable checkpoint, or one of another number of processes
        raise ConfigError(str(error)) from None


def command_sample(args):
    """Samples by the kind of run (`Loaded.kind`): a new kind of run (one with a tokenizer of its
    own) adds its sampler to SAMPLERS. An image-text run (data.json: its tokenizer and codec) is
    loaded and sampled by `jobs.run_commands`."""
    from .jobs import run_commands, sampling
    if sampling.is_image_text_run(args.model):
        return run_commands.command_sample(args)
    refuse_image_text_options(args, ('vae', 'tokenizer', 'shape'))
    loaded = load(args.model, ema = not args.no_ema, threads = args.threads)
    return SAMPLERS[loaded.kind](loaded, args)


def refuse_image_text_options(args, names: tuple[str, ...]):
    """Options that only an image-text run takes, given for another run or model: an error."""
    given = [f"--{name}" for name in names if getattr(args, name) is not None]
    if given:
        raise UsageError(f'{given[0]} is for runs of the image_text job; {args.model} is not one')


def digits_label(prompt: str) -> int:
    """The digit of a digits prompt: "draw 3", or just "3"."""
    from .demos.digits import detokenize, tokenize
    words = prompt.split()
    if len(words) == 1 and words[0].isdigit():
        words = ['draw', words[0]]          # "3" is short for "draw 3"
    try:
        ids = tokenize(' '.join(words))
    except ValueError as error:
        raise UsageError(f'--prompt {prompt!r}: {error}; the digits model draws from prompts "draw <digit>"') from None
    if len(ids) != 2 or detokenize(ids[:1]) != 'draw' or not 0 <= int(ids[1]) <= 9:
        raise UsageError(f'--prompt: the digits model draws from prompts "draw <digit>" (or just the digit), got {prompt!r}')
    return int(ids[1])


def sample_digits(loaded: Loaded, args):
    from .demos import digits_eval, plots
    if args.max_length is not None:
        raise UsageError('--max-length is for models other than digits: a digits model writes one prompt and one image')
    label = digits_label(args.prompt if args.prompt is not None else 'draw 0')
    out = output_path(args.out or f'draw_{label}.png', image = True)
    images = digits_eval.draw(loaded.model, loaded.codec, [label] * args.num, loaded.sampling(args), seed = args.seed)
    plots.save_digit_grid(images[None], out, [f'draw {label}'])
    predicted = digits_eval.classify(images)
    print(f'wrote {args.num} drawings of "draw {label}" to {out}; a classifier trained on real digits reads them as {predicted.tolist()}')


def sample_sequences(loaded: Loaded, args):
    """Any other model: samples in the list form (text ids and latents), saved with torch.save."""
    if args.prompt is not None:
        raise UsageError(f'--prompt: {loaded.path} is not a digits model and records no tokenizer, so a text prompt means '
                         'nothing to it; sample without --prompt (samples.pt then holds token ids and latents)')
    out = output_path(args.out or 'samples.pt')
    max_length = args.max_length if args.max_length is not None else 256
    samples = loaded.model.sample(batch_size = args.num, seed = args.seed, max_length = max_length, **loaded.sampling(args).options())
    out.parent.mkdir(parents = True, exist_ok = True)
    torch.save(samples, out)
    print(f'wrote {len(samples)} samples to {out}')


SAMPLERS = dict(digits = sample_digits, model = sample_sequences)


def command_eval(args):
    from .jobs import run_commands, sampling
    if sampling.is_image_text_run(args.model):
        return run_commands.command_eval(args)
    from .demos import digits_eval
    from .demos.digits import load_split
    held_out = len(load_split()[1].labels)
    if args.captions is not None and args.captions > held_out:
        raise UsageError(f'argument --captions: there are {held_out} held-out digits to caption, got {args.captions}')
    try:
        digits_eval.check_per_label(args.per_label, '--per-label')
    except ValueError as error:
        raise UsageError(str(error)) from None
    refuse_image_text_options(args, ('vae', 'tokenizer'))
    out = output_path(args.out) if args.out and args.sweep is None else None
    loaded = load(args.model, ema = not args.no_ema, threads = args.threads)
    if loaded.kind != 'digits':
        raise UsageError(f'transfusion eval knows the digits models (12 text tokens, one image modality); {args.model} is another model')
    sampling = loaded.sampling(args)
    if args.sweep is not None:
        return command_sweep(args, loaded, sampling)
    out = out or (loaded.path / 'eval.json' if loaded.config is not None else None)
    results = digits_eval.evaluate(loaded.model, loaded.codec, per_label = args.per_label, sampling = sampling, seed = args.seed or 0,
                                   num_captions = args.captions)

    print(f"text to image: {results['text_to_image_accuracy']:.1%} of {10 * args.per_label} drawings read as the digit asked for "
          f"(the reader reads {results['real_classifier_accuracy']:.1%} of held-out real digits right)")
    print('  per label: ' + '  '.join(f"{d}: {results[f'text_to_image_accuracy_{d}']:.0%}" for d in range(10)))
    print(f"  against the held-out real digits: Fréchet distance {results['frechet_distance']:.3f} (real digits, as many: "
          f"{results['frechet_distance_real']:.3f}); diversity {results['diversity']:.3f} of the real digits' spread")
    print('  diversity per label: ' + '  '.join(f"{d}: {results[f'diversity_{d}']:.2f}" for d in range(10)))
    print(f'  sampling: {sampling.describe()}')
    print(f"captioning: {results['caption_accuracy']:.1%} of {results['num_captions']} held-out real digits captioned right")
    print(f"held-out losses: text {results['held_out_text_loss']:.4f}, flow {results['held_out_flow_loss']:.4f}")

    if out is not None:
        write_json(out, dict(model = str(args.model), **results))
    return results


def command_sweep(args, loaded: Loaded, base):
    """`eval --sweep`: the drawing figures at each point, a table, `sweep.json` and `sweep.png`."""
    from .demos import digits_sweep, plots
    try:
        axes = digits_sweep.parse_sweep(args.sweep)
        points = digits_sweep.sweep_points(base, axes)
    except ValueError as error:
        raise UsageError(f'--sweep: {error}') from None
    clashes = [key for key in axes if getattr(args, key) is not None]
    if clashes:
        raise UsageError(f"--sweep sweeps {clashes[0]}, also given as --{clashes[0].replace('_', '-')}: give it in one place")
    if args.captions is not None:
        raise UsageError('--captions: a sweep leaves captioning out (it does not depend on how images are sampled)')
    out = output_path(args.out) if args.out else (loaded.path if loaded.config is not None else Path('.')) / 'sweep.json'
    plot = out.with_suffix('.png')
    seeds = axes.get('seed', [args.seed or 0])

    rows = digits_sweep.run_sweep(loaded.model, loaded.codec, points, seeds, args.per_label)
    keys = [key for key in axes if key != 'seed']
    fixed = ', '.join(f'{k} {digits_sweep.format_value(v)}' for k, v in base.options().items() if k not in axes)
    print(f"{10 * args.per_label} drawings per point and seed, seeds {', '.join(map(str, seeds))}; not swept: {fixed}")
    print(f"real digits against the held-out real digits, as many: Fréchet distance {rows[0]['frechet_distance_real']:.3f}, diversity 1")
    print(digits_sweep.table(rows, keys, digits_sweep.Sampling()))

    default = next((row for row in rows if digits_sweep.is_point(row, digits_sweep.Sampling())), None)
    plots.save_tradeoff_plot(digits_sweep.curves(rows, keys), plot, rows[0]['frechet_distance_real'], default,
                             title = f"{loaded.path}: {10 * args.per_label} drawings per point, mean over seeds {', '.join(map(str, seeds))}")
    write_json(out, dict(model = str(args.model), sweep = axes, rows = rows))
    print(f'wrote {plot}')
    return rows


# the parser

def build_parser() -> argparse.ArgumentParser:
    from .demos.digits_job import RERUN_KEYS, DigitsConfig
    parser = Parser(prog = 'transfusion', description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest = 'command', required = True, metavar = 'COMMAND')

    train = commands.add_parser(
        'train', help = 'train a job (default: the digits demo)', formatter_class = argparse.RawDescriptionHelpFormatter,
        description = 'Train a job from a TOML config (default: the digits demo, 2,500 steps in under 2 minutes on 2 idle CPU '
                      'cores), writing a run folder with the config, checkpoints, metrics.jsonl, loss.png and sample grids. '
                      'The whole config is checked before anything is written.\n\n'
                      'Rerunning the same command resumes from the newest checkpoint, and drops the metrics.jsonl rows '
                      'logged after it. A rerun may change only ' + ', '.join(RERUN_KEYS) + ' (how long the run goes on '
                      'and how it is run and watched: none changes the model, the data or the updates so far); another key '
                      "that differs from the run's config.toml is refused, naming the keys.",
        epilog = 'config keys, in the TOML file as `key = value` or on the command line as --key value:\n' + describe(DigitsConfig)
                 + '\n\nkeys of the image_text job (--job image_text, or job = "image_text" in the TOML file):\n' + image_text_keys(),
    )
    train.add_argument('config', nargs = '?', help = 'a TOML file of key = value lines; omitted: the defaults below')

    sample = commands.add_parser('sample', help = 'draw images (digits model) or sample sequences from a trained model',
                                 description = 'Sample from a run folder or a saved model. For a digits model, draws --num images for '
                                               'the prompt and writes them as one image; for another model, writes --num samples '
                                               '(text ids and latents) with torch.save.')
    sample.add_argument('model', metavar = 'RUN_OR_MODEL', help = 'a run folder (runs/digits) or a save_pretrained folder')
    sample.add_argument('--prompt', help = 'for a digits model "draw <digit>" (or just the digit; default "draw 0"); for an image-text '
                                           'run any caption ("a|b": a row of pictures for each); other models record no tokenizer, and take no prompt')
    sample.add_argument('--num', type = positive_int, default = 8, help = 'how many samples (default 8)')
    sample.add_argument('--out', help = 'output file (default draw_<digit>.png, or samples.pt for other models)')
    sample.add_argument('--seed', type = int, default = 0, help = 'seed of the noise (default 0)')
    sample.add_argument('--max-length', type = positive_int, help = 'the max_length of model.sample (tokens to generate per sample), for models other than digits (default 256)')
    sample.add_argument('--no-ema', action = 'store_true', help = "use a run's online weights instead of its EMA weights")
    add_sampling_options(sample, "the run's modality_steps, else 8")
    sample.add_argument('--shape', metavar = 'WIDTHxHEIGHT', help = 'image-text runs: the size of the pictures in pixels, width x '
                                                                    "height, one the run trained on (its buckets; default: the run's most common size)")
    add_run_options(sample)

    evaluate = commands.add_parser('eval', help = 'evaluate a digits model: text-to-image and captioning accuracy, held-out losses',
                                   description = 'Text-to-image accuracy (a reader trained on real digits reads the drawings), '
                                                 'Fréchet distance and diversity of the drawings against the held-out real digits '
                                                 '(with the real-against-real floor), captioning accuracy on held-out real digits '
                                                 'and held-out losses, and the sampling settings used; written to <run>/eval.json '
                                                 'for a run folder. --sweep measures the drawings over a grid of sampling settings.')
    evaluate.add_argument('model', metavar = 'RUN_OR_MODEL', help = 'a run folder (runs/digits) or a save_pretrained folder')
    evaluate.add_argument('--per-label', type = int_at_least(2), default = 50, help = 'drawings per digit, 2 to 139 (default 50)')
    evaluate.add_argument('--captions', type = positive_int, help = 'caption only the first N held-out digits (default: all 360)')
    evaluate.add_argument('--seed', type = int, help = 'seed of the noise (default 0)')
    evaluate.add_argument('--out', help = 'where to write the figures as JSON (default <run>/eval.json)')
    evaluate.add_argument('--no-ema', action = 'store_true', help = "use a run's online weights instead of its EMA weights")
    add_sampling_options(evaluate, "the run's modality_steps, else 8")
    evaluate.add_argument('--sweep', nargs = '+', metavar = 'KEY=V1,V2',
                          help = 'digits runs: evaluate the drawings at every combination of these sampling settings (keys: the '
                                 'options above and seed, as cfg_scale=1,3 guidance_interval=0:1,0.6:1 seed=0,1,2); prints a table '
                                 'and writes sweep.json and sweep.png (accuracy against Fréchet distance and diversity) to the '
                                 'run folder, or to --out')
    evaluate.add_argument('--per-caption', type = positive_int, default = 4, help = 'image-text runs on the walk-through set: drawings per caption (default 4)')
    add_run_options(evaluate)
    add_parsers(commands)
    return parser


def main(argv: list[str] | None = None):
    """Runs a command; returns what it returns (the run folder for `train`, the figures for `eval`).
    An error in what was asked prints one line and exits with status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        if argv[:1] == ['train'] and not {'-h', '--help'} & set(argv):
            # `train` takes free-form --key value overrides, which argparse would mistake for the config
            rest = argv[1:]
            config = rest.pop(0) if rest and not rest[0].startswith('-') else None
            return command_train(argparse.Namespace(config = config), rest)
        args = parser.parse_args(argv)
        return {'sample': command_sample, 'eval': command_eval, **JOB_COMMANDS}[args.command](args)
    except (UsageError, ConfigError) as error:
        print(f'transfusion: error: {error}', file = sys.stderr)
        raise SystemExit(2)


def run():
    """The console script: `main`, exiting 0 (a returned value would be taken as an error)."""
    main()


if __name__ == '__main__':
    run()
