"""Images as `prepare` reads them: EXIF orientation, greys of more than 8 bits, and the reason
a broken image is skipped (the same from run to run)."""

import io
import json

import pytest
import torch

pytest.importorskip('PIL')          # the data extra

from PIL import Image

from transfusion_pytorch.data import shapes
from transfusion_pytorch.data.codecs import patchify
from transfusion_pytorch.data.images import cover_and_crop, decode, to_tensor
from transfusion_pytorch.data.prepare import PrepareConfig, prepare
from transfusion_pytorch.data.shards import Shard

pytestmark = pytest.mark.usefixtures('one_thread')

ORIENTATION = 0x0112        # the EXIF tag


def stored(prepared) -> dict:
    """key -> mean latent of each sample of a prepared folder."""
    out = {}
    for path in prepared.shard_paths():
        with Shard(path) as shard:
            out.update((entry['key'], shard.tensors(i)['mean']) for i, entry in enumerate(shard.samples))
    return out


def imagefolder(root, files: dict) -> str:
    """A folder of `files` (name -> bytes), each captioned by its name."""
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / 'metadata.jsonl').write_text(''.join(json.dumps(dict(file_name = name, text = name)) + '\n' for name in files))
    return str(root)


def test_a_phone_photo_is_prepared_upright_in_the_bucket_of_its_upright_shape(tmp_path):
    """A JPEG stored 32 wide x 16 high with EXIF orientation 6 (shown turned 90 degrees
    clockwise, as phones save portrait photos) is a 16 x 32 portrait: prepared upright, it goes
    to the tall bucket."""
    photo = Image.new('RGB', (32, 16), (250, 250, 250))
    photo.paste((200, 20, 20), (0, 0, 8, 16))               # red on the stored left: the top once upright
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    buffer = io.BytesIO()
    photo.save(buffer, format = 'JPEG', exif = exif, quality = 95)
    source = imagefolder(tmp_path / 'photos', {'portrait.jpg': buffer.getvalue()})

    prepared = prepare(PrepareConfig(source = source, out = str(tmp_path / 'out'), image_size = 16, buckets = True, progress = False))
    latent = stored(prepared)['portrait.jpg']
    assert tuple(latent.shape[:2]) == (6, 3)                # the 24 x 12 (height x width) bucket, patch 4

    # the stored pixels are the JPEG's turned upright (orientation 6 is undone by a turn of 270 degrees)
    turned = Image.open(io.BytesIO(buffer.getvalue())).convert('RGB').transpose(Image.Transpose.ROTATE_270)
    expected = patchify(to_tensor(cover_and_crop(turned, 24, 12))[None], 4)[0]
    torch.testing.assert_close(latent, expected)
    upright = decode(lambda: buffer.getvalue())
    assert upright.size == (16, 32)
    red, white = upright.getpixel((8, 2)), upright.getpixel((8, 28))
    assert red[0] > 150 > red[1] and min(white) > 200       # the stored left is the top


def image_bytes(array, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format = format)
    return buffer.getvalue()


@pytest.mark.parametrize('mode, values, full', [
    ('I;16', [0, 32768, 65535, 100 * 257], 65535),           # a 16-bit PNG
    ('I', [0, 32768, 65535, 100 * 257], 65535),              # 32-bit ints (a TIFF), taken as 16-bit
    ('F', [0., .5, 1., 100 / 255], 1.),                      # floats (a TIFF) in [0, 1]
])
def test_greys_of_more_than_8_bits_are_scaled_not_clipped(mode, values, full):
    np = pytest.importorskip('numpy')
    dtype = dict(I = np.int32, F = np.float32).get(mode, np.uint16)
    data = image_bytes(np.array([values] * 2, dtype = dtype), 'PNG' if mode == 'I;16' else 'TIFF')
    assert Image.open(io.BytesIO(data)).mode == mode
    image = decode(lambda: data)
    assert image.mode == 'RGB'
    assert [image.getpixel((x, 0)) for x in range(4)] == [(v, v, v) for v in (0, 128, 255, 100)]


def test_a_16_bit_mid_grey_png_is_stored_mid_grey_not_white(tmp_path):
    np = pytest.importorskip('numpy')
    grey = image_bytes(np.full((16, 16), 32768, dtype = np.uint16), 'PNG')
    source = imagefolder(tmp_path / 'set', {'grey.png': grey})
    latent = stored(prepare(PrepareConfig(source = source, out = str(tmp_path / 'out'), image_size = 16, progress = False)))['grey.png']
    # pixels are stored in [-1, 1] (the patch codec keeps them as they are): mid-grey is about 0, white would be 1
    assert latent.abs().max() < 0.01


def test_a_broken_image_given_as_bytes_is_skipped_the_same_way_each_run(tmp_path):
    """A parquet source (images held as bytes) with a broken image: two runs give the same bytes,
    and the reason names the image by its size, not by the memory address of a buffer."""
    pytest.importorskip('datasets')
    source = shapes.write_set(tmp_path / 'set', 6, 16, format = 'parquet')
    import pyarrow.parquet as pq
    file = source / 'train-00000.parquet'
    table = pq.read_table(file).to_pylist()
    table[2]['image'] = dict(bytes = b'not a picture', path = 'broken.png')
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(table, schema = pq.read_schema(file)), file)

    runs = [prepare(PrepareConfig(source = str(source), out = str(tmp_path / name), image_size = 16, progress = False)) for name in 'ab']
    assert runs[0].manifest['skipped'] == [['train-00000.parquet:000000002',
                                            'unreadable image: UnidentifiedImageError: cannot identify image file of 13 bytes']]
    assert runs[0].num_samples == 5
    for path in runs[0].shard_paths():
        assert path.read_bytes() == (runs[1].folder / path.name).read_bytes()
    assert runs[0].manifest['shards'] == runs[1].manifest['shards']
