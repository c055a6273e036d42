"""Versioned configs: a saved model and a run folder record `format_version` and every key; one
saved before a default changed loads (a model) or resumes (a run) with its old default and a
note; one from a newer version is refused; a TOML array and a `--key a,b` override give the
same tuple."""

import dataclasses
import json
import sys
import typing
import warnings

import pytest
import torch

from transfusion_pytorch import Transfusion, cli
from transfusion_pytorch.config import TransfusionConfig
from transfusion_pytorch.config_files import ConfigError, field_types, load, load_saved, parse_overrides, parse_value, to_toml
from transfusion_pytorch.jobs.image_text_config import ImageTextConfig
from transfusion_pytorch.versions import DEFAULT_CHANGES, FORMAT_VERSION

if sys.version_info >= (3, 11):
    import tomllib
else:                                               # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.usefixtures('one_thread')


def notes(caught) -> list[str]:
    """The notes of kept defaults among the warnings caught."""
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and ('records no' in str(w.message) or 'was made with' in str(w.message))]


def as_before_versions(path, drop = ('time_distribution',)):
    """Rewrites a run's config.toml as the code before versions wrote it: no format_version, no
    none_keys, and without the keys in `drop` (not there yet)."""
    keys = ('format_version', 'none_keys', *drop)
    lines = path.read_text().splitlines()
    path.write_text('\n'.join(line for line in lines if line.split(' = ')[0] not in keys) + '\n')


# a saved model

def tiny_model(tmp_path):
    torch.manual_seed(0)
    model = Transfusion(num_text_tokens = 16, dim_latent = 8, modality_default_shape = (2,), transformer = dict(dim = 16, depth = 1, dim_head = 8, heads = 2))
    return model.save_pretrained(tmp_path / 'model')


def test_a_model_records_its_format_version_and_every_key(tmp_path):
    saved = json.loads((tiny_model(tmp_path) / 'config.json').read_text())
    assert saved['format_version'] == FORMAT_VERSION
    assert set(saved['config']) == {f.name for f in dataclasses.fields(TransfusionConfig)}


def test_a_model_saved_before_versions_keeps_its_old_default_with_a_note(tmp_path):
    directory = tiny_model(tmp_path)
    saved = json.loads((directory / 'config.json').read_text())
    del saved['format_version'], saved['config']['time_distribution']
    saved['version'] = 1                                    # what config.json held before
    (directory / 'config.json').write_text(json.dumps(saved))

    with warnings.catch_warnings(record = True) as caught:
        warnings.simplefilter('always')
        model = Transfusion.from_pretrained(directory)
    assert model.config.time_distribution == 'uniform' and model.config.min_time_before_text == 0.5    # the one recorded stays
    assert notes(caught) == [f"{directory / 'config.json'} (format version 0) records no time_distribution: the model keeps "
                             f"time_distribution = 'uniform', the default when it was saved (the default is now 'logit_normal': "
                             f"{DEFAULT_CHANGES[0].why}); to opt in, set \"time_distribution\": \"logit_normal\" in its config"]

    # saved again, it records the old default, and loads so without a note
    model.save_pretrained(tmp_path / 'again')
    with warnings.catch_warnings(record = True) as caught:
        warnings.simplefilter('always')
        assert Transfusion.from_pretrained(tmp_path / 'again').config.time_distribution == 'uniform'
    assert notes(caught) == []


def test_a_model_from_a_newer_version_is_refused(tmp_path, capsys):
    directory = tiny_model(tmp_path)
    saved = json.loads((directory / 'config.json').read_text())
    (directory / 'config.json').write_text(json.dumps(dict(saved, format_version = FORMAT_VERSION + 1)))
    message = (f"{directory / 'config.json'} was written with format version {FORMAT_VERSION + 1}, newer than this "
               f"transfusion-pytorch reads (format version {FORMAT_VERSION}): upgrade transfusion-pytorch to load it")
    with pytest.raises(ValueError) as error:
        Transfusion.from_pretrained(directory)
    assert str(error.value) == message

    with pytest.raises(SystemExit) as exit:
        cli.main(['sample', str(directory)])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == f'transfusion: error: cannot load the model in {directory}: {message}'


# run folders

DIGITS_TINY = ['--dim', '16', '--depth', '1', '--heads', '1', '--dim-head', '16', '--steps', '2', '--eval-every', '2', '--eval-per-label', '2',
               '--checkpoint-every', '2', '--max-tokens', '256', '--warmup-steps', '1', '--modality-steps', '2']


def test_a_digits_run_made_before_versions_resumes_with_its_old_default(tmp_path):
    pytest.importorskip('sklearn')
    pytest.importorskip('matplotlib')
    base = ['train', *DIGITS_TINY, '--name', 'run', '--out-root', str(tmp_path)]
    run = cli.main(base)
    assert tomllib.loads((run / 'config.toml').read_text())['format_version'] == FORMAT_VERSION
    as_before_versions(run / 'config.toml')

    with warnings.catch_warnings(record = True) as caught:
        warnings.simplefilter('always')
        cli.main([*base, '--steps', '3', '--eval-every', '3'])
    assert notes(caught) == [f"{run} was made with time_distribution = 'uniform', the default before format version 1: the rerun "
                             f"keeps it (the default is now 'logit_normal': {DEFAULT_CHANGES[0].why}); a new run (another --name) "
                             f"takes the new default"]
    steps = [json.loads(line)['step'] for line in (run / 'metrics.jsonl').read_text().splitlines() if 'loss' in line]
    assert steps == [2, 3]
    recorded = tomllib.loads((run / 'config.toml').read_text())
    assert recorded['format_version'] == 0 and recorded['time_distribution'] == 'uniform' and recorded['steps'] == 3
    assert Transfusion.from_pretrained(run / 'pretrained').config.time_distribution == 'uniform'

    # the run now records the old default with its version: the next rerun goes on as well
    with pytest.warns(UserWarning, match = "keeps it"):
        cli.main([*base, '--steps', '4', '--eval-every', '4'])
    assert tomllib.loads((run / 'config.toml').read_text())['steps'] == 4


def test_an_image_text_run_made_before_versions_resumes_with_its_old_default(tmp_path):
    pytest.importorskip('PIL')
    from transfusion_pytorch.jobs import image_text
    from data_helpers import prepared_set

    data = prepared_set(tmp_path, num = 8)
    config = lambda steps: image_text.ImageTextConfig(data = (str(data.folder),), out_root = str(tmp_path / 'runs'), name = 'run', steps = steps,
                                                      dim = 32, depth = 1, heads = 2, dim_head = 16, max_tokens = 256, workers = 0, threads = 1,
                                                      warmup_steps = 1, sample_every = 1000, log_every = 1, checkpoint_every = 1000,
                                                      shuffle_buffer = 16, modality_steps = 2)
    run = image_text.train(config(1))
    as_before_versions(run / 'config.toml', drop = ('time_distribution', 'min_time_before_text'))

    with warnings.catch_warnings(record = True) as caught:
        warnings.simplefilter('always')
        image_text.train(config(2))
    assert [note.split(',')[0] for note in notes(caught)] == \
           [f'{run} was made with time_distribution = {"uniform"!r}', f'{run} was made with min_time_before_text = 0.0']
    recorded = tomllib.loads((run / 'config.toml').read_text())
    assert (recorded['format_version'], recorded['time_distribution'], recorded['min_time_before_text']) == (0, 'uniform', 0.)
    model = Transfusion.from_pretrained(run / 'pretrained')
    assert (model.config.time_distribution, model.config.min_time_before_text) == ('uniform', 0.)


def test_a_run_from_a_newer_version_is_refused(tmp_path, capsys):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'config.toml').write_text(f'format_version = {FORMAT_VERSION + 1}\n')
    with pytest.raises(SystemExit) as exit:
        cli.main(['train', '--name', 'run', '--out-root', str(tmp_path)])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip() == (f"transfusion: error: {run / 'config.toml'} was written with format version "
                                               f"{FORMAT_VERSION + 1}, newer than this transfusion-pytorch reads (format version "
                                               f"{FORMAT_VERSION}): upgrade transfusion-pytorch to load it")


# what config.toml holds

def test_config_toml_records_every_key_and_reads_back_the_same(tmp_path):
    from transfusion_pytorch.demos.digits_job import DigitsConfig
    for config in (DigitsConfig(out_root = str(tmp_path)), ImageTextConfig(data = ('a', 'b'), data_weights = (1., 3.), prompts = ('a, b', 'c'))):
        path = tmp_path / 'config.toml'
        path.write_text(to_toml(config, version = 0))
        written = tomllib.loads(path.read_text())
        none_keys = set(written.pop('none_keys'))
        assert written.pop('format_version') == 0
        assert set(written) | none_keys == {f.name for f in dataclasses.fields(config)} and not set(written) & none_keys
        assert none_keys == {f.name for f in dataclasses.fields(config) if getattr(config, f.name) is None}
        assert load_saved(type(config), path) == (config, 0)


def test_a_file_without_a_version_is_read_at_todays_defaults_unless_it_is_a_run(tmp_path):
    from transfusion_pytorch.demos.digits_job import DigitsConfig
    path = tmp_path / 'config.toml'
    path.write_text('steps = 10\n')
    assert load(DigitsConfig, path).time_distribution == 'logit_normal'                    # a config file of one's own
    saved, version = load_saved(DigitsConfig, path)                                        # a run's, written before versions
    assert version == 0 and (saved.time_distribution, saved.min_time_before_text, saved.steps) == ('uniform', 0., 10)


@pytest.mark.parametrize('text, message', [
    ('none_keys = ["vea"]', "unknown key 'vea' in none_keys; did you mean 'vae'?"),
    ('none_keys = ["steps"]', "'steps' is in none_keys, and cannot be none"),
    ('none_keys = ["vae"]\nvae = "v"', "'vae' is in none_keys, and set to 'v'"),
    ('none_keys = "vae"', "'none_keys' must be a list of keys (those left at none), got 'vae'"),
    ('format_version = "1"', "format_version must be an int >= 0, got '1'"),
    ('data = ["a"]\ndata_weights = ["x"]', "'data_weights[0]' must be float, got 'x'"),
])
def test_bad_format_keys_are_errors_naming_them(tmp_path, text, message):
    path = tmp_path / 'config.toml'
    path.write_text(text + '\n')
    with pytest.raises(ConfigError) as error:
        load(ImageTextConfig, path, dict(data = ('a',)) if 'data =' not in text else None)
    assert str(error.value) == f'{path}: {message}'


# tuples on the command line

def test_a_tuple_override_is_the_tuple_a_toml_array_gives(tmp_path):
    hints = field_types(ImageTextConfig)
    path = tmp_path / 'config.toml'
    path.write_text('data = ["a", "b"]\ndata_weights = [1, 3]\n')
    from_file = load(ImageTextConfig, path)
    overrides = parse_overrides(ImageTextConfig, ['--data', 'a,b', '--data-weights', '1,3'])
    assert overrides['data_weights'] == (1., 3.) == from_file.data_weights
    assert load(ImageTextConfig, None, overrides) == from_file
    # a caption holds commas: prompts take the text and split it at '|'
    assert parse_value('prompts', 'a red, big square|a circle', hints['prompts']) == 'a red, big square|a circle'
    assert load(ImageTextConfig, None, dict(overrides, prompts = 'a red, big square|a circle')).prompts == ('a red, big square', 'a circle')
    # two times, as guidance_interval takes them
    assert parse_value('guidance_interval', '0.6, 1', tuple[float, float]) == (0.6, 1.)
    assert parse_value('data_weights', 'none', hints['data_weights']) is None


@pytest.mark.parametrize('key, text, annotation, message', [
    ('data_weights', '1,x', typing.get_type_hints(ImageTextConfig)['data_weights'], "--data-weights: expected floats, separated by commas, got '1,x'"),
    ('guidance_interval', '0.6', tuple[float, float], "--guidance-interval: expected float, float, separated by commas, got '0.6'"),
])
def test_a_bad_tuple_override_names_the_key_and_the_items(key, text, annotation, message):
    with pytest.raises(ConfigError) as error:
        parse_value(key, text, annotation)
    assert str(error.value) == message


def test_a_config_json_of_another_format_is_refused(tmp_path):
    directory = tiny_model(tmp_path)
    saved = json.loads((directory / 'config.json').read_text())
    del saved['format']
    (directory / 'config.json').write_text(json.dumps(saved))
    with pytest.raises(ValueError) as error:
        Transfusion.from_pretrained(directory)
    assert str(error.value) == f"{directory / 'config.json'}: expected format transfusion-pytorch, got None"


def test_both_jobs_refuse_a_run_folder_that_is_a_file(tmp_path, capsys):
    from transfusion_pytorch.config_files import check_rerun
    from transfusion_pytorch.jobs.image_text_config import RERUN_KEYS
    (tmp_path / 'run').write_text('not a folder')
    with pytest.raises(ConfigError, match = f"^the run folder {tmp_path / 'run'} is a file$"):
        check_rerun(ImageTextConfig(data = ('a',), out_root = str(tmp_path), name = 'run'), RERUN_KEYS)
    with pytest.raises(SystemExit):
        cli.main(['train', '--name', 'run', '--out-root', str(tmp_path)])
    assert capsys.readouterr().err.strip() == f"transfusion: error: the run folder {tmp_path / 'run'} is a file"
