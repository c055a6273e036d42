"""`prepare`: each input layout into shards, the VAE and patch codecs, tokenizers, determinism,
resuming after a kill, broken images, and settings that do not match."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip('PIL')          # the data extra

from transfusion_pytorch.data import shapes, sources
from transfusion_pytorch.data.codecs import VAECodec, patchify
from transfusion_pytorch.data.images import make_buckets, to_tensor
from transfusion_pytorch.data.prepare import PrepareConfig, prepare
from transfusion_pytorch.data.shards import Prepared, Shard, ShardError
from transfusion_pytorch.data.tokenizers import HFTokenizer

from data_helpers import make_tokenizer, make_vae, prepared_set

pytestmark = pytest.mark.usefixtures('one_thread')


def shard_samples(prepared: Prepared) -> list[tuple[str, dict]]:
    out = []
    for path in prepared.shard_paths():
        with Shard(path) as shard:
            out.extend((entry['key'], shard.tensors(i)) for i, entry in enumerate(shard.samples))
    return out


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize('format', shapes.FORMATS)
def test_each_layout_gives_the_same_samples(tmp_path, format):
    """The same 24 drawings written in each layout prepare to the same captions and latents."""
    reference = prepared_set(tmp_path / 'ref', 'imagefolder', num = 24)
    prepared = prepared_set(tmp_path / format, format, num = 24)
    assert prepared.num_samples == 24 and prepared.manifest['counts']['skipped'] == 0
    assert prepared.manifest['source']['kind'] == format
    ours, theirs = shard_samples(prepared), shard_samples(reference)
    assert len(ours) == len(theirs) == 24
    for (_, a), (_, b) in zip(ours, theirs):
        assert torch.equal(a['text'], b['text']) and torch.equal(a['mean'], b['mean'])


def test_imagefolder_reads_as_hugging_face_datasets_does(tmp_path):
    """Our reading of the imagefolder layout (nested folders, metadata.csv, another caption
    column) gives the pairs `datasets.load_dataset('imagefolder')` gives."""
    datasets = pytest.importorskip('datasets')
    root = tmp_path / 'folder'
    (root / 'a' / 'b').mkdir(parents = True)
    rows = []
    for i, (_, image, caption) in enumerate(shapes.pictures(6, 16)):
        name = f'a/b/{i}.png' if i % 2 else f'a/{i}.jpg'
        image.save(root / name)
        rows.append((name, caption))
    with open(root / 'metadata.csv', 'w') as file:
        file.write('file_name,description\n' + ''.join(f'{n},"{c}"\n' for n, c in rows))

    ours = [(r.key, r.caption, to_tensor(__import__('PIL.Image', fromlist = ['Image']).open(r.load()).convert('RGB')))
            for r in sources.records(root, caption_column = 'description')]
    theirs = datasets.load_dataset('imagefolder', data_dir = str(root), split = 'train')
    assert sorted(c for _, c, _ in ours) == sorted(theirs['description'])
    by_caption = {c: pixels for _, c, pixels in ours}
    for row in theirs:
        assert torch.equal(to_tensor(row['image'].convert('RGB')), by_caption[row['description']])


def test_vae_latents_are_scaled_and_keep_mean_and_std(tmp_path):
    vae_dir = make_vae(tmp_path / 'vae', scaling_factor = 0.5, shift_factor = 0.1)
    prepared = prepared_set(tmp_path, num = 8, vae = str(vae_dir), patch = 2)
    codec = prepared.codec
    assert codec['kind'] == 'vae' and codec['stochastic'] and codec['scaling_factor'] == 0.5 and codec['shift_factor'] == 0.1
    assert codec['stride'] == 4 and codec['dim_latent'] == 16                 # downsampling 2 x patch 2; 4 channels x 2 x 2

    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    _, image, _ = next(shapes.pictures(1, 16))
    with torch.no_grad():
        posterior = vae.encode(to_tensor(image)[None]).latent_dist
    (key, stored), *_ = shard_samples(prepared)
    torch.testing.assert_close(stored['mean'], patchify((posterior.mean - 0.1) * 0.5, 2)[0], atol = 1e-5, rtol = 1e-5)
    torch.testing.assert_close(stored['std'], patchify(posterior.std * 0.5, 2)[0], atol = 1e-5, rtol = 1e-5)
    assert stored['mean'].shape == (4, 4, 16)

    # decoding undoes the scaling: decode(encode(x)) is the VAE's own reconstruction of the mean
    loaded = VAECodec(vae_dir, patch = 2)
    with torch.no_grad():
        expected = vae.decode(posterior.mean).sample.clamp(-1, 1)
    torch.testing.assert_close(loaded.decode(stored['mean'][None]), expected, atol = 1e-4, rtol = 1e-4)


def test_hugging_face_tokenizer_and_bytes(tmp_path):
    tokenizer_dir = make_tokenizer(tmp_path / 'tok')
    words = prepared_set(tmp_path / 'words', num = 4, tokenizer = str(tokenizer_dir))
    assert words.tokenizer['kind'] == 'huggingface' and words.tokenizer['vocab_size'] == 15                # 14 words and [UNK]
    (_, sample), *_ = shard_samples(words)
    caption = next(shapes.pictures(1, 16))[2]
    assert sample['text'].numel() == len(caption.split())                     # one id per word, no special tokens

    raw = prepared_set(tmp_path / 'bytes', num = 4)
    (_, sample), *_ = shard_samples(raw)
    assert bytes(sample['text'].tolist()).decode() == caption


def test_same_input_gives_the_same_bytes(tmp_path):
    first = prepared_set(tmp_path / 'a', num = 40)
    second = prepare(PrepareConfig(source = str(tmp_path / 'a' / 'set'), out = str(tmp_path / 'b'), image_size = 16, shard_size = 16,
                                   progress = False, threads = 3))
    a, b = folder_bytes(first.folder), folder_bytes(second.folder)
    assert a.keys() == b.keys() and len([n for n in a if n.startswith('shard-')]) == 3
    for name in a:
        if name not in ('manifest.json', 'prepare.json'):           # these name the output folder's source path, the same here
            assert a[name] == b[name], name
    assert json.loads(a['manifest.json'])['shards'] == json.loads(b['manifest.json'])['shards']


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    real_replace = os.replace
    def replace(src, dst):
        # the third shard's temporary file is written; die before it is renamed into place
        if str(dst).endswith("shard-00002.safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)
    os.replace = replace
    from transfusion_pytorch.data.prepare import PrepareConfig, prepare
    prepare(PrepareConfig(source = sys.argv[1], out = sys.argv[2], image_size = 16, shard_size = 8, progress = False))
''')


def test_prepare_killed_and_rerun_gives_the_same_shards(tmp_path):
    source = shapes.write_set(tmp_path / 'set', 40, 16)
    whole = prepare(PrepareConfig(source = str(source), out = str(tmp_path / 'whole'), image_size = 16, shard_size = 8, progress = False))

    out = tmp_path / 'killed'
    env = dict(os.environ, PYTHONPATH = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get('PYTHONPATH', '')]), OMP_NUM_THREADS = '1')
    result = subprocess.run([sys.executable, '-c', KILL_SCRIPT, str(source), str(out)], env = env, capture_output = True, text = True, timeout = 120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert sorted(p.name for p in out.glob('shard-*')) == ['shard-00000.safetensors', 'shard-00001.safetensors']
    assert list(out.glob('.shard-00002.safetensors.tmp-*'))                 # the half-written one, under its temporary name
    with pytest.raises(ShardError, match = 'prepare was not finished: run the same `transfusion prepare` again'):
        Prepared(out)

    rerun = prepare(PrepareConfig(source = str(source), out = str(out), image_size = 16, shard_size = 8, progress = False))
    assert rerun.manifest['shards'] == whole.manifest['shards']             # names, sizes and SHA-256 of every shard
    assert not list(out.glob('.*.tmp-*'))                                    # the killed run's temporary file removed
    for name, data in folder_bytes(whole.folder).items():
        if name.startswith('shard-'):
            assert (out / name).read_bytes() == data


def test_a_broken_image_is_skipped_named_and_counted(tmp_path, capsys):
    source = shapes.write_set(tmp_path / 'set', 20, 16)
    (source / 'images' / '000003.png').write_bytes(b'not a picture')
    truncated = source / 'images' / '000007.png'
    truncated.write_bytes(truncated.read_bytes()[:60])
    (source / 'images' / '000011.png').unlink()
    prepared = prepare(PrepareConfig(source = str(source), out = str(tmp_path / 'out'), image_size = 16, shard_size = 8, progress = False))

    out = capsys.readouterr()
    printed = out.out + out.err
    assert '3 records skipped' in out.out
    for name in ('000003', '000007', '000011'):
        assert f'skipped images/{name}.png: unreadable image' in printed
    assert prepared.num_samples == 17 and prepared.manifest['counts']['skipped'] == 3
    assert [key for key, _ in prepared.manifest['skipped']] == ['images/000003.png', 'images/000007.png', 'images/000011.png']
    assert 'images/000003.png' not in {key for key, _ in shard_samples(prepared)}


def test_a_rerun_with_other_settings_is_refused(tmp_path):
    prepared_set(tmp_path, num = 8)
    with pytest.raises(ValueError, match = r'holds data prepared with other settings \(they differ in codec\)'):
        prepared_set(tmp_path, num = 8, patch = 2)


def test_buckets_keep_the_aspect_ratio(tmp_path):
    from PIL import Image
    root = tmp_path / 'wide'
    root.mkdir()
    Image.new('RGB', (64, 32), (200, 10, 10)).save(root / 'wide.png')
    Image.new('RGB', (32, 32), (10, 10, 200)).save(root / 'square.png')
    (root / 'metadata.jsonl').write_text('{"file_name": "wide.png", "text": "wide"}\n{"file_name": "square.png", "text": "square"}\n')
    prepared = prepare(PrepareConfig(source = str(root), out = str(tmp_path / 'out'), image_size = 16, buckets = True, progress = False))
    assert make_buckets(16, 4) == [(24, 12), (20, 12), (16, 16), (12, 20), (12, 24)]     # (height, width), by aspect ratio
    shapes_by_key = {key: tuple(sample['mean'].shape[:2]) for key, sample in shard_samples(prepared)}
    assert shapes_by_key == {'wide.png': (3, 6), 'square.png': (4, 4)}          # 12 x 24 and 16 x 16 pixels, patch 4
    assert set(prepared.manifest['shapes']) == {'3x6', '4x4'}


def test_text_rows_are_continued_not_cut(tmp_path):
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    (corpus / 'a.txt').write_text('hello world\n\nsecond line\n')
    (corpus / 'b.jsonl').write_text(json.dumps(dict(text = 'x' * 25)) + '\n')
    prepared = prepare(PrepareConfig(source = str(corpus), out = str(tmp_path / 'out'), max_text_tokens = 12, progress = False))
    assert prepared.kind == 'text' and prepared.codec is None
    rows = {key: bytes(sample['text'].tolist()).decode() for key, sample in shard_samples(prepared)}
    assert rows == {'a.txt:1': 'hello world', 'a.txt:3': 'second line', 'b.jsonl:1#0': 'x' * 12, 'b.jsonl:1#1': 'x' * 12, 'b.jsonl:1#2': 'x'}


@pytest.mark.parametrize('make, message', [
    (lambda root: (root / 'metadata.jsonl').write_text('{"file_name": "a.png", "caption": "x"}\n'),
     r"no column 'text'; its columns are \['caption', 'file_name'\] \(--caption-column picks the caption column\)"),
    (lambda root: (root / 'metadata.jsonl').write_text('{"file_name": "a.png", "text": ["x", "y"]}\n'),
     r"the caption column 'text' must hold strings, got list"),
    (lambda root: (root / 'notes.md').write_text('hi'),
     r'found no metadata.jsonl / metadata.csv \(imagefolder\), save_to_disk files'),
])
def test_a_source_in_no_known_layout_is_an_error(tmp_path, make, message):
    root = tmp_path / 'source'
    root.mkdir()
    make(root)
    with pytest.raises(sources.SourceError, match = message):
        prepare(PrepareConfig(source = str(root), out = str(tmp_path / 'out'), image_size = 16, progress = False))


def test_bad_prepare_arguments_are_errors_naming_them(tmp_path):
    source = shapes.write_set(tmp_path / 'set', 4, 16)
    def run(**options):
        prepare(PrepareConfig(**dict(dict(source = str(source), out = str(tmp_path / 'out'), image_size = 16, progress = False), **options)))
    with pytest.raises(sources.SourceError, match = r'source .*nowhere does not exist'):
        run(source = str(tmp_path / 'nowhere'))
    with pytest.raises(ValueError, match = r'image_size must be a multiple of the codec stride 4 \(the patch\), got 18'):
        run(image_size = 18)
    with pytest.raises(ValueError, match = r'shard_size must be a positive int, got 0'):
        run(shard_size = 0)
    with pytest.raises(FileNotFoundError, match = r'vae: .*set has no config.json \(a local diffusers autoencoder folder'):
        run(vae = str(source))
    with pytest.raises(FileNotFoundError, match = r'tokenizer: .*missing is not a folder \(a local Hugging Face tokenizer folder'):
        run(tokenizer = str(tmp_path / 'missing'))
    # a folder that holds no tokenizer, and a damaged one, were a traceback over several lines
    with pytest.raises(FileNotFoundError, match = r'tokenizer: .*set has no tokenizer_config.json or tokenizer.json \(a local Hugging Face'):
        run(tokenizer = str(source))
    damaged = tmp_path / 'damaged'
    damaged.mkdir()
    (damaged / 'tokenizer.json').write_text('not json')
    with pytest.raises(ValueError, match = r'tokenizer: .*damaged does not load as a Hugging Face tokenizer \(JSONDecodeError: [^\n]*\)$'):
        run(tokenizer = str(damaged))
    # a VAE folder whose config.json is damaged, or without weights, named neither option nor folder
    (damaged / 'config.json').write_text('not json')
    with pytest.raises(ValueError, match = r'vae: .*damaged/config.json is not valid JSON \(Expecting value'):
        run(vae = str(damaged))
    (damaged / 'config.json').write_text('{}')
    pytest.importorskip('diffusers')                # the rest loads the autoencoder (the data extra)
    with pytest.raises(ValueError, match = r'vae: .*damaged does not load as a diffusers AutoencoderKL \(OSError: [^\n]*\)$'):
        run(vae = str(damaged))


@pytest.mark.parametrize('missing, load, message', [
    ('diffusers', lambda folder: VAECodec(folder), r"vae: loading the autoencoder in .*vae needs diffusers, which is not installed"),
    ('transformers', lambda folder: HFTokenizer(folder), r"tokenizer: loading the tokenizer in .*vae needs transformers, which is not installed"),
    ('datasets', lambda folder: next(sources.saved_dataset(folder, 'image', 'text', 'train')),
     r"source: reading the datasets folder .*vae needs datasets, which is not installed"),
])
def test_a_missing_extra_is_an_error_naming_what_needs_it_and_the_extra(tmp_path, monkeypatch, missing, load, message):
    """Without the data extra's libraries, what needs one says so and how to install it; a
    folder that is not there is still reported as such first (it needs no library to tell)."""
    folder = tmp_path / 'vae'
    folder.mkdir()
    (folder / 'config.json').write_text('{}')
    (folder / 'tokenizer_config.json').write_text('{}')
    monkeypatch.setitem(sys.modules, missing, None)         # import fails as if it were not installed
    with pytest.raises(ImportError, match = message + r".*pip install 'transfusion-pytorch\[data\]'"):
        load(folder)
    if missing == 'diffusers':
        with pytest.raises(FileNotFoundError, match = 'has no config.json'):
            VAECodec(tmp_path)


def test_a_damaged_shard_is_found_before_training(tmp_path):
    prepared = prepared_set(tmp_path, num = 20)
    shard = prepared.shard_paths()[1]
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ShardError, match = r'shard-00001.safetensors has \d+ bytes, manifest.json says \d+ \(damaged or replaced\)'):
        Prepared(prepared.folder)


def long_caption_set(root: Path) -> Path:
    """12 drawings, the caption of the sixth 2,000 characters long."""
    source = shapes.write_set(root, 12, 16)
    rows = [json.loads(line) for line in (source / 'metadata.jsonl').read_text().splitlines()]
    rows[5]['text'] = 'a red circle ' * 153 + 'x' * 11           # 2,000 characters: 2,000 byte tokens
    (source / 'metadata.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in rows))
    return source


def test_a_long_caption_is_truncated_by_default_counted_and_reported(tmp_path, capsys):
    """A 2,000-character caption was stored whole, and training refused the folder (its texts
    are limited by --max-text-tokens only for text rows)."""
    from transfusion_pytorch import cli
    source = long_caption_set(tmp_path / 'set')
    prepared = cli.main(['prepare', str(source), '--out', str(tmp_path / 'out'), '--image-size', '16'])
    assert f"12 samples in 1 shards (1 written now, 0 already there); 0 records skipped; 1 caption over 1,024 tokens truncated " \
           f"(listed under 'long_captions' in {tmp_path / 'out' / 'manifest.json'})" in capsys.readouterr().out
    assert prepared.manifest['long_captions'] == dict(policy = 'truncate', max_tokens = 1024, count = 1, captions = [['images/000005.png', 2000]])
    assert prepared.manifest['shapes']['4x4']['max_text_tokens'] == 1024
    texts = {key: sample['text'] for key, sample in shard_samples(prepared)}
    assert bytes(texts['images/000005.png'].tolist()).decode() == ('a red circle ' * 153 + 'x' * 11)[:1024]


def test_a_long_caption_skipped_or_an_error_naming_it(tmp_path, capsys):
    from transfusion_pytorch import cli
    source = long_caption_set(tmp_path / 'set')
    skipped = prepare(PrepareConfig(source = str(source), out = str(tmp_path / 'skip'), image_size = 16, progress = False,
                                    long_captions = 'skip', max_caption_tokens = 1500))
    assert skipped.num_samples == 11 and 'images/000005.png' not in {key for key, _ in shard_samples(skipped)}
    assert skipped.manifest['skipped'] == [['images/000005.png', 'a caption of 2,000 tokens, more than --max-caption-tokens 1500 '
                                                                 '(--long-captions skip)']]
    assert skipped.manifest['long_captions'] == dict(policy = 'skip', max_tokens = 1500, count = 1, captions = [['images/000005.png', 2000]])
    assert '1 records skipped' in capsys.readouterr().out

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli.main(['prepare', str(source), '--out', str(tmp_path / 'error'), '--image-size', '16', '--shard-size', '4', '--long-captions', 'error'])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        'transfusion: error: the caption of images/000005.png has 2,000 tokens, more than --max-caption-tokens 1024: raise '
        '--max-caption-tokens, or give --long-captions truncate (cut it to the limit) or skip (leave its sample out)')
    assert [p.name for p in (tmp_path / 'error').glob('shard-*')] == ['shard-00000.safetensors']     # records 0-3
    # another policy then goes on in the same folder, as no shard holds a long caption yet
    def rerun(**options):
        return prepare(PrepareConfig(source = str(source), out = str(tmp_path / 'error'), image_size = 16, shard_size = 4, progress = False, **options))
    assert rerun().num_samples == 12
    with pytest.raises(ValueError, match = r'they differ in long_captions'):     # but once one does, the policy is part of the bytes
        rerun(long_captions = 'skip')
    # and a lower limit than a stored caption's is refused too (the walk-through's captions are 25 to 40 bytes)
    plain = prepared_set(tmp_path / 'plain', num = 4)
    with pytest.raises(ValueError, match = r'they differ in max_caption_tokens'):
        prepared_set(tmp_path / 'plain', num = 4, max_caption_tokens = 20)
    assert prepared_set(tmp_path / 'plain', num = 4, max_caption_tokens = 100).num_samples == plain.num_samples == 4
