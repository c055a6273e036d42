"""The `transfusion` CLI's errors: every error in what the user asks (an option, a number, a
prompt, a config, a run folder) is one line, `transfusion: error: ...`, and exit status 2, and
a bad config is refused before anything is written. Also: a rerun in a run folder resumes the
run there, and refuses a config that would change what that run is."""

import json

import pytest
import torch

pytest.importorskip('sklearn')
pytest.importorskip('matplotlib')

from transfusion_pytorch import Transfusion, cli

TINY = ['--dim', '16', '--depth', '1', '--heads', '1', '--dim-head', '16', '--steps', '2', '--eval-every', '2',
        '--eval-per-label', '2', '--checkpoint-every', '2', '--max-tokens', '256', '--warmup-steps', '1', '--modality-steps', '2']


def cli_error(argv, capsys) -> str:
    """The one line `transfusion` prints for argv, which must fail with exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('transfusion: error: '), lines
    return lines[0]


@pytest.fixture(scope = 'module')
def folders(tmp_path_factory):
    """A tiny digits run folder and a model folder of a model that is not a digits model."""
    root = tmp_path_factory.mktemp('cli')
    threads = torch.get_num_threads()
    run = cli.main(['train', *TINY, '--name', 'tiny', '--out-root', str(root)])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    toy = Transfusion(num_text_tokens = 16, dim_latent = 8, modality_default_shape = (2,), transformer = dict(dim = 16, depth = 1, dim_head = 8, heads = 2))
    toy.save_pretrained(root / 'toy')
    return dict(root = root, run = run, toy = root / 'toy')


@pytest.mark.parametrize('argv, message', [
    # issue 12.5: an unknown word in the prompt
    (['sample', '{run}', '--prompt', 'draw seven'], "--prompt 'draw seven': unknown word 'seven': the digits vocabulary is 0 1 2 3 4 5 6 7 8 9 draw is"),
    (['sample', '{run}', '--prompt', 'is 3'], 'the digits model draws from prompts "draw <digit>" (or just the digit), got \'is 3\''),
    (['sample', '{run}', '--prompt', ''], 'the digits model draws from prompts'),
    # issue 16.13: bad numbers
    (['sample', '{run}', '--num', '0'], 'argument --num: expected an int >= 1, got 0'),
    (['sample', '{run}', '--num', '-1'], 'argument --num: expected an int >= 1, got -1'),
    (['sample', '{run}', '--num', 'many'], "argument --num: expected an int >= 1, got 'many'"),
    (['sample', '{run}', '--modality-steps', '0'], 'argument --modality-steps: expected an int >= 1, got 0'),
    (['eval', '{run}', '--per-label', '1'], 'argument --per-label: expected an int >= 2, got 1'),
    (['eval', '{run}', '--per-label', '140'], '--per-label must be an int in [2, 139] (the spread of a label takes two drawings'),
    (['eval', '{run}', '--captions', '0'], 'argument --captions: expected an int >= 1, got 0'),
    (['eval', '{run}', '--captions', '-5'], 'argument --captions: expected an int >= 1, got -5'),
    (['eval', '{run}', '--captions', '361'], 'argument --captions: there are 360 held-out digits to caption, got 361'),
    (['eval', '{run}', '--modality-steps', '0'], 'argument --modality-steps: expected an int >= 1, got 0'),
    # sampling settings and sweeps (issue 15)
    (['sample', '{run}', '--guidance-interval', '0.8:0.2'], 'guidance_interval must be two times (t_lo, t_hi) with 0 <= t_lo < t_hi <= 1'),
    (['sample', '{run}', '--guidance-interval', 'late'], "argument --guidance-interval: expected t_lo:t_hi (two numbers), got 'late'"),
    (['sample', '{run}', '--guidance-schedule', 'cosine'], "guidance_schedule must be one of ('constant', 'linear'), got 'cosine'"),
    (['eval', '{run}', '--ode-method', 'rk99'], "ode_method must be one of"),
    (['eval', '{run}', '--cfg-scale', 'inf'], 'cfg_scale must be a finite number (1: no guidance), got inf'),
    (['eval', '{run}', '--sweep', 'cfg_scal=1,2'], "--sweep: unknown key 'cfg_scal'; did you mean 'cfg_scale'? Valid keys: modality_steps,"),
    (['eval', '{run}', '--sweep', 'cfg_scale'], "--sweep: expected KEY=V1,V2,... (keys: modality_steps, ode_method,"),
    (['eval', '{run}', '--sweep', 'cfg_scale=1,x'], "--sweep: cfg_scale: expected float, got 'x'"),
    (['eval', '{run}', '--sweep', 'guidance_interval=0.5'], "--sweep: guidance_interval: expected t_lo:t_hi (two numbers), got '0.5'"),
    (['eval', '{run}', '--sweep', 'seed=1', 'seed=2'], '--sweep: seed is given twice'),
    (['eval', '{run}', '--sweep', 'cfg_scale=2', 'guidance_interval=0:1,0.7:0.6'],
     '--sweep: the point cfg_scale = 2.0, guidance_interval = (0.7, 0.6): guidance_interval must be two times'),
    (['eval', '{run}', '--cfg-scale', '2', '--sweep', 'cfg_scale=1,3'], '--sweep sweeps cfg_scale, also given as --cfg-scale: give it in one place'),
    (['eval', '{run}', '--captions', '5', '--sweep', 'cfg_scale=1,3'], '--captions: a sweep leaves captioning out'),
    # issue 16.15: options a model cannot use
    (['sample', '{toy}', '--prompt', 'draw 3'], 'is not a digits model and records no tokenizer, so a text prompt means nothing to it'),
    (['sample', '{run}', '--max-length', '64'], '--max-length is for models other than digits'),
    (['sample', '{toy}', '--max-length', '0'], 'argument --max-length: expected an int >= 1, got 0'),
    (['sample', '{toy}', '--no-ema'], "--no-ema picks a run folder's online weights"),
    (['eval', '{toy}'], 'transfusion eval knows the digits models'),
    # folders and files
    (['sample', '{root}/nothing'], 'is neither a run folder (with config.toml) nor a model folder (with config.json)'),
    (['eval', '{root}'], 'is neither a run folder'),
    (['sample', '{run}', '--out', '{root}/grid.txt'], "--out: an image needs one of the suffixes"),
    (['sample', '{run}', '--out', '{root}'], 'is a folder; give a file name'),
    (['sample', '{run}', '--out', '{run}/config.toml/x.png'], 'config.toml is a file'),
    # argparse's own errors
    ([], 'the following arguments are required: COMMAND (see transfusion --help)'),
    (['bogus'], "argument COMMAND: invalid choice: 'bogus'"),
    (['sample'], 'the following arguments are required: RUN_OR_MODEL (see transfusion sample --help)'),
    (['sample', '{run}', '--nmu', '3'], 'unrecognized arguments: --nmu 3'),
])
def test_an_error_is_one_line_and_exit_2(folders, capsys, argv, message):
    argv = [arg.format(**folders) for arg in argv]
    assert message in cli_error(argv, capsys)


def test_a_broken_model_folder_is_one_line(folders, capsys, tmp_path):
    (tmp_path / 'config.json').write_text('{"format": ')
    assert 'cannot load the model in' in cli_error(['sample', str(tmp_path)], capsys)
    (tmp_path / 'config.toml').write_text('dim = "wide"\n')
    assert "'dim' must be int, got 'wide'" in cli_error(['sample', str(tmp_path)], capsys)


@pytest.mark.parametrize('overrides, message', [
    (['--dim-head', '7'], 'config: transformer.dim_head must be even (rotary positions rotate pairs of dims), got 7'),
    (['--caption-fraction', '1.0'], "'caption_fraction' must lie in [0, 1)"),
    (['--ema-beta', '1.0'], 'config: ema_beta must lie in [0, 1) or be None, got 1.0'),
    (['--lr', '-0.001'], 'config: lr must be a finite number >= 0, got -0.001'),
    (['--lr', 'nan'], "'lr' must be a finite number, got nan"),
    (['--warmup-steps', '-1'], 'config: warmup_steps must be >= 0'),
    (['--checkpoint-every', '0'], 'config: checkpoint_every must be positive'),
    (['--threads', '-1'], "'threads' must be >= 0"),
    (['--eval-per-label', '1'], "'eval_per_label' must be an int in [2, 139] (the spread of a label takes two drawings"),
    (['--max-tokens', '10'], "'max_tokens' = 10 holds no sample: one takes 14 tokens"),
    (['--codec', 'unet', '--patch', '3'], 'patch must divide the image size 8, got 3'),
    (['--codec', 'custom'], "codec = 'custom' is the codec an example script passes to digits_job.train"),
    (['--codec', 'vq'], 'codec must be one of'),
    (['--activation-checkpointing', 'some'], "config: activation_checkpointing must be one of (None, 'selective', 'full'), got 'some'"),
    (['--compile', 'maybe'], "--compile: expected bool, got 'maybe'"),
])
def test_a_bad_config_is_refused_before_anything_is_written(tmp_path, capsys, overrides, message):
    assert message in cli_error(['train', *TINY, '--name', 'bad', '--out-root', str(tmp_path), *overrides], capsys)
    assert not (tmp_path / 'bad').exists()


def test_train_help_gives_the_demo_time_measured(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(['train', '--help'])
    assert exit.value.code == 0
    help_text = ' '.join(capsys.readouterr().out.split())
    assert 'under 2 minutes on 2 idle CPU cores' in help_text and '10 minutes' not in help_text
    assert 'A rerun may change only steps, threads,' in help_text


def test_compile_and_activation_checkpointing_reach_the_trainer(tmp_path):
    from transfusion_pytorch.config_files import parse_overrides
    from transfusion_pytorch.demos.digits_job import DigitsConfig, load_config, prepare

    overrides = parse_overrides(DigitsConfig, [*TINY, '--out-root', str(tmp_path), '--compile', 'true', '--activation-checkpointing', 'selective'])
    job = prepare(load_config(None, overrides), dataset = [])
    assert job.train_config.compile is True and job.train_config.activation_checkpointing == 'selective'
    job = prepare(load_config(None, parse_overrides(DigitsConfig, ['--out-root', str(tmp_path), '--activation-checkpointing', 'none'])), dataset = [])
    assert job.train_config.compile is False and job.train_config.activation_checkpointing is None


def test_a_rerun_resumes_and_refuses_another_config(tmp_path, capsys):
    base = ['train', *TINY, '--name', 'run', '--out-root', str(tmp_path)]
    run = cli.main(base)
    saved = (run / 'config.toml').read_text()

    message = cli_error([*base, '--dim', '32', '--lr', '0.01'], capsys)
    assert f'{run} holds a run with another config (dim = 16 in the run, 32 now; lr = 0.002 in the run, 0.01 now)' in message
    assert 'may change only steps, threads, checkpoint_every, eval_every, eval_per_label, modality_steps' in message
    assert (run / 'config.toml').read_text() == saved

    # a longer run, with keys a rerun may change: it resumes at step 2 and each step is logged once
    cli.main([*base, '--steps', '4', '--checkpoint-every', '4', '--eval-every', '4', '--eval-per-label', '2'])
    steps = [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert steps == [2, 4]
    assert 'steps = 4' in (run / 'config.toml').read_text()


def test_a_custom_codec_run_resumes_from_its_config_file(tmp_path):
    """`codec = "custom"` means the codec an example script saved with its run: rerunning the
    run's config.toml from the CLI uses that codec.pt."""
    from torch import nn
    from transfusion_pytorch.demos import digits_job
    from transfusion_pytorch.demos.codecs import ModuleCodec
    from transfusion_pytorch.config_files import parse_overrides

    torch.manual_seed(0)
    codec = ModuleCodec(nn.Conv2d(1, 4, 4, stride = 4), nn.ConvTranspose2d(4, 1, 4, stride = 4))
    overrides = parse_overrides(digits_job.DigitsConfig, [*TINY, '--name', 'custom', '--out-root', str(tmp_path)])
    threads = torch.get_num_threads()
    run = digits_job.train(digits_job.load_config(None, overrides), codec = codec)
    assert 'codec = "custom"' in (run / 'config.toml').read_text()

    cli.main(['train', str(run / 'config.toml'), '--steps', '3', '--eval-every', '3'])
    torch.set_num_threads(threads)
    steps = [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert steps == [2, 3]


def test_the_captions_benchmark_runs_on_a_run(folders, capsys):
    """benchmarks/captions_after_dropout.py imported a `load_model` the CLI no longer has."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parents[1] / 'benchmarks' / 'captions_after_dropout.py'
    spec = importlib.util.spec_from_file_location('captions_after_dropout', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.main([str(folders['run'])])
    assert 0 <= figures['ended'] <= figures['ended'] + figures['with_digit'] <= 1 and 0 <= figures['p_eos'] <= 1
    assert 'held-out image prompts answered with a digit' in capsys.readouterr().out


def test_every_checkpoint_damaged_is_one_line(tmp_path, capsys):
    """Issue 25, item 8: a rerun whose checkpoints are all damaged (here an unreadable trainer.pt
    in the newest, a truncated shard in the other) says so in one line, naming each fault."""
    from transfusion_pytorch.training.checkpoint import list_checkpoints
    from test_training_checkpoint import damage_trainer_state
    argv = ['train', *TINY[:TINY.index('--steps')], *TINY[TINY.index('--steps') + 2:], '--steps', '4', '--name', 'run', '--out-root', str(tmp_path)]
    run = cli.main(argv)
    older, newest = list_checkpoints(run / 'checkpoints')
    damage_trainer_state(newest)
    shard = next((older / 'state').glob('*.distcp'))
    shard.write_bytes(shard.read_bytes()[:-10])

    message = cli_error(argv, capsys)
    assert message.startswith(f'transfusion: error: no usable checkpoint in {run / "checkpoints"}, all 2 are damaged (')
    assert 'step_00000004: trainer.pt cannot be read (RuntimeError: PytorchStreamReader failed' in message
    assert 'step_00000002: state/__0_0.distcp has' in message and 'the manifest says' in message
    assert message.endswith('): move them away (or delete them) to start the run over')
