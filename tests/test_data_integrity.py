"""A prepared folder damaged or edited after prepare, as a user would find it: a flipped bit in a
latent, a manifest whose SHA-256 was zeroed, whose sample counts were edited, or that is no
longer a valid manifest. Each is a one-line ShardError naming the file, raised before any sample
of the damaged shard reaches training, in the training process or a DataLoader worker, and
`transfusion train` prints it as one line with exit status 2."""

import json
import re
import struct

import pytest
import torch

pytest.importorskip('PIL')          # the data extra

from transfusion_pytorch import cli
from transfusion_pytorch.data import shards as shards_module
from transfusion_pytorch.data.loader import LoaderConfig, StreamingLoader
from transfusion_pytorch.data.shards import MANIFEST, Prepared, Shard, ShardError

from data_helpers import prepared_set

pytestmark = pytest.mark.usefixtures('one_thread')


def tokens_4x4(shape):
    return 1 + 3 + 1 + shape[0] * shape[1] + 1


def loader(prepared, workers = 0, **options):
    return StreamingLoader([prepared.folder], tokens_4x4, LoaderConfig(max_tokens = 200, shuffle_buffer = 8, num_workers = workers, **options))


def flip_a_latent_bit(path, sample: int = 2):
    """Flips the lowest exponent bit of the first value of sample `sample`'s latent, in the file's
    bytes (the value halves or doubles), as a bad disk or copy would; returns the value before."""
    data = bytearray(path.read_bytes())
    header_size = struct.unpack('<Q', data[:8])[0]
    start, _ = json.loads(data[8:8 + header_size])[f'{sample:05d}.mean']['data_offsets']
    at = 8 + header_size + start
    before = struct.unpack('<f', data[at:at + 4])[0]
    data[at + 2] ^= 0x80                                    # float32, little-endian: bit 23 is in byte 2
    path.write_bytes(bytes(data))
    return before


def edit_manifest(prepared, edit):
    path = prepared.folder / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def read_until_error(loader, batches: int = 40) -> tuple[list[str], ShardError]:
    """The sample keys the loader yields until it raises a ShardError."""
    keys = []
    with pytest.raises(ShardError) as error:
        for _ in range(batches):
            keys += [key.split(':', 1)[1] for key in loader.next_batch().indices]
    loader.close()
    return keys, error.value


@pytest.fixture
def damaged(tmp_path):
    """A folder of 3 shards (16, 16, 8 samples) whose shard 1 has a bit flipped in a latent."""
    prepared = prepared_set(tmp_path, num = 40)
    path = prepared.shard_paths()[1]
    before = flip_a_latent_bit(path)
    with Shard(path) as shard:                              # unchecked, the flipped value reads as a number
        after = shard.tensors(2)['mean'].flatten()[0].item()
        keys = {entry['key'] for entry in shard.samples}
    assert after in (before / 2, before * 2)
    return prepared, path, keys


@pytest.mark.parametrize('workers', [0, 2])
def test_a_flipped_bit_is_found_before_any_sample_of_its_shard_is_read(damaged, workers):
    prepared, path, damaged_keys = damaged
    Prepared(prepared.folder)                               # the size is right: opening the folder does not hash
    keys, error = read_until_error(loader(prepared, workers))
    assert not damaged_keys & set(keys)
    manifest = json.loads((prepared.folder / MANIFEST).read_text())
    expected = manifest['shards'][1]['sha256']
    actual = shards_module.sha256(path)
    assert str(error) == (f'{path} has the SHA-256 {actual}, but manifest.json says {expected}: the shard or the manifest changed after '
                          f'prepare (damaged or replaced); delete shard-00001.safetensors and run the same `transfusion prepare` again to '
                          f'write both anew')
    with pytest.raises(ShardError, match = re.escape(f'{path} has the SHA-256 {actual}')):
        Prepared(prepared.folder, verify = True)


def test_a_zeroed_sha256_in_the_manifest_is_found(tmp_path):
    prepared = prepared_set(tmp_path, num = 40)
    edit_manifest(prepared, lambda m: m['shards'][2].update(sha256 = '0' * 64))
    with Shard(prepared.shard_paths()[2]) as shard:
        damaged_keys = {entry['key'] for entry in shard.samples}
    keys, error = read_until_error(loader(prepared))
    assert not damaged_keys & set(keys)
    assert re.fullmatch(rf".*shard-00002\.safetensors has the SHA-256 [0-9a-f]{{64}}, but manifest.json says {'0' * 64}: .*", str(error))


def test_each_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    prepared = prepared_set(tmp_path, num = 40, shard_size = 8)                # 5 shards
    hashed = []
    real = shards_module.sha256
    monkeypatch.setattr(shards_module, 'sha256', lambda path: hashed.append(path.name) or real(path))
    reader = loader(prepared, open_shards = 1)                                  # each shard opened many times
    seen = 0
    while seen < 2 * 40:                                                        # two epochs
        seen += len(reader.next_batch().samples)
    assert sorted(hashed) == [p.name for p in prepared.shard_paths()]


@pytest.mark.parametrize('change', [-1, +1])
def test_a_manifest_count_other_than_the_shard_header_is_an_error_naming_both(tmp_path, change):
    prepared = prepared_set(tmp_path, num = 40)
    def edit(manifest):
        manifest['shards'][1]['samples'] += change
        manifest['counts']['samples'] += change
    edit_manifest(prepared, edit)
    with Shard(prepared.shard_paths()[1]) as shard:
        damaged_keys = {entry['key'] for entry in shard.samples}
    keys, error = read_until_error(loader(prepared))
    assert not damaged_keys & set(keys)
    assert str(error) == (f'{prepared.shard_paths()[1]} holds 16 samples by its own header, but manifest.json says {16 + change}: the '
                          f'manifest was edited or belongs to other shards; run the same `transfusion prepare` again to write it anew')

    # edited in one place only, the manifest does not add up: found on opening the folder
    edit_manifest(prepared, lambda m: m['counts'].update(samples = 40))
    with pytest.raises(ShardError, match = re.escape(f"{prepared.folder / MANIFEST} is not a valid manifest: 'counts' says 40 samples, "
                                                     f"but its 'shards' hold {40 + change}; run the same `transfusion prepare` again")):
        Prepared(prepared.folder)


VALID = " is not a valid manifest: "
INVALID = [                     # (what is wrong, the edit, the message after the manifest's path)
    ('not JSON', lambda path: path.write_text(path.read_text()[:100]),                 # cut short
     r" cannot be read as JSON \(.*: line \d+ column \d+ \(char \d+\)\): run the same `transfusion prepare` again to write it anew"),
    ('a key missing', lambda m: m.pop('shards'), VALID + r"'shards' is missing; run the same `transfusion prepare` again to write it anew"),
    ('a count of a wrong type', lambda m: m['shards'][0].update(samples = '8'), VALID + r"'shards'\[0\]: 'samples' must be of type int, got '8'; "),
    ('a shard entry not an object', lambda m: m['shards'].__setitem__(0, 'shard-00000.safetensors'),
     VALID + r"'shards'\[0\] must be a JSON object, got 'shard-00000.safetensors'; "),
    ('a SHA-256 that is not one', lambda m: m['shards'][0].update(sha256 = 'abc'),
     VALID + r"'shards'\[0\]: 'sha256' must be a SHA-256: 64 hexadecimal digits, got 'abc'; "),
    ('a negative count', lambda m: m['counts'].update(samples = -1), VALID + r"'counts': 'samples' must be a count >= 0, got -1; "),
    ('a shape that is not one', lambda m: m['shapes'].update({'4 by 4': m['shapes'].pop('4x4')}),
     VALID + r"'shapes' has the key '4 by 4'; expected 'text' or HxW; "),
    ('a kind of no folder', lambda m: m.update(kind = 'video'), VALID + r"'kind' must be 'image_text', 'text', 'interleaved' or 'edit', got 'video'; "),
]


@pytest.mark.parametrize('name, edit, message', INVALID, ids = [case[0] for case in INVALID])
def test_an_invalid_manifest_is_a_one_line_error_naming_it(tmp_path, capsys, name, edit, message):
    prepared = prepared_set(tmp_path, num = 8)
    path = prepared.folder / MANIFEST
    if name == 'not JSON':
        edit(path)
    else:
        edit_manifest(prepared, edit)
    with pytest.raises(ShardError, match = '^' + re.escape(str(path)) + message):
        Prepared(prepared.folder)
    with pytest.raises(SystemExit) as exit:
        cli.main(['train', '--job', 'image_text', '--data', str(prepared.folder), '--out-root', str(tmp_path / 'runs'), '--workers', '0'])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count('\n') == 1
    assert re.match(f'transfusion: error: {re.escape(str(path))}{message}', err)
    assert not (tmp_path / 'runs').exists()                    # refused before anything is written


def test_the_train_command_reports_a_damaged_shard_found_by_a_worker_in_one_line(damaged, tmp_path, capsys):
    prepared, path, _ = damaged
    with pytest.raises(SystemExit) as exit:
        cli.main(['train', '--job', 'image_text', '--data', str(prepared.folder), '--out-root', str(tmp_path / 'runs'), '--steps', '20',
                  '--workers', '2', '--dim', '32', '--depth', '1', '--heads', '2', '--dim-head', '16', '--max-tokens', '256',
                  '--threads', '1', '--sample-every', '1000', '--checkpoint-every', '1000'])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count('\n') == 1
    error = err[err.index('transfusion: error: '):]                     # after the progress bar's first draw
    assert error.startswith(f'transfusion: error: {path} has the SHA-256 ')
    assert error.endswith('delete shard-00001.safetensors and run the same `transfusion prepare` again to write both anew\n')
