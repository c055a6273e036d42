"""`prepare` of interleaved documents (the OBELICS layout) and editing triples (InstructPix2Pix's
and MagicBrush's columns): each source layout, the kind found from the columns, a broken image
skipping its whole sample, determinism, resuming after a kill, bad documents, long texts, and
training refusing these folders for now."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip('PIL')          # the data extra

from transfusion_pytorch import cli
from transfusion_pytorch.data import codecs, images
from transfusion_pytorch.data.loader import KindNotTrainable, LoaderConfig, StreamingLoader
from transfusion_pytorch.data.prepare import PrepareConfig, prepare
from transfusion_pytorch.data.shards import Prepared, Shard, ShardError
from transfusion_pytorch.data.sources import SourceError

pytestmark = pytest.mark.usefixtures('one_thread')

COLOURS = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20), (20, 200, 200), (200, 20, 200), (90, 90, 90), (250, 250, 250)]
# five documents: a text or an image (a colour's index) at each position
DOCUMENTS = [['a red one', 0, 'then green', 1], [2, 'blue first'], ['only words here'], [3, 4, 'two pictures'], ['last', 5]]
# four edits: (source colour, instruction, target colour)
EDITS = [(0, 'make it green', 1), (1, 'make it blue', 2), (2, 'make it grey', 6), (3, 'make it white', 7)]
INSTRUCTPIX2PIX = ('original_image', 'edit_prompt', 'edited_image')
MAGICBRUSH = ('source_img', 'instruction', 'target_img')


def png(colour: int, size: int = 12) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.new('RGB', (size, size + 4), COLOURS[colour]).save(buffer, format = 'PNG')     # not square: resized and cropped
    return buffer.getvalue()


def expected_latent(colour: int) -> torch.Tensor:
    """The patch codec's latents of a picture prepared at size 8, as a caption's image is."""
    pixels = images.to_tensor(images.resize_for(images.decode(lambda: png(colour)), 8, None))
    return codecs.load_codec(None, None, 'cpu').encode(pixels[None])[0][0]


def run(source, out, **options):
    return prepare(PrepareConfig(**dict(dict(source = str(source), out = str(out), image_size = 8, shard_size = 2, progress = False), **options)))


def samples(prepared: Prepared) -> dict[str, list]:
    """key -> the sample's segments, each a str (decoded bytes) or a latent tensor."""
    out = {}
    for path in prepared.shard_paths():
        with Shard(path) as shard:
            for i, entry in enumerate(shard.samples):
                out[entry['key']] = [bytes(s['text'].tolist()).decode() if 'text' in s else s['mean'] for s in shard.segments(i)]
    return out


def assert_same_segments(got: list, wanted: list):
    assert len(got) == len(wanted)
    for a, b in zip(got, wanted):
        if isinstance(b, str):
            assert a == b
        else:
            assert torch.equal(a, expected_latent(b))


# interleaved sources

def columns(document: list) -> tuple[list, list]:
    texts = [s if isinstance(s, str) else None for s in document]
    return texts, [None if isinstance(s, str) else s for s in document]


def interleaved_dataset(documents = DOCUMENTS, broken: tuple | None = None):
    datasets = pytest.importorskip('datasets')
    rows = dict(texts = [], images = [])
    for d, document in enumerate(documents):
        texts, colours = columns(document)
        rows['texts'].append(texts)
        rows['images'].append([None if c is None else dict(bytes = b'not a picture' if (d, j) == broken else png(c), path = None)
                               for j, c in enumerate(colours)])
    features = datasets.Features(texts = datasets.List(datasets.Value('string')), images = datasets.List(datasets.Image()))
    return datasets.Dataset.from_dict(rows, features = features)


def write_interleaved(root: Path, layout: str, documents = DOCUMENTS) -> Path:
    if layout == 'webdataset':
        pytest.importorskip('webdataset')           # reading tars (the data extra)
    root.mkdir(parents = True)
    if layout == 'datasets':
        interleaved_dataset(documents).save_to_disk(str(root / 'docs'))
        return root / 'docs'
    if layout == 'parquet':
        interleaved_dataset(documents).to_parquet(str(root / 'docs.parquet'))
        return root / 'docs.parquet'
    if layout == 'jsonl':
        (root / 'pictures').mkdir()
        with open(root / 'docs.jsonl', 'w') as file:
            for d, document in enumerate(documents):
                texts, colours = columns(document)
                for j, c in enumerate(colours):
                    if c is not None:
                        (root / 'pictures' / f'{d}-{j}.png').write_bytes(png(c))
                file.write(json.dumps(dict(texts = texts, images = [None if c is None else f'pictures/{d}-{j}.png' for j, c in enumerate(colours)])) + '\n')
        return root / 'docs.jsonl'
    with tarfile.open(root / 'docs.tar', 'w') as tar:      # webdataset: KEY.json and KEY.j.png
        for d, document in enumerate(documents):
            texts, colours = columns(document)
            add_file(tar, f'{d:04d}.json', json.dumps(texts if d else dict(texts = texts)).encode())     # a list, or OBELICS' column
            for j, c in enumerate(colours):
                if c is not None:
                    add_file(tar, f'{d:04d}.{j}.png', png(c))
    return root / 'docs.tar'


def add_file(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize('layout', ['datasets', 'parquet', 'jsonl', 'webdataset'])
def test_interleaved_documents_from_each_layout(tmp_path, layout):
    """The kind is found from the `texts` and `images` columns; every segment is kept, in order."""
    prepared = run(write_interleaved(tmp_path / 'source', layout), tmp_path / 'out')
    assert prepared.kind == 'interleaved' and prepared.num_samples == 5
    got = samples(prepared)
    assert len(got) == 5
    for key, document in zip(sorted(got), DOCUMENTS):
        assert_same_segments(got[key], document)
    manifest = prepared.manifest
    assert manifest['segments'] == dict(text = 6, image = 6)
    assert manifest['shapes']['2x2']['count'] == 6 and manifest['shapes']['text']['count'] == 1
    assert manifest['tokens'] == dict(text = sum(len(s) for d in DOCUMENTS for s in d if isinstance(s, str)), latent = 6 * 4)
    with Shard(prepared.shard_paths()[0]) as shard:
        assert shard.samples[0]['segments'] == [['text', 9], ['image', [2, 2, 48]], ['text', 10], ['image', [2, 2, 48]]]


# edit sources

def edit_dataset(names = INSTRUCTPIX2PIX):
    datasets = pytest.importorskip('datasets')
    source, instruction, target = names
    rows = {source: [dict(bytes = png(s), path = None) for s, _, _ in EDITS], instruction: [i for _, i, _ in EDITS],
            target: [dict(bytes = png(t), path = None) for _, _, t in EDITS]}
    features = datasets.Features({source: datasets.Image(), instruction: datasets.Value('string'), target: datasets.Image()})
    return datasets.Dataset.from_dict(rows, features = features)


def write_edits(root: Path, layout: str, names = INSTRUCTPIX2PIX) -> Path:
    if layout == 'webdataset':
        pytest.importorskip('webdataset')           # reading tars (the data extra)
    root.mkdir(parents = True)
    source, instruction, target = names
    if layout == 'datasets':
        edit_dataset(names).save_to_disk(str(root / 'edits'))
        return root / 'edits'
    if layout == 'parquet':
        edit_dataset(names).to_parquet(str(root / 'edits.parquet'))
        return root / 'edits.parquet'
    if layout == 'imagefolder':              # metadata.jsonl naming both files, as `datasets` reads several images a row
        with open(root / 'metadata.jsonl', 'w') as file:
            for e, (s, text, t) in enumerate(EDITS):
                (root / f'{e}-source.png').write_bytes(png(s))
                (root / f'{e}-target.png').write_bytes(png(t))
                file.write(json.dumps({f'{source}_file_name': f'{e}-source.png', instruction: text, f'{target}_file_name': f'{e}-target.png'}) + '\n')
        return root
    with tarfile.open(root / 'edits.tar', 'w') as tar:
        for e, (s, text, t) in enumerate(EDITS):
            add_file(tar, f'{e:04d}.{source}.png', png(s))
            add_file(tar, f'{e:04d}.json', json.dumps({instruction: text}).encode())
            add_file(tar, f'{e:04d}.{target}.png', png(t))
    return root / 'edits.tar'


@pytest.mark.parametrize('layout', ['datasets', 'parquet', 'imagefolder', 'webdataset'])
@pytest.mark.parametrize('names', [INSTRUCTPIX2PIX, MAGICBRUSH], ids = ['instructpix2pix', 'magicbrush'])
def test_edits_from_each_layout(tmp_path, layout, names):
    """Each triple becomes the segments [source image, instruction, target image]; the kind and
    the columns (InstructPix2Pix's or MagicBrush's) are found by themselves."""
    prepared = run(write_edits(tmp_path / 'source', layout, names), tmp_path / 'out')
    assert prepared.kind == 'edit' and prepared.num_samples == 4
    assert prepared.manifest['settings']['columns'] == list(names)
    got = samples(prepared)
    for key, edit in zip(sorted(got), EDITS):
        assert_same_segments(got[key], list(edit))


def test_edit_columns_by_flags_and_a_kind_that_does_not_fit(tmp_path, capsys):
    names = ('before', 'prompt', 'after')
    source = write_edits(tmp_path / 'source', 'parquet', names)
    prepared = cli.main(['prepare', str(source), '--out', str(tmp_path / 'out'), '--image-size', '8', '--kind', 'edit',
                         '--source-image-column', 'before', '--instruction-column', 'prompt', '--target-image-column', 'after'])
    assert prepared.kind == 'edit' and prepared.num_samples == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:     # without the flags: the default columns are not there
        cli.main(['prepare', str(source), '--out', str(tmp_path / 'other'), '--image-size', '8', '--kind', 'edit'])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"transfusion: error: {source}: no column 'original_image' or 'edit_prompt' or 'edited_image'; its columns are "
        f"['after', 'before', 'prompt'] (--source-image-column, --instruction-column and --target-image-column pick the edit columns)")


def test_captions_are_still_captions(tmp_path):
    """A source with an image and a text column is read as captions, as before these kinds."""
    datasets = pytest.importorskip('datasets')
    dataset = datasets.Dataset.from_dict(dict(image = [dict(bytes = png(0), path = None)] * 3, text = ['a', 'b', 'c']),
                                         features = datasets.Features(image = datasets.Image(), text = datasets.Value('string')))
    dataset.save_to_disk(str(tmp_path / 'captions'))
    prepared = run(tmp_path / 'captions', tmp_path / 'out')
    assert prepared.kind == 'image_text' and 'segments' not in prepared.manifest and 'samples' not in prepared.manifest['settings']


# what holds for captions holds here

def test_a_broken_image_skips_its_whole_document_named_and_counted(tmp_path, capsys):
    pytest.importorskip('datasets')
    (tmp_path / 'source').mkdir()
    interleaved_dataset(broken = (3, 1)).to_parquet(str(tmp_path / 'source' / 'docs.parquet'))
    prepared = run(tmp_path / 'source', tmp_path / 'out')
    printed = capsys.readouterr().out
    assert '1 records skipped' in printed
    assert prepared.num_samples == 4 and prepared.manifest['counts']['skipped'] == 1
    (key, reason), = prepared.manifest['skipped']
    assert key == 'docs.parquet:000000003' and reason.startswith('unreadable image (segment 1): UnidentifiedImageError')
    assert f'skipped {key}: unreadable image (segment 1)' in printed
    assert key not in samples(prepared) and prepared.manifest['segments'] == dict(text = 5, image = 4)


def test_same_documents_give_the_same_bytes_and_a_rerun_keeps_them(tmp_path, capsys):
    source = write_interleaved(tmp_path / 'source', 'jsonl')
    first, second = run(source, tmp_path / 'a'), run(source, tmp_path / 'b', threads = 3)
    names = sorted(p.name for p in first.folder.glob('shard-*'))
    assert len(names) == 3
    for name in names:
        assert (first.folder / name).read_bytes() == (second.folder / name).read_bytes()
    assert first.manifest['shards'] == second.manifest['shards']
    capsys.readouterr()
    again = run(source, tmp_path / 'a')
    assert '(0 written now, 3 already there)' in capsys.readouterr().out and again.manifest == first.manifest

    # a document changed in place is found, as a changed caption is
    rows = (source).read_text().splitlines()
    rows[0] = rows[0].replace('a red one', 'a red two')
    source.write_text('\n'.join(rows) + '\n')
    with pytest.raises(ValueError, match = r'the source changed since this folder was prepared: shard-00000.safetensors was made from'):
        run(source, tmp_path / 'a')


KILL_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    real_replace = os.replace
    def replace(src, dst):
        if str(dst).endswith("shard-00001.safetensors"):        # die before the second shard is in place
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)
    os.replace = replace
    from transfusion_pytorch.data.prepare import PrepareConfig, prepare
    prepare(PrepareConfig(source = sys.argv[1], out = sys.argv[2], image_size = 8, shard_size = 2, progress = False))
''')


def test_killed_and_rerun_gives_the_same_shards(tmp_path):
    source = write_interleaved(tmp_path / 'source', 'webdataset')
    whole = run(source, tmp_path / 'whole')
    out = tmp_path / 'killed'
    env = dict(os.environ, PYTHONPATH = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get('PYTHONPATH', '')]), OMP_NUM_THREADS = '1')
    result = subprocess.run([sys.executable, '-c', KILL_SCRIPT, str(source), str(out)], env = env, capture_output = True, text = True, timeout = 120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert sorted(p.name for p in out.glob('shard-*')) == ['shard-00000.safetensors']
    with pytest.raises(ShardError, match = 'prepare was not finished'):
        Prepared(out)
    rerun = run(source, out)
    assert rerun.manifest['shards'] == whole.manifest['shards'] and not list(out.glob('.*.tmp-*'))


def test_a_long_text_follows_the_caption_policy(tmp_path):
    documents = [['short', 0], ['x' * 40, 1, 'fine']]
    source = write_interleaved(tmp_path / 'source', 'jsonl', documents)
    truncated = run(source, tmp_path / 'truncate', max_caption_tokens = 30)
    assert truncated.manifest['long_captions']['captions'] == [['docs.jsonl:2, segment 0', 40]]
    assert samples(truncated)['docs.jsonl:2'][0] == 'x' * 30
    skipped = run(source, tmp_path / 'skip', max_caption_tokens = 30, long_captions = 'skip')
    assert skipped.num_samples == 1 and skipped.manifest['skipped'] == [
        ['docs.jsonl:2', 'a text (segment 0) of 40 tokens, more than --max-caption-tokens 30 (--long-captions skip)']]
    with pytest.raises(ValueError, match = r'^the text of segment 0 of docs.jsonl:2 has 40 tokens, more than --max-caption-tokens 30: '):
        run(source, tmp_path / 'error', max_caption_tokens = 30, long_captions = 'error')


@pytest.mark.parametrize('texts, images, message', [
    (['a', 'b'], [None, 'p.png'], r"line 1, position 1: both a text and an image; exactly one of 'texts' and 'images' must be set "
                                  r"at each position \(the OBELICS layout\)"),
    (['a', None], [None, None], r"line 1, position 1: neither a text nor an image; exactly one"),
    (['a'], [None, None], r"line 1: 'texts' has 1 entries and 'images' 2; they must be aligned"),
])
def test_a_position_with_both_or_neither_is_an_error(tmp_path, capsys, texts, images, message):
    (tmp_path / 'docs.jsonl').write_text(json.dumps(dict(texts = texts, images = images)) + '\n')
    with pytest.raises(SourceError, match = message):
        run(tmp_path / 'docs.jsonl', tmp_path / 'out')
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli.main(['prepare', str(tmp_path / 'docs.jsonl'), '--out', str(tmp_path / 'cli'), '--image-size', '8', '--kind', 'interleaved'])
    assert exit.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(f'transfusion: error: {tmp_path / "docs.jsonl"}, line 1')


def test_training_refuses_these_kinds_for_now(tmp_path, capsys):
    prepared = run(write_interleaved(tmp_path / 'source', 'jsonl'), tmp_path / 'docs')
    message = f'{prepared.folder} holds interleaved samples: training on interleaved data is not supported yet (image-caption and text folders are)'
    with pytest.raises(KindNotTrainable) as error:
        StreamingLoader([prepared.folder], lambda shape: 4, LoaderConfig(max_tokens = 256))
    assert str(error.value) == message
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli.main(['train', '--job', 'image_text', '--data', str(prepared.folder), '--out-root', str(tmp_path / 'runs')])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f'transfusion: error: {message}'
