"""The image-text job started from a pretrained causal LM (`--language-model`), through the CLI:
a tiny random Llama with its own word-level tokenizer saved beside it, the walk-through set
prepared with that tokenizer, a few steps of training (the frozen LM's weights bit-identical
after them), sampling and captioning, and the refusals: data of another tokenizer or
vocabulary, model-size keys beside an LM, a rerun from another LM."""

import json
import math
import shutil

import pytest
import torch

Image = pytest.importorskip('PIL.Image')            # the data extra
pytest.importorskip('transformers')

from safetensors.torch import load_file

from transfusion_pytorch import Transfusion, cli
from transfusion_pytorch.data import shapes
from transfusion_pytorch.jobs import image_text, language_model
from transfusion_pytorch.language_models import language_model_state_dict

from data_helpers import make_tokenizer, prepared_set
from lm_helpers import build_language_model

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = ['--max-tokens', '256', '--workers', '0', '--threads', '1', '--warmup-steps', '1', '--log-every', '1',
        '--checkpoint-every', '1000', '--shuffle-buffer', '16', '--modality-steps', '2', '--samples-per-prompt', '2']


def make_language_model(folder, seed = 0, vocab_size = 24, tokenizer = True):
    """A tiny random Llama (GQA: 2 query heads, 1 key-value head), and beside it, with `tokenizer`,
    the word-level tokenizer of the walk-through captions (15 ids: the LM's vocabulary is padded
    past it, as Qwen's is)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if tokenizer:
        make_tokenizer(folder)
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size = vocab_size, hidden_size = 32, intermediate_size = 48, num_hidden_layers = 2,
                                 num_attention_heads = 2, num_key_value_heads = 1)).save_pretrained(folder)
    return folder


def train(root, data, lm, *options, name = 'run', steps = 3):
    arguments = ['train', '--job', 'image_text', '--data', str(data), '--out-root', str(root / 'runs'), '--name', name,
                 '--steps', str(steps), '--sample-every', str(steps), *TINY, *options]
    if lm is not None:
        arguments += ['--language-model', str(lm)]
    return cli.main(arguments)


def refused(capsys, *arguments, **options) -> str:
    capsys.readouterr()                     # what came before (transformers' progress bars)
    with pytest.raises(SystemExit) as exit:
        train(*arguments, **options)
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith('transfusion: error: ') and error.count('\n') == 1, error
    return error


def losses(run) -> list[float]:
    return [m['loss'] for m in map(json.loads, (run / 'metrics.jsonl').read_text().splitlines()) if 'loss' in m]


@pytest.fixture(scope = 'module')
def started(tmp_path_factory):
    """A run of 3 steps from the LM, with LMFusion's defaults (separate modality weights, the LM frozen)."""
    root = tmp_path_factory.mktemp('lm_run')
    lm = make_language_model(root / 'lm')
    prepared = prepared_set(root, num = 24, tokenizer = str(lm))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run = train(root, prepared.folder, lm, '--tokenizer', str(lm))
    torch.set_num_threads(threads)
    return root, lm, prepared, run


def test_a_run_from_a_language_model_keeps_its_frozen_weights_bit_for_bit(started):
    root, lm, _, run = started
    assert len(losses(run)) == 3 and all(math.isfinite(loss) for loss in losses(run))
    recorded = json.loads((run / 'language_model.json').read_text())
    assert recorded['path'] == str(lm.resolve()) and recorded['architecture'] == 'Llama' and recorded['vocab_size'] == 24
    config = (run / 'config.toml').read_text()
    assert 'separate_modality_weights = true' in config and 'freeze_language_model = true' in config
    assert '\ndim =' not in config and '\ndepth =' not in config          # the LM's size, not ours

    lm_weights = load_file(lm / 'model.safetensors')
    for folder in ('pretrained', 'pretrained_ema'):
        model = Transfusion.from_pretrained(run / folder)                  # the run's model round-trips
        assert model.config.num_text_tokens == 24 and model.config.transformer.kv_heads == 1
        assert model.config.transformer.freeze_text_weights and model.config.transformer.separate_modality_weights
        text = language_model_state_dict(model)
        assert text.keys() == lm_weights.keys()
        assert all(torch.equal(text[name], lm_weights[name]) for name in lm_weights), folder
    # while the modality copies of the same weights trained
    trained = Transfusion.from_pretrained(run / 'pretrained').transformer.blocks[0].attn
    assert not torch.equal(trained.modality_to_qkv.weight, trained.to_qkv.weight)


def test_sample_and_caption_decode_with_the_language_models_tokenizer(started, tmp_path, capsys):
    _, _, _, run = started
    out = tmp_path / 'grid.png'
    cli.main(['sample', str(run), '--prompt', 'a red circle at the top left|a blue square at the top right', '--num', '2',
              '--out', str(out), '--modality-steps', '2'])
    assert 'wrote 4 pictures of a red circle at the top left | a blue square at the top right' in capsys.readouterr().out
    with Image.open(out) as image:
        image.verify()

    _, picture, _ = next(shapes.pictures(1, 16))
    picture.save(tmp_path / 'picture.png')
    written = cli.main(['caption', str(run), str(tmp_path / 'picture.png')])
    words = {w for d in shapes.all_drawings() for w in d.caption.split()}
    assert capsys.readouterr().out.strip() == written[0]
    assert set(written[0].split()) <= words, written           # the LM tokenizer's words, decoded


def test_data_of_another_tokenizer_or_vocabulary_is_refused_in_one_line(started, tmp_path, capsys):
    root, lm, prepared, _ = started
    as_bytes = prepared_set(tmp_path / 'bytes', num = 8)
    error = refused(capsys, tmp_path, as_bytes.folder, lm)
    assert f'was tokenized as UTF-8 bytes, but the language model {lm} reads the ids of its own tokenizer: ' \
           f'prepare the data again with --tokenizer {lm}' in error

    # a tokenizer with more ids than the LM's vocabulary (an LM folder without a tokenizer: only the size says)
    bigger = make_tokenizer(tmp_path / 'bigger', extra_words = tuple(f'word{i}' for i in range(20)))
    wide = prepared_set(tmp_path / 'wide', num = 8, tokenizer = str(bigger))
    bare = make_language_model(tmp_path / 'bare', tokenizer = False)
    error = refused(capsys, tmp_path, wide.folder, bare)
    assert 'vocabulary 35' in error and f'more ids than the vocab_size 24 of the language model {bare}, so it is not its ' \
                                         "tokenizer: prepare the data again with the language model's own tokenizer" in error

    # a tokenizer of the right size that is not the one beside the LM
    other = make_tokenizer(tmp_path / 'other', extra_words = ('an',))
    words = prepared_set(tmp_path / 'words', num = 8, tokenizer = str(other))
    error = refused(capsys, tmp_path, words.folder, lm)
    assert f'the data in {words.folder} was tokenized with the tokenizer {other.resolve()} (vocabulary 16' in error
    assert f'but the language model {lm} uses the tokenizer {lm.resolve()} (vocabulary 15' in error

    # --tokenizer at train time that is not the data's (the data package's own check)
    error = refused(capsys, tmp_path, prepared.folder, lm, '--tokenizer', str(other))
    assert 'ids of one mean other words in the other' in error
    assert not (tmp_path / 'runs').exists()                  # all refused before anything was written


def test_model_size_keys_beside_a_language_model_and_unreadable_ones_are_refused(started, tmp_path, capsys):
    _, lm, prepared, _ = started
    error = refused(capsys, tmp_path, prepared.folder, lm, '--dim', '64', '--heads', '2')
    assert f"'dim', 'heads' come from the language model's config.json when 'language_model' is given ({lm}); leave them out" in error
    error = refused(capsys, tmp_path, prepared.folder, tmp_path / 'nowhere')
    assert f"'language_model': language model: {tmp_path / 'nowhere'} has no config.json (expected a folder written by save_pretrained)" in error
    (tmp_path / 'gpt2').mkdir()
    (tmp_path / 'gpt2' / 'config.json').write_text(json.dumps(dict(architectures = ['GPT2LMHeadModel'], model_type = 'gpt2')))
    error = refused(capsys, tmp_path, prepared.folder, tmp_path / 'gpt2')
    assert "'language_model': language model: unsupported architecture ['GPT2LMHeadModel'] (model_type 'gpt2'); supported: " in error
    error = refused(capsys, tmp_path, prepared.folder, None, '--freeze-language-model', 'true')
    assert "'freeze_language_model' freezes the weights of 'language_model', and no language_model is given" in error

    resolved = lambda **options: image_text.ImageTextConfig(data = 'd', **options)
    assert (resolved(language_model = 'lm').separate_modality_weights, resolved(language_model = 'lm').freeze_language_model) == (True, True)
    off = resolved(language_model = 'lm', separate_modality_weights = False)
    assert (off.freeze_language_model, off.dim) == (False, None)
    scratch = resolved()
    assert (scratch.separate_modality_weights, scratch.freeze_language_model, scratch.dim, scratch.dim_head) == (False, False, 256, 64)


def test_a_rerun_from_another_language_model_is_refused(started, tmp_path, capsys):
    _, lm, prepared, _ = started
    # shared weights, unfrozen: the text weights train
    run = train(tmp_path, prepared.folder, lm, '--separate-modality-weights', 'false', name = 'shared', steps = 1)
    model = Transfusion.from_pretrained(run / 'pretrained')
    assert not model.config.transformer.separate_modality_weights and not model.config.transformer.freeze_text_weights
    lm_weights = load_file(lm / 'model.safetensors')
    assert not torch.equal(language_model_state_dict(model)['model.layers.0.self_attn.q_proj.weight'],
                           lm_weights['model.layers.0.self_attn.q_proj.weight'])

    other = make_language_model(tmp_path / 'other_lm', seed = 1)          # the same shapes and tokenizer, other weights
    error = refused(capsys, tmp_path, prepared.folder, other, '--separate-modality-weights', 'false', name = 'shared', steps = 2)
    assert f'holds a run started from the language model {lm.resolve()} (Llama, fingerprint ' in error
    assert f"but 'language_model' = {other.resolve()} is another one (Llama, fingerprint " in error
    error = refused(capsys, tmp_path, prepared.folder, None, '--separate-modality-weights', 'false', name = 'shared', steps = 2)
    assert f'holds a run started from the language model {lm.resolve()}: give it as --language-model' in error
    scratch = train(tmp_path, prepared.folder, None, '--dim', '32', '--depth', '1', '--heads', '2', '--dim-head', '16',
                    '--separate-modality-weights', 'true', name = 'scratch', steps = 1)
    assert Transfusion.from_pretrained(scratch / 'pretrained').config.transformer.separate_modality_weights     # a generic option
    error = refused(capsys, tmp_path, prepared.folder, lm, name = 'scratch', steps = 2)
    assert f"{scratch} holds a run that did not start from a language model, and 'language_model' is {lm.resolve()} now" in error

    # the same LM moved elsewhere: the run goes on, from its checkpoint, and the frozen weights stay the LM's
    frozen = train(tmp_path, prepared.folder, lm, name = 'frozen', steps = 1)
    moved = shutil.copytree(lm, tmp_path / 'moved_lm')
    train(tmp_path, prepared.folder, moved, name = 'frozen', steps = 2)
    assert len(losses(frozen)) == 2
    text = language_model_state_dict(Transfusion.from_pretrained(frozen / 'pretrained_ema'))
    assert all(torch.equal(text[name], lm_weights[name]) for name in lm_weights)


def test_the_fingerprint_of_a_sharded_language_model_follows_its_weights_not_its_folder(tmp_path):
    build_language_model('llama', tmp_path / 'lm')                         # 3 safetensors files and an index
    build_language_model('llama', tmp_path / 'other', seed = 1)
    assert len(list((tmp_path / 'lm').glob('*.safetensors'))) > 1
    moved = shutil.copytree(tmp_path / 'lm', tmp_path / 'moved')
    assert language_model.fingerprint(tmp_path / 'lm') == language_model.fingerprint(moved) != language_model.fingerprint(tmp_path / 'other')


def test_the_help_states_each_default_once():
    from transfusion_pytorch.jobs.commands import image_text_keys
    lines = {line.split()[0]: line for line in image_text_keys().splitlines()}
    assert lines['--dim'].endswith("(default 256; with language_model, the LM's)")
    assert lines['--separate-modality-weights'].endswith('(LMFusion; default: on with language_model, off without)')
    assert lines['--threads'].endswith('(0: the torch default) (default: 0)')       # "default" in the help, but not its value
    assert lines['--data-weights'].endswith('(default: their sizes)')                # not "(default: their sizes) (default: None)"
