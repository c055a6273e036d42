"""`prepare` run again into a folder: a source that changed since (refused, or extended when
it only grew), a failed run followed by the right command, temporary files of killed runs,
one writer at a time, and a folder that cannot be written (read-only, a full disk)."""

import builtins
import errno
import json
import threading
import time

import pytest

pytest.importorskip('PIL')          # the data extra

from transfusion_pytorch import cli
from transfusion_pytorch.data import reruns, shapes, shards
from transfusion_pytorch.data.prepare import PrepareConfig, prepare
from transfusion_pytorch.data.shards import Shard

pytestmark = pytest.mark.usefixtures('one_thread')


def cli_error(argv, capsys) -> str:
    """The one line `transfusion` prints for argv, which must fail with exit status 2 (after
    the progress bar, on a line of its own)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith('preparing ')]
    assert len(lines) == 1 and lines[0].startswith('transfusion: error: '), lines
    return lines[0]


def run(source, out, **options):
    return prepare(PrepareConfig(**dict(dict(source = str(source), out = str(out), image_size = 16, shard_size = 8, progress = False), **options)))


def keys(prepared) -> list[str]:
    out = []
    for path in prepared.shard_paths():
        with Shard(path) as shard:
            out.extend(entry['key'] for entry in shard.samples)
    return out


def shard_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob('shard-*'))}


def add_rows(source, rows: list[str], at_top: bool):
    """New drawings, as imagefolder rows at the top or the bottom of metadata.jsonl."""
    metadata = source / 'metadata.jsonl'
    lines = []
    for name, (_, image, caption) in zip(rows, shapes.pictures(len(rows), 16, seed = 5)):
        image.save(source / 'images' / f'{name}.png')
        lines.append(json.dumps(dict(file_name = f'images/{name}.png', text = caption)) + '\n')
    old = metadata.read_text()
    metadata.write_text(''.join(lines) + old if at_top else old + ''.join(lines))


def test_rows_added_at_the_top_of_the_source_are_refused_not_mixed_in(tmp_path, capsys):
    """The issue's repro, smaller: rows added at the top of metadata.jsonl and the command
    rerun. Every shard now stands for other records; the rerun is refused and the folder is
    left as it was (before, 4 keys were stored twice and the new images never)."""
    source = shapes.write_set(tmp_path / 'set', 40, 16)
    out = tmp_path / 'out'
    first = run(source, out)
    before = shard_bytes(out), (out / shards.MANIFEST).read_bytes()
    add_rows(source, [f'new-{i}' for i in range(4)], at_top = True)

    message = cli_error(['prepare', str(source), '--out', str(out), '--image-size', '16', '--shard-size', '8'], capsys)
    assert message == (f'transfusion: error: {out}: the source changed since this folder was prepared: shard-00000.safetensors was made '
                       f'from 8 records (images/000000.png .. images/000007.png), and the source now gives 8 records '
                       f'(images/new-0.png .. images/000003.png) in their place. Prepare into a new --out, or delete {out} to start over')
    assert (shard_bytes(out), (out / shards.MANIFEST).read_bytes()) == before
    assert len(set(keys(first))) == len(keys(first)) == 40

    fresh = run(source, tmp_path / 'fresh')                 # what the message says to do
    assert fresh.num_samples == 44 and len(set(keys(fresh))) == 44


def test_a_source_that_grew_is_extended_as_a_fresh_run_would_write_it(tmp_path, capsys):
    """The issue's 2,100 then 2,600 records, smaller: 18 records (shards of 8, 8 and 2), then 23.
    The last shard is rewritten with its new records; the folder is then byte for byte what a
    fresh run of the grown source writes (before, it stayed at 18 without a word)."""
    source = shapes.write_set(tmp_path / 'set', 18, 16)
    out = tmp_path / 'out'
    assert run(source, out).num_samples == 18
    add_rows(source, [f'z-{i}' for i in range(5)], at_top = False)
    capsys.readouterr()
    grown = run(source, out)
    assert grown.num_samples == 23
    assert '23 samples in 3 shards (1 written now, 2 already there)' in capsys.readouterr().out
    fresh = run(source, tmp_path / 'fresh')
    assert shard_bytes(out) == shard_bytes(fresh.folder)
    assert grown.manifest['shards'] == fresh.manifest['shards']
    run(source, out)                                         # and a rerun of the unchanged source keeps it
    assert shard_bytes(out) == shard_bytes(fresh.folder)


def test_a_changed_caption_and_a_shrunk_source_are_refused(tmp_path):
    source = shapes.write_set(tmp_path / 'set', 20, 16)
    out = tmp_path / 'out'
    run(source, out)
    metadata = source / 'metadata.jsonl'
    rows = metadata.read_text().splitlines(keepends = True)
    edited = json.loads(rows[9])
    edited['text'] = 'another caption'
    metadata.write_text(''.join(rows[:9] + [json.dumps(edited) + '\n'] + rows[10:]))
    with pytest.raises(reruns.SourceChanged, match = r'shard-00001.safetensors was made from 8 records \(images/000008.png .. '
                                                     r'images/000015.png\), and the source now gives them with other captions or images'):
        run(source, out)

    metadata.write_text(''.join(rows[:12]))                  # 12 records: shards 0 and 1, but shard 2 is there
    (out / 'shard-00001.safetensors').unlink()
    with pytest.raises(reruns.SourceChanged, match = r'it now gives 12 records, 2 shards, but the folder holds shard-00002.safetensors'):
        run(source, out)


def test_a_parquet_source_with_rows_added_at_the_top_is_refused(tmp_path):
    """Rows of parquet and datasets sources are keyed by their number, so the keys alone do not
    show rows added at the top: the captions and image bytes do."""
    pytest.importorskip('datasets')
    import pyarrow as pa
    import pyarrow.parquet as pq
    source = shapes.write_set(tmp_path / 'set', 12, 16, format = 'parquet')
    out = tmp_path / 'out'
    run(source, out)
    file = source / 'train-00000.parquet'
    table = pq.read_table(file)
    pq.write_table(pa.concat_tables([table.slice(5, 2), table]), file)
    with pytest.raises(reruns.SourceChanged, match = r'shard-00000.safetensors was made from 8 records \(train-00000.parquet:000000000 .. '
                                                     r'train-00000.parquet:000000007\), and the source now gives them with other captions'):
        run(source, out)


def test_a_shard_written_before_sources_were_recorded_is_checked_by_its_keys(tmp_path):
    """Folders prepared before shards recorded what they were made from: a rerun of the same
    source keeps them; rows added at the top are refused by the keys the shards hold."""
    source = shapes.write_set(tmp_path / 'set', 16, 16)
    out = tmp_path / 'out'
    prepared = run(source, out)
    for path in prepared.shard_paths():                     # as the code before wrote them: no made_from
        with Shard(path) as shard:
            samples = [dict(key = e['key'], **shard.tensors(i)) for i, e in enumerate(shard.samples)]
            skipped = shard.skipped
        shards.write_shard(path, samples, skipped)
    run(source, out)
    add_rows(source, ['new-0'], at_top = True)
    with pytest.raises(reruns.SourceChanged, match = r'shard-00000.safetensors was made from records no longer in this place of the '
                                                     r'source \(images/000007.png and 0 more\)'):
        run(source, out)


def test_a_failed_run_does_not_block_the_right_command(tmp_path, capsys):
    """A wrong --caption-column fails on the first record, after prepare.json was written; the
    right command then prepares the same folder (it was refused: 'they differ in caption_column')."""
    source = shapes.write_set(tmp_path / 'set', 8, 16)
    out = tmp_path / 'out'
    base = ['prepare', str(source), '--out', str(out), '--image-size', '16']
    message = cli_error(base + ['--caption-column', 'caption'], capsys)
    assert "no column 'caption'; its columns are ['file_name', 'text'] (--caption-column picks the caption column)" in message
    prepared = cli.main(base)
    assert prepared.num_samples == 8
    assert json.loads((out / shards.SETTINGS).read_text())['caption_column'] == 'text'
    # once it holds shards, other settings are refused as before
    assert 'they differ in caption_column' in cli_error(base + ['--caption-column', 'file_name'], capsys)


def test_a_rerun_removes_the_temporary_files_of_killed_runs(tmp_path, capsys):
    source = shapes.write_set(tmp_path / 'set', 12, 16)
    out = tmp_path / 'out'
    run(source, out)
    stale = [out / '.shard-00001.safetensors.tmp-999999', out / '.manifest.json.tmp-123']
    for path in stale:
        path.write_bytes(b'half a shard')
    capsys.readouterr()
    run(source, out)
    assert not any(path.exists() for path in stale)
    assert f'{out}: removed 2 temporary files left by an interrupted run' in capsys.readouterr().out


def test_a_second_run_waits_for_the_one_writing_and_leaves_its_files(tmp_path, capsys):
    """While one run holds the folder, a second waits (it does not remove the first's
    temporary file) and goes on once the first is done."""
    source = shapes.write_set(tmp_path / 'set', 12, 16)
    out = tmp_path / 'out'
    out.mkdir()
    working = out / '.shard-00000.safetensors.tmp-999999'
    with reruns.holding(out):
        working.write_bytes(b'being written')
        second = threading.Thread(target = run, args = (source, out))
        second.start()
        time.sleep(0.5)
        assert second.is_alive() and working.exists()
    second.join(60)
    assert not second.is_alive() and not working.exists() and (out / shards.MANIFEST).exists()
    assert 'another `transfusion prepare` is writing into it; waiting for it to finish' in capsys.readouterr().err


def failing_open(out, error: OSError, after_bytes: int | None = None, names: str = ''):
    """builtins.open, but a file opened for writing under `out` (whose name holds `names`) fails
    with `error`: at once, or (after_bytes) once that many bytes are written, as a disk that
    fills up does."""
    real_open = builtins.open

    class Filling:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            self.file.write(data[:after_bytes])
            raise error

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    def open(file, mode = 'r', *args, **kwargs):
        if str(file).startswith(str(out)) and names in str(file) and ('w' in mode or 'a' in mode):
            if after_bytes is None:
                raise error
            return Filling(real_open(file, mode, *args, **kwargs))
        return real_open(file, mode, *args, **kwargs)
    return open


def test_a_full_disk_is_a_one_line_error_and_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    source = shapes.write_set(tmp_path / 'set', 12, 16)
    out = tmp_path / 'out'
    argv = ['prepare', str(source), '--out', str(out), '--image-size', '16', '--shard-size', '8']
    full = OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(builtins, 'open', failing_open(out, full, after_bytes = 100, names = 'shard-00001'))
    message = cli_error(argv, capsys)
    assert message == (f'transfusion: error: {out}/shard-00001.safetensors: No space left on device; free some space '
                       f'(or give --out on another disk), then run the same command again to go on')
    assert sorted(p.name for p in out.iterdir()) == ['prepare.json', 'shard-00000.safetensors']    # the partial shard removed
    monkeypatch.undo()
    assert cli.main(argv).num_samples == 12


def test_a_read_only_folder_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """Tests run as root, whom a read-only mode does not stop: the folder's refusal is simulated."""
    source = shapes.write_set(tmp_path / 'set', 4, 16)
    done = tmp_path / 'done'
    cli.main(['prepare', str(source), '--out', str(done), '--image-size', '16'])
    out = tmp_path / 'out'
    out.mkdir()
    monkeypatch.setattr(builtins, 'open', failing_open(out, PermissionError(errno.EACCES, 'Permission denied')))
    message = cli_error(['prepare', str(source), '--out', str(out), '--image-size', '16'], capsys)
    assert message == f'transfusion: error: {out}/prepare.json: Permission denied; --out must be a folder you can write to, got {out}'
    assert list(out.iterdir()) == []
    # a finished folder made read-only is left as it is: the same command needs to write nothing
    monkeypatch.setattr(builtins, 'open', failing_open(done, PermissionError(errno.EACCES, 'Permission denied')))
    assert cli.main(['prepare', str(source), '--out', str(done), '--image-size', '16']).num_samples == 4
