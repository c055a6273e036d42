"""The commands of the image-text job as a user meets them: a sample over the token budget,
empty prompts, pictures and folders that are not what is asked, a moved tokenizer and VAE,
sizes of a bucketed run, and runs that are not on the walk-through set. Each error is one line
and exit status 2."""

import json
import shutil

import pytest
import torch

Image = pytest.importorskip('PIL.Image')          # the data extra

from transfusion_pytorch import cli
from transfusion_pytorch.data import shapes
from transfusion_pytorch.data.prepare import PrepareConfig, prepare
from transfusion_pytorch.jobs import image_text

from data_helpers import make_tokenizer, make_vae, prepared_set

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = dict(dim = 32, depth = 1, heads = 2, dim_head = 16, max_tokens = 400, workers = 0, threads = 1, warmup_steps = 1,
            sample_every = 1000, log_every = 1, checkpoint_every = 1000, shuffle_buffer = 16, modality_steps = 2, steps = 1)


def train_args(data, root, name, **options) -> list[str]:
    """`transfusion train --job image_text` on `data` with the tiny settings."""
    settings = dict(TINY, data = str(data), out_root = str(root), name = name) | options
    return ['train', '--job', 'image_text', *(a for key, value in settings.items() for a in (f"--{key.replace('_', '-')}", str(value)))]


def error_of(argv, capsys) -> str:
    """The one line a command that fails prints, checked to be one line and exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    err = err[err.find('transfusion: error: '):]             # after the progress bar, if training started
    assert err.startswith('transfusion: error: ') and err.count('\n') == 1, err
    return err


def picture_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


@pytest.fixture(scope = 'module')
def trained(tmp_path_factory):
    """A tiny run on the walk-through set."""
    root = tmp_path_factory.mktemp('trained')
    prepared = prepared_set(root, num = 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = cli.main(train_args(prepared.folder, root / 'runs', 'run'))
    torch.set_num_threads(threads)
    return run, prepared


# item 8: one-line errors

def test_a_sample_over_max_tokens_is_one_line(tmp_path, capsys):
    prepared = prepared_set(tmp_path, num = 8)
    err = error_of(train_args(prepared.folder, tmp_path / 'runs', 'short', max_tokens = 20), capsys)
    assert f'of {prepared.folder} has ' in err and 'tokens, more than the budget of max_tokens = 20: raise max_tokens' in err
    assert not (tmp_path / 'runs' / 'short').exists()


@pytest.mark.parametrize('prompt', ['', '|', '   ', 'a red circle at the top left||a blue square at the top right'])
def test_an_empty_prompt_is_one_line(trained, tmp_path, capsys, prompt):
    run, _ = trained
    err = error_of(['sample', str(run), '--prompt', prompt, '--out', str(tmp_path / 'x.png')], capsys)
    assert f'--prompt: expected one caption, or captions separated by "|", none of them empty; got {prompt!r}' in err
    assert not (tmp_path / 'x.png').exists()


def test_caption_of_what_is_not_a_picture_or_not_a_run_is_one_line(trained, tmp_path, capsys):
    run, _ = trained
    text = tmp_path / 'notes.png'
    text.write_text('not a picture')
    assert f'{text} is not a picture that can be read (' in error_of(['caption', str(run), str(text)], capsys)

    picture = tmp_path / 'picture.png'
    next(shapes.pictures(1, 16))[1].save(picture)
    assert f'{tmp_path} is no run folder, not a run of the image_text job' in error_of(['caption', str(tmp_path), str(picture)], capsys)


def test_eval_makes_the_folder_of_out_and_fails_before_the_work_when_it_cannot(trained, tmp_path, capsys):
    run, _ = trained
    out = tmp_path / 'missing' / 'deeper' / 'e.json'
    results = cli.main(['eval', str(run), '--out', str(out), '--per-caption', '1', '--modality-steps', '1'])
    assert json.loads(out.read_text())['num_drawings'] == results['num_drawings']

    blocking = tmp_path / 'a-file'
    blocking.write_text('')
    assert f'--out: {blocking} is a file, so {blocking}/e.json cannot be written' in \
        error_of(['eval', str(run), '--out', str(blocking / 'e.json')], capsys)


# item 13: a moved tokenizer or VAE

def test_a_moved_tokenizer_and_vae_are_given_to_every_command(tmp_path, capsys):
    vae, tokenizer = make_vae(tmp_path / 'vae'), make_tokenizer(tmp_path / 'tok')
    prepared = prepared_set(tmp_path, num = 16, vae = str(vae), patch = 2, tokenizer = str(tokenizer))
    run = cli.main(train_args(prepared.folder, tmp_path / 'runs', 'before'))
    new_vae, new_tokenizer = tmp_path / 'moved' / 'vae', tmp_path / 'moved' / 'tok'
    (tmp_path / 'moved').mkdir()
    vae.rename(new_vae)
    tokenizer.rename(new_tokenizer)
    picture = tmp_path / 'picture.png'
    next(shapes.pictures(1, 16))[1].save(picture)
    out = str(tmp_path / 'grid.png')

    # without the flags: one line, naming the missing folder and the flag
    sample = ['sample', str(run), '--prompt', 'a red circle at the top left', '--num', '1', '--out', out]
    err = error_of(sample, capsys)
    assert f"the run's tokenizer folder {tokenizer.resolve()} is not there any more" in err and 'give its new folder with --tokenizer' in err
    err = error_of(sample + ['--tokenizer', str(new_tokenizer)], capsys)
    assert f"the run's vae folder {vae.resolve()} is not there any more" in err and 'give its new folder with --vae' in err
    assert '--tokenizer /nowhere: tokenizer: /nowhere is not a folder' in error_of(sample + ['--tokenizer', '/nowhere'], capsys)
    other = make_tokenizer(tmp_path / 'other', extra_words = ('purple',))
    assert f'--tokenizer {other}: the tokenizer at {other} was tokenized with the tokenizer' in \
        error_of(sample + ['--tokenizer', str(other)], capsys)
    assert "the run's tokenizer folder" in error_of(['caption', str(run), str(picture)], capsys)

    # with them: every command runs
    moved = ['--tokenizer', str(new_tokenizer), '--vae', str(new_vae)]
    cli.main(sample + moved)
    assert picture_size(out)[1] == 64 + 2                # one row of 16-pixel pictures shown 4x, and the gap
    assert len(cli.main(['caption', str(run), str(picture), *moved])) == 1
    assert cli.main(['eval', str(run), '--per-caption', '1', '--modality-steps', '1', *moved])['num_drawings'] > 0

    # a new run on the data, given the moved folders: trains, draws its default prompts, and
    # records where they are now, so that sampling it needs no flags
    again = cli.main(train_args(prepared.folder, tmp_path / 'runs', 'after', sample_every = 1, samples_per_prompt = 1) + moved)
    assert (again / 'samples' / 'step_000001.png').exists()
    record = json.loads((again / 'data.json').read_text())
    assert (record['tokenizer']['path'], record['codec']['path']) == (str(new_tokenizer.resolve()), str(new_vae.resolve()))
    cli.main(['sample', str(again), '--prompt', 'a red circle at the top left', '--num', '1', '--out', out])


def test_a_tokenizer_or_vae_given_to_a_run_of_bytes_and_patches_is_refused(trained, tmp_path, capsys):
    """A run prepared without --tokenizer and --vae has no such folders: one given to it was
    silently ignored (a mistyped path passed); it is one line naming the option."""
    run, prepared = trained
    out = str(tmp_path / 'grid.png')
    sample = ['sample', str(run), '--prompt', 'a red circle at the top left', '--num', '1', '--out', out]
    assert '--tokenizer /nowhere: the data was tokenized as UTF-8 bytes, which need no tokenizer folder' in \
        error_of(sample + ['--tokenizer', '/nowhere'], capsys)
    assert '--vae /nowhere: the data was encoded by the patch codec (patch 4), not a VAE' in error_of(sample + ['--vae', '/nowhere'], capsys)
    err = error_of(train_args(prepared.folder, tmp_path / 'runs', 'other', tokenizer = '/nowhere'), capsys)
    assert '--tokenizer /nowhere: the data was tokenized as UTF-8 bytes' in err
    assert not (tmp_path / 'runs' / 'other').exists()


def test_shapes_refuses_what_it_cannot_write_in_one_line(tmp_path, capsys):
    """`transfusion shapes` wrote 0 drawings and exited 0 for --num 0, drew unreadable 5-pixel
    pictures, and a file as OUT was a FileExistsError traceback."""
    assert 'argument --num: expected an int >= 1, got 0' in error_of(['shapes', str(tmp_path / 'a'), '--num', '0'], capsys)
    assert f'argument --size: expected an int >= {shapes.MIN_SIZE}, got 5' in error_of(['shapes', str(tmp_path / 'a'), '--size', '5'], capsys)
    a_file = tmp_path / 'a-file'
    a_file.write_text('')
    assert f'OUT: {a_file} is a file; give a folder to write the drawings to' in error_of(['shapes', str(a_file), '--num', '2'], capsys)
    assert f'OUT: {a_file} is a file, so the folder {a_file}/set cannot be made' in \
        error_of(['shapes', str(a_file / 'set'), '--num', '2'], capsys)
    assert not (tmp_path / 'a').exists()
    out = cli.main(['shapes', str(tmp_path / 'small'), '--num', '2', '--size', str(shapes.MIN_SIZE)])
    assert [picture_size(path) for path in sorted((out / 'images').iterdir())] == [(shapes.MIN_SIZE, shapes.MIN_SIZE)] * 2


def test_prepare_with_a_folder_that_is_no_tokenizer_is_one_line(tmp_path, capsys):
    """`prepare --tokenizer` of a folder without a tokenizer printed transformers' message over
    five lines, naming neither the option nor the folder."""
    source = shapes.write_set(tmp_path / 'set', 4, 16)
    err = error_of(['prepare', str(source), '--out', str(tmp_path / 'out'), '--tokenizer', str(source)], capsys)
    assert f'tokenizer: {source} has no tokenizer_config.json or tokenizer.json' in err


def test_sampling_options_of_an_image_text_run_are_checked_in_one_line(trained, tmp_path, capsys):
    """`sample` and `eval` of an image-text run handed the sampling options to `model.sample`
    unchecked: --ode-method foo or --cfg-scale nan was a ValueError traceback."""
    run, _ = trained
    sample = ['sample', str(run), '--prompt', 'a red circle at the top left', '--num', '1', '--out', str(tmp_path / 'grid.png')]
    assert "ode_method must be one of ('euler', 'midpoint'" in error_of(sample + ['--ode-method', 'foo'], capsys)
    assert 'cfg_scale must be a finite number (1: no guidance), got nan' in error_of(sample + ['--cfg-scale', 'nan'], capsys)
    assert 'guidance_schedule must be one of' in error_of(['eval', str(run), '--guidance-schedule', 'x'], capsys)
    assert not (tmp_path / 'grid.png').exists() and not (run / 'eval.json').exists()
    cli.main(sample + ['--ode-method', 'midpoint', '--modality-steps', '1'])
    assert picture_size(tmp_path / 'grid.png')[1] == 64 + 2


def test_prepare_split_of_a_source_without_splits_is_refused(tmp_path, capsys):
    """`prepare --split test` of a saved Dataset (not a DatasetDict) or an imagefolder prepared
    every record, the option silently ignored; it is one line, and the corrected command runs."""
    pytest.importorskip('datasets')
    saved, folder = shapes.write_set(tmp_path / 'saved', 4, 16, format = 'datasets'), shapes.write_set(tmp_path / 'folder', 4, 16)
    out = tmp_path / 'out'
    assert f"--split 'test': {saved} holds one Dataset, which has no splits" in \
        error_of(['prepare', str(saved), '--out', str(out), '--image-size', '16', '--split', 'test'], capsys)
    assert f"--split 'test': {folder} is a source of kind imagefolder, which has no splits" in \
        error_of(['prepare', str(folder), '--out', str(out), '--image-size', '16', '--split', 'test'], capsys)
    assert cli.main(['prepare', str(saved), '--out', str(out), '--image-size', '16']).num_samples == 4


def test_caption_of_a_folder_or_a_missing_file_says_which(trained, tmp_path, capsys):
    """`caption RUN folder` said 'no such picture file' of a folder that is there."""
    run, _ = trained
    assert f'{tmp_path} is a folder; give its picture files (such as {tmp_path / "*.png"})' in \
        error_of(['caption', str(run), str(tmp_path)], capsys)
    assert f'no such picture file: {tmp_path / "gone.png"}' in error_of(['caption', str(run), str(tmp_path / 'gone.png')], capsys)


def test_a_data_folder_of_the_other_kind_is_one_line(trained, tmp_path, capsys):
    """`train --data TEXT_FOLDER` (or --text-data of image-caption rows) was a ValueError traceback."""
    _, prepared = trained
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('some text\nmore text\n')
    text = prepare(PrepareConfig(source = str(corpus), out = str(tmp_path / 'text'), progress = False))
    err = error_of(train_args(text.folder, tmp_path / 'runs', 'text'), capsys)
    assert f"'data': {text.folder} holds text rows; image-caption folders go in 'data', text-only ones in 'text_data'" in err
    err = error_of(train_args(prepared.folder, tmp_path / 'runs', 'text') + ['--text-data', str(prepared.folder)], capsys)
    assert f"'text_data': {prepared.folder} holds image_text rows, not text-only rows" in err
    assert not (tmp_path / 'runs').exists()


def test_a_bad_training_or_sampling_value_is_one_line_and_the_corrected_command_runs(trained, tmp_path, capsys):
    """`train --job image_text --lr -1` (or --ema-beta 2) was a ValueError traceback after
    config.toml was written, so the corrected command was refused as another run; --cfg-scale
    nan failed only after training, at the first grid; --data-weights 0 divided by zero; a
    value the model rejects was a traceback; --threads -1 passed."""
    _, prepared = trained
    root = tmp_path / 'runs'
    for option, value, message in (('lr', -1, 'config: lr must be a finite number >= 0, got -1.0'),
                                   ('ema_beta', 2, 'config: ema_beta must lie in [0, 1) or be None, got 2.0'),
                                   ('cfg_scale', 'nan', 'config: cfg_scale must be a finite number (1: no guidance), got nan'),
                                   ('data_weights', 0, "'data_weights' must be finite numbers >= 0, not all 0, got (0.0,)"),
                                   ('dim_head', 7, 'config: transformer.dim_head must be even (rotary positions rotate pairs of dims)'),
                                   ('flow_loss_weight', -1, 'config: flow_loss_weight must be a finite number >= 0'),
                                   ('threads', -1, "'threads' must be >= 0 (0: the torch default), got -1")):
        assert message in error_of(train_args(prepared.folder, root, 'run', **{option: value}), capsys)
        assert not (root / 'run').exists()
    assert cli.main(train_args(prepared.folder, root, 'run')) == root / 'run'


# item 16 and 17: a bucketed run on other captions

@pytest.fixture(scope = 'module')
def bucketed(tmp_path_factory):
    """A tiny run on pictures of three aspect ratios in buckets, captioned with words the
    walk-through checker does not read."""
    root = tmp_path_factory.mktemp('bucketed')
    (root / 'set' / 'images').mkdir(parents = True)
    rows = []
    for i, (_, picture, _) in enumerate(shapes.pictures(16, 32)):
        width, height = [(32, 32), (32, 32), (32, 16), (16, 32)][i % 4]
        picture.resize((width, height)).save(root / 'set' / 'images' / f'{i}.png')
        rows.append(json.dumps(dict(file_name = f'images/{i}.png', text = f'picture number {i}')))
    (root / 'set' / 'metadata.jsonl').write_text('\n'.join(rows) + '\n')
    prepared = prepare(PrepareConfig(source = str(root / 'set'), out = str(root / 'prepared'), image_size = 16, buckets = True,
                                     progress = False))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = image_text.train(image_text.ImageTextConfig(**dict(TINY, data = (str(prepared.folder),), out_root = str(root / 'runs'))))
    torch.set_num_threads(threads)
    return run


def test_sample_draws_the_size_asked_for(bucketed, tmp_path, capsys):
    record = json.loads((bucketed / 'data.json').read_text())
    assert record['shapes'] == [[3, 6], [4, 4], [6, 3]]          # latent (height, width), patch 4
    out = tmp_path / 'wide.png'
    for size, (width, height) in [(None, (16, 16)), ('24x12', (24, 12)), ('12x24', (12, 24)), ('16X16', (16, 16))]:
        cli.main(['sample', str(bucketed), '--prompt', 'picture number 2', '--num', '2', '--out', str(out), '--threads', '1']
                 + (['--shape', size] if size else []))
        if size is not None:
            assert f'wrote 2 pictures of picture number 2 to {out} ({width}x{height} pixels)' in capsys.readouterr().out
        with Image.open(out) as grid:
            scale = -(-64 // min(width, height))                    # the grid shows each picture at least 64 pixels a side
            assert grid.size[1] == height * scale + 2

    for size in ('20x20', '24x16', '48x24'):
        assert f'--shape {size}: this run was trained on pictures of 24x12, 16x16, 12x24 pixels (width x height; its buckets)' in \
            error_of(['sample', str(bucketed), '--prompt', 'a', '--shape', size, '--out', str(out)], capsys)
    assert "--shape: expected WIDTHxHEIGHT in pixels, such as 24x12, got 'wide'" in \
        error_of(['sample', str(bucketed), '--prompt', 'a', '--shape', 'wide', '--out', str(out)], capsys)


def test_draw_takes_a_shape_in_python(bucketed):
    from transfusion_pytorch.jobs import sampling
    model, assets, _ = sampling.load_run(bucketed)
    pixels = sampling.draw(model, assets, ['picture number 1'], modality_steps = 1, shape = (3, 6))
    assert pixels.shape == (1, 3, 12, 24)


def test_eval_refuses_a_run_that_is_not_on_the_walk_through_set(bucketed, capsys):
    err = error_of(['eval', str(bucketed), '--per-caption', '1'], capsys)
    assert f"eval measures runs on the walk-through set" in err and f"{bucketed} was trained on other captions ('picture number" in err


# item 17: the small ones

def test_small_ones(trained, tmp_path, capsys):
    run, prepared = trained
    # prepare --patch 0 means what it says: an error
    assert 'patch must be a positive int (or None for the default), got 0' in \
        error_of(['prepare', str(prepared.folder.parent / 'set'), '--out', str(tmp_path / 'p'), '--patch', '0'], capsys)
    # a value given on the command line is reported as such
    assert "transfusion: error: the command line: 'caption_fraction' must lie in [0, 1], got 1.5" in \
        error_of(['train', '--job', 'image_text', '--data', str(prepared.folder), '--caption-fraction', '1.5'], capsys)
    # --threads: sample, caption and eval take it
    picture = tmp_path / 'picture.png'
    next(shapes.pictures(1, 16))[1].save(picture)
    for argv in (['sample', str(run), '--prompt', 'a', '--num', '1', '--out', str(tmp_path / 'g.png')], ['caption', str(run), str(picture)]):
        torch.set_num_threads(1)
        cli.main(argv + ['--threads', '2'])
        assert torch.get_num_threads() == 2
    assert 'argument --threads: expected an int >= 1, got 0' in error_of(['eval', str(run), '--threads', '0'], capsys)
    # the options of image-text runs, for another folder
    assert f'--shape is for runs of the image_text job; {tmp_path} is not one' in error_of(['sample', str(tmp_path), '--shape', '16x16'], capsys)
    assert f'--vae is for runs of the image_text job; {tmp_path} is not one' in error_of(['eval', str(tmp_path), '--vae', 'v'], capsys)
    # train --help names both jobs
    with pytest.raises(SystemExit):
        cli.main(['train', '--help'])
    out = capsys.readouterr().out
    assert 'for now' not in out and 'the job: "digits" (here) or "image_text"' in out


# item 11: a bad value in a prepared folder is named by its shard and key

def test_a_nan_in_a_prepared_folder_is_named_by_its_shard_and_key(tmp_path, capsys, monkeypatch):
    from transfusion_pytorch.data.loader import SlotStream
    from transfusion_pytorch.data.shards import Shard
    prepared = prepared_set(tmp_path, num = 24)                 # two shards of 16 and 8
    shard = prepared.shard_paths()[1]
    with Shard(shard) as opened:
        key = opened.samples[3]['key']
    real = SlotStream.materialize

    def with_a_nan(self, source, epoch, shard, sample, entry):
        """The sample as read, its latent turned bad where the key is `key` (as a damaged file would give it)."""
        elements = real(self, source, epoch, shard, sample, entry)
        if entry['key'] == key:
            elements = [e.clone().fill_(float('nan')) if e.is_floating_point() else e for e in elements]
        return elements

    monkeypatch.setattr(SlotStream, 'materialize', with_a_nan)
    err = error_of(train_args(prepared.folder, tmp_path / 'runs', 'nan', steps = 30, max_tokens = 200), capsys)
    assert f"sample {key!r} of {prepared.folder} (in {shard.name}): `sample[" in err
    assert '`: modality values must be finite, got NaN or inf' in err
