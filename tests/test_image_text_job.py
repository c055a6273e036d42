"""The image-text job end to end: each input kind through prepare -> train -> sample, the loss
falling on the walk-through set, an exact resume, refused data, and the commands."""

import json
import math

import pytest
import torch

Image = pytest.importorskip('PIL.Image')          # the data extra

from transfusion_pytorch import Transfusion, cli
from transfusion_pytorch.config_files import ConfigError
from transfusion_pytorch.data import shapes
from transfusion_pytorch.data.loader import StreamingLoader
from transfusion_pytorch.data.prepare import PrepareConfig, prepare
from transfusion_pytorch.data.tokenizers import TokenizerMismatch
from transfusion_pytorch.jobs import image_text, sampling
from transfusion_pytorch.training import Every

from data_helpers import make_tokenizer, make_vae, prepared_set

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = dict(dim = 32, depth = 2, heads = 2, dim_head = 16, max_tokens = 256, workers = 0, threads = 1, warmup_steps = 1,
            sample_every = 1000, log_every = 1, checkpoint_every = 1000, shuffle_buffer = 16, modality_steps = 2)


def config(tmp_path, data, name = 'run', **options) -> image_text.ImageTextConfig:
    return image_text.ImageTextConfig(**dict(TINY, data = tuple(map(str, data)), out_root = str(tmp_path / 'runs'), name = name,
                                             steps = 3) | options)


def losses(run_dir) -> dict[int, float]:
    return {m['step']: m['loss'] for m in map(json.loads, (run_dir / 'metrics.jsonl').read_text().splitlines()) if 'loss' in m}


def grid_size(png) -> tuple[int, int]:
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        return image.size


@pytest.mark.parametrize('format, vae, tokenizer', [
    ('imagefolder', False, False), ('datasets', True, False), ('parquet', False, True), ('webdataset', True, True),
])
def test_each_input_kind_prepares_trains_and_samples(tmp_path, format, vae, tokenizer):
    options = {}
    if vae:
        options.update(vae = str(make_vae(tmp_path / 'vae')), patch = 2)
    if tokenizer:
        options.update(tokenizer = str(make_tokenizer(tmp_path / 'tok')))
    prepared = prepared_set(tmp_path, format, num = 24, **options)
    run = image_text.train(config(tmp_path, [prepared.folder]))

    assert all(math.isfinite(loss) for loss in losses(run).values()) and max(losses(run)) == 3
    record = json.loads((run / 'data.json').read_text())
    assert record['codec']['kind'] == ('vae' if vae else 'patch') and record['tokenizer']['kind'] == ('huggingface' if tokenizer else 'bytes')

    out = tmp_path / 'grid.png'
    cli.main(['sample', str(run), '--prompt', 'a red circle at the top left', '--num', '3', '--out', str(out), '--modality-steps', '2'])
    width, height = grid_size(out)
    assert height == 64 + 2                     # one row of 16-pixel pictures shown 4x, and the gap
    assert width > 3 * (64 + 2)                 # three of them after the prompt's label


def test_the_loss_falls_on_the_walk_through_set(tmp_path):
    prepared = prepared_set(tmp_path, num = 96)
    run = image_text.train(config(tmp_path, [prepared.folder], steps = 100, dim = 64, lr = 3e-3, warmup_steps = 10))
    curve = list(losses(run).values())
    first, last = sum(curve[:5]) / 5, sum(curve[-20:]) / 20
    assert last < 0.5 * first, (first, last)


class Interrupt(Exception):
    pass


def test_a_killed_run_resumes_with_the_same_batches_bitwise(tmp_path, monkeypatch):
    prepared = prepared_set(tmp_path, num = 40, vae = str(make_vae(tmp_path / 'vae')), patch = 2)
    seen = []
    real = StreamingLoader.next_batch

    def recording(self):
        batch = real(self)
        seen.append((batch.global_index, batch.indices, [[t.clone() for t in sample] for sample in batch.samples]))
        return batch

    monkeypatch.setattr(StreamingLoader, 'next_batch', recording)
    options = dict(steps = 8, checkpoint_every = 3, workers = 2, max_tokens = 200)

    image_text.run_job(config(tmp_path, [prepared.folder], name = 'whole', **options))
    whole, seen[:] = list(seen), []

    def interrupt(trainer, step):
        raise Interrupt(step)
    with pytest.raises(Interrupt):
        image_text.run_job(config(tmp_path, [prepared.folder], name = 'killed', **options), callbacks = [Every(5, interrupt)])
    assert len(seen) == 5
    seen[:] = []
    run = image_text.run_job(config(tmp_path, [prepared.folder], name = 'killed', **options))     # resumes from step 3

    assert len(seen) == 5
    for (index, keys, samples), (want_index, want_keys, want_samples) in zip(seen, whole[3:]):
        assert (index, keys) == (want_index, want_keys)
        for sample, want in zip(samples, want_samples):
            assert all(torch.equal(a, b) for a, b in zip(sample, want))
    whole_losses = losses(tmp_path / 'runs' / 'whole')
    for step, loss in losses(run).items():
        if step > 3:
            assert loss == whole_losses[step], step


def test_data_from_another_tokenizer_is_refused_by_a_run(tmp_path):
    import shutil
    data = prepared_set(tmp_path / 'data', num = 8)
    image_text.train(config(tmp_path, [data.folder], steps = 1))
    # the same folder prepared again, with another tokenizer: the run's data.json refuses it
    shutil.rmtree(data.folder)
    prepared_set(tmp_path / 'data', num = 8, tokenizer = str(make_tokenizer(tmp_path / 'tok')))
    with pytest.raises(TokenizerMismatch, match = r'the data in .*data/prepared was tokenized with the tokenizer .*, but this run uses '
                                                  r'UTF-8 bytes \(vocabulary 256\)'):
        image_text.train(config(tmp_path, [data.folder], steps = 2))
    # and folders of two tokenizers do not make one run
    other = prepared_set(tmp_path / 'bytes', num = 8)
    with pytest.raises(TokenizerMismatch):
        image_text.train(config(tmp_path, [other.folder, data.folder], name = 'both', steps = 1))


def test_a_rerun_that_changes_the_run_is_refused(tmp_path):
    data = prepared_set(tmp_path, num = 8)
    image_text.train(config(tmp_path, [data.folder], steps = 1))
    # goes on: allowed, here with activation checkpointing switched on
    image_text.train(config(tmp_path, [data.folder], steps = 2, modality_steps = 3, activation_checkpointing = 'full'))
    with pytest.raises(ConfigError, match = r"holds a run with another config \(dim = 32 in the run, 48 now\). A rerun resumes that run"):
        image_text.train(config(tmp_path, [data.folder], steps = 3, dim = 48))


def test_text_rows_mix_in_and_the_mix_is_recorded(tmp_path):
    images = prepared_set(tmp_path, num = 24)
    corpus = tmp_path / 'corpus.jsonl'
    corpus.write_text(''.join(json.dumps(dict(text = f'row {i}: some words')) + '\n' for i in range(40)))
    text = prepare(PrepareConfig(source = str(corpus), out = str(tmp_path / 'text'), progress = False))
    run = image_text.train(config(tmp_path, [images.folder], text_data = (str(text.folder),), text_weight = 0.5, steps = 4))
    record = json.loads((run / 'data.json').read_text())
    assert record['weights'] == [0.5, 0.5] and [f['kind'] for f in record['folders']] == ['image_text', 'text']
    last = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()][-1]
    assert 0 < last['mix/text'] < 1 and last['mix/text'] + last['mix/prepared'] == pytest.approx(1)


@pytest.fixture(scope = 'module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('trained')
    prepared = prepared_set(root, num = 24)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = image_text.train(config(root, [prepared.folder], steps = 2, sample_every = 2, samples_per_prompt = 2))
    torch.set_num_threads(threads)
    return run, prepared


def test_a_run_writes_sample_grids_and_the_model(trained):
    run, _ = trained
    assert (run / 'samples' / 'step_000002.png').exists() and (run / 'pretrained_ema' / 'config.json').exists()
    assert grid_size(run / 'samples' / 'step_000002.png')[1] == 16 + 4 * (64 + 2)     # the title and 4 prompts of the data


def test_sampling_is_seeded(trained, tmp_path):
    run, _ = trained

    def sample(seed, name):
        out = tmp_path / name
        cli.main(['sample', str(run), '--prompt', 'a blue square at the top right', '--num', '2', '--out', str(out),
                  '--seed', str(seed), '--modality-steps', '2', '--cfg-scale', '2'])
        return out.read_bytes()
    assert sample(3, 'a.png') == sample(3, 'b.png') != sample(4, 'c.png')


def test_captioning_a_picture_file_is_captioning_its_prepared_latent(trained, tmp_path, capsys):
    run, prepared = trained
    key, picture, _ = next(shapes.pictures(1, 16))
    path = tmp_path / 'picture.png'
    picture.save(path)
    written = cli.main(['caption', str(run), str(path)])
    assert capsys.readouterr().out.strip() == written[0]

    # the same as what the model writes greedily after this picture's latent in the shards
    from transfusion_pytorch.data.shards import Shard
    with Shard(prepared.shard_paths()[0]) as shard:
        latent = shard.tensors(0)['mean']
    model, assets, _ = sampling.load_run(run)
    budget = assets.max_caption_tokens + 1                  # generated after the picture: the caption and EOS
    sample = model.sample([[latent]], max_length = budget, text_temperature = 0., return_latents = True)[0]
    assert written == [assets.tokenizer.decode(sampling.text_after_modality(sample)).strip()]


def test_the_train_command_takes_a_toml_file_and_names_a_mistyped_key(trained, tmp_path, capsys):
    _, prepared = trained
    toml = tmp_path / 'job.toml'
    toml.write_text(f'job = "image_text"\ndata = ["{prepared.folder}"]\nout_root = "{tmp_path}"\nname = "toml"\nsteps = 1\n'
                    f'dim = 32\ndepth = 1\nheads = 2\ndim_head = 16\nmax_tokens = 256\nworkers = 0\nthreads = 1\n')
    run = cli.main(['train', str(toml), '--sample-every', '5', '--time-distribution', 'uniform', '--min-time-before-text', '0'])
    assert (run / 'pretrained' / 'model.safetensors').exists()
    assert 'sample_every = 5' in (run / 'config.toml').read_text()
    saved = Transfusion.from_pretrained(run / 'pretrained').config
    assert (saved.time_distribution, saved.min_time_before_text) == ('uniform', 0.)               # the keys reach the model

    with pytest.raises(SystemExit):
        cli.main(['train', '--job', 'image_text', '--data', str(prepared.folder), '--dmi', '8'])
    assert "unknown option '--dmi'; did you mean '--dim'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(['train', '--job', 'image_text'])
    assert "'data' is required" in capsys.readouterr().err


def test_bad_job_settings_are_errors_naming_the_key(trained, tmp_path):
    _, prepared = trained
    corpus = tmp_path / 'corpus.txt'
    corpus.write_text('some text\n')
    text = prepare(PrepareConfig(source = str(corpus), out = str(tmp_path / 'text'), progress = False))
    with pytest.raises(ValueError, match = r"'data_weights' needs one weight per data folder \(1\), got 2"):
        config(tmp_path, [prepared.folder], data_weights = '1,2')
    with pytest.raises(ValueError, match = r"'caption_fraction' must lie in \[0, 1\], got 1.5"):
        config(tmp_path, [prepared.folder], caption_fraction = 1.5)
    with pytest.raises(ValueError, match = r"'activation_checkpointing' must be one of \(None, 'selective', 'full'\), got 'some'"):
        config(tmp_path, [prepared.folder], activation_checkpointing = 'some')
    with pytest.raises(ValueError, match = r"'time_distribution' must be one of \('logit_normal', 'uniform'\), got 'cosine'"):
        config(tmp_path, [prepared.folder], time_distribution = 'cosine')
    with pytest.raises(ValueError, match = r"'min_time_before_text' must lie in \[0, 1\) \(0: no limit\), got -0.5"):
        config(tmp_path, [prepared.folder], min_time_before_text = -0.5)
    with pytest.raises(ValueError, match = r"'data': .*text holds text rows; image-caption folders go in 'data', text-only ones in 'text_data'"):
        image_text.train(config(tmp_path, [text.folder]))
    with pytest.raises(ValueError, match = r"'text_data': .*prepared holds image_text rows, not text-only rows"):
        image_text.train(config(tmp_path, [prepared.folder], text_data = (str(prepared.folder),)))


def test_more_workers_than_samples_is_a_one_line_error(trained, tmp_path, capsys):
    """`--workers` are the DataLoader workers of each rank; each reads its own part of every
    folder, so a folder needs a sample per reader. More was a ValueError traceback."""
    _, prepared = trained
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli.main(['train', '--job', 'image_text', '--data', str(prepared.folder), '--workers', '25', '--out-root', str(tmp_path)])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f'transfusion: error: {prepared.folder} has 24 samples, fewer than the 25 readers (1 ranks x 25 workers): use fewer workers']
    assert not list(tmp_path.iterdir())                     # refused before the run folder is made


def test_sample_draws_a_row_for_each_prompt(trained, tmp_path, capsys):
    run, _ = trained
    out = tmp_path / 'rows.png'
    cli.main(['sample', str(run), '--prompt', 'a red circle at the top left|a blue square at the bottom right', '--num', '3',
              '--out', str(out), '--modality-steps', '2'])
    assert grid_size(out)[1] == 2 * (64 + 2)
    assert 'wrote 6 pictures of a red circle at the top left | a blue square at the bottom right' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(['sample', str(run), '--num', '2'])
    assert "--prompt: an image-text run draws pictures for a caption" in capsys.readouterr().err


def test_a_run_on_aspect_ratio_buckets(tmp_path):
    """Pictures of three aspect ratios prepared into buckets train together (latents of
    several shapes in one batch) and the run samples at the most common shape."""
    root = tmp_path / 'wide'
    (root / 'images').mkdir(parents = True)
    rows = []
    for i, (_, picture, caption) in enumerate(shapes.pictures(20, 32)):
        width, height = [(32, 32), (32, 32), (32, 16), (16, 32)][i % 4]
        picture.resize((width, height)).save(root / 'images' / f'{i}.png')
        rows.append(json.dumps(dict(file_name = f'images/{i}.png', text = caption)))
    (root / 'metadata.jsonl').write_text('\n'.join(rows) + '\n')
    prepared = prepare(PrepareConfig(source = str(root), out = str(tmp_path / 'prepared'), image_size = 16, buckets = True, progress = False))
    assert set(prepared.manifest['shapes']) == {'4x4', '3x6', '6x3'}

    run = image_text.train(config(tmp_path, [prepared.folder], steps = 3, max_tokens = 400))
    assert all(math.isfinite(loss) for loss in losses(run).values())
    assert json.loads((run / 'data.json').read_text())['shape'] == [4, 4]


def test_eval_refuses_a_sweep_of_an_image_text_run(trained, capsys):
    run, _ = trained
    with pytest.raises(SystemExit) as exit:
        cli.main(['eval', str(run), '--sweep', 'cfg_scale=1,3'])
    assert exit.value.code == 2
    assert '--sweep measures digits runs (their reader and feature space); not an image-text run' in capsys.readouterr().err
