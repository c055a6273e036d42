"""The command-line side of the data path and the image-text job, registered by `cli.py`:

    transfusion shapes OUT [--num N] [--size S] [--format imagefolder]   write the walk-through set
    transfusion prepare SOURCE --out DIR [--image-size N] [--vae PATH] [--tokenizer PATH] ...
    transfusion train --job image_text --data DIR [--key value ...]     (or a TOML file with job = "image_text")
    transfusion caption RUN PICTURE [PICTURE ...]

`transfusion sample` and `transfusion eval` dispatch here for image-text runs (`sampling.py`).
"""

from __future__ import annotations

from pathlib import Path

from ..config_files import ConfigError, parse_overrides


def job_of(config_path: str | None, extra: list[str]) -> str:
    """The job a `transfusion train` command line asks for: --job, else the TOML file's `job`, else digits."""
    for index, arg in enumerate(extra):
        if arg == '--job' and index + 1 < len(extra):
            return extra[index + 1]
        if arg.startswith('--job='):
            return arg.split('=', 1)[1]
    if config_path is not None and Path(config_path).exists():
        from ..config_files import tomllib
        try:
            return tomllib.loads(Path(config_path).read_text()).get('job', 'digits')
        except tomllib.TOMLDecodeError:
            return 'digits'                 # the loader reports the error
    return 'digits'


def train_image_text(config_path: str | None, extra: list[str]):
    """Data that does not fit the run (another tokenizer or codec than the run's or the language
    model's, an unfinished prepared folder, a sample over max_tokens) is found before training
    starts, and reported as an error in what was asked: one line, exit status 2; so is a sample
    the model refuses in training (a NaN), named by its folder, key and shard, and so are
    checkpoints that cannot be resumed (all damaged, or written by another number of processes)."""
    from ..data.codecs import CodecMismatch
    from ..data.loader import SampleTooLong
    from ..data.shards import ShardError
    from ..data.tokenizers import TokenizerMismatch
    from ..training.data import SampleError
    from ..training.checkpoint import CheckpointError
    from . import image_text
    overrides = parse_overrides(image_text.ImageTextConfig, extra)
    config = image_text.load_config(config_path, overrides)
    try:
        return image_text.train(config)
    except (TokenizerMismatch, CodecMismatch, ShardError, SampleTooLong, SampleError, CheckpointError) as error:
        raise ConfigError(str(error)) from None


def add_parsers(commands):
    from ..cli_options import add_run_options, int_at_least, positive_int
    from ..data import documents, shapes, sources
    prepare = commands.add_parser(
        'prepare', help = 'encode a folder of captioned images (or text) once into shards for training',
        description = 'Reads SOURCE (an imagefolder with metadata.jsonl / .csv, a datasets save_to_disk folder, parquet files, '
                      'webdataset .tar files, or .txt / .jsonl text) of captioned images, text, interleaved documents (OBELICS '
                      'layout) or editing triples, resizes and encodes each image once (the patch codec, '
                      'or --vae), tokenizes each caption (UTF-8 bytes, or --tokenizer) and writes shards and a manifest to --out. '
                      'Rerunning the same command finishes an interrupted run.')
    prepare.add_argument('source', help = 'a folder or file')
    prepare.add_argument('--out', required = True, help = 'the prepared folder to write')
    prepare.add_argument('--kind', choices = sources.KINDS + documents.KINDS,
                         help = 'interleaved (documents in the OBELICS layout) or edit (source image, instruction, target image), '
                                'or the layout of a caption or text source; default: both found from the source and its columns')
    prepare.add_argument('--image-size', type = int, default = 256, help = 'square side the images are resized and centre-cropped to (default 256)')
    prepare.add_argument('--buckets', action = 'store_true', help = 'group by aspect ratio into buckets of about image-size^2 pixels instead of cropping')
    prepare.add_argument('--vae', help = 'a local diffusers autoencoder folder (default: the patch codec, nothing pretrained)')
    prepare.add_argument('--patch', type = int, help = 'patch size: of pixels for the patch codec (default 4), of VAE latent cells (default 1)')
    prepare.add_argument('--tokenizer', help = 'a local Hugging Face tokenizer folder (default: UTF-8 bytes, vocabulary 256)')
    prepare.add_argument('--caption-column', default = 'text', help = 'the caption column (default text)')
    prepare.add_argument('--image-column', default = 'image', help = 'the image column of datasets / parquet sources (default image)')
    prepare.add_argument('--text-column', default = 'text', help = 'the text column of .jsonl text sources (default text)')
    prepare.add_argument('--source-image-column', help = "edits: the source image column (default InstructPix2Pix's original_image, "
                                                         "or MagicBrush's source_img when the source has MagicBrush's columns)")
    prepare.add_argument('--instruction-column', help = 'edits: the instruction column (default edit_prompt, or instruction)')
    prepare.add_argument('--target-image-column', help = 'edits: the target image column (default edited_image, or target_img)')
    prepare.add_argument('--split', default = 'train', help = 'the split of a saved DatasetDict (default train)')
    prepare.add_argument('--shard-size', type = int, default = 1000, help = 'records per shard (default 1000)')
    prepare.add_argument('--batch-size', type = int, default = 32, help = 'images per encoder call (default 32)')
    prepare.add_argument('--max-text-tokens', type = int, default = 1024, help = 'text rows longer than this continue in the next row (default 1024)')
    prepare.add_argument('--max-caption-tokens', type = int, default = 1024, help = 'the longest caption of an image, in tokens (default 1024)')
    prepare.add_argument('--long-captions', choices = ('truncate', 'skip', 'error'), default = 'truncate',
                         help = 'a longer caption: cut to --max-caption-tokens (default), its sample left out, or an error naming it; '
                                'counted in the manifest and the summary line')
    prepare.add_argument('--device', help = 'where the encoder runs (default cuda when available)')

    walk = commands.add_parser('shapes', help = 'write the walk-through set: captioned drawings of coloured shapes',
                               description = 'Writes NUM pictures of coloured shapes, captioned "a red circle at the top left", '
                                             'in one of the input layouts `transfusion prepare` reads.')
    walk.add_argument('out', help = 'the folder to write')
    walk.add_argument('--num', type = positive_int, default = 4000, help = 'number of pictures (default 4000)')
    walk.add_argument('--size', type = int_at_least(shapes.MIN_SIZE), default = 32,
                      help = f'picture side in pixels, at least {shapes.MIN_SIZE} (default 32)')
    walk.add_argument('--seed', type = int, default = 0)
    walk.add_argument('--format', choices = shapes.FORMATS, default = 'imagefolder', help = 'layout (default imagefolder)')

    caption = commands.add_parser('caption', help = 'caption pictures with an image-text run',
                                  description = 'Prints the caption the model of an image-text run writes for each picture.')
    caption.add_argument('model', metavar = 'RUN', help = 'a run folder of the image_text job')
    caption.add_argument('pictures', nargs = '+', help = 'picture files')
    add_run_options(caption)
    caption.add_argument('--no-ema', action = 'store_true', help = "use the run's online weights instead of its EMA weights")


def command_prepare(args):
    from ..data.prepare import PrepareConfig, prepare
    try:
        config = PrepareConfig(
            source = args.source, out = args.out, kind = args.kind, image_size = args.image_size, buckets = args.buckets, vae = args.vae,
            patch = args.patch, tokenizer = args.tokenizer, caption_column = args.caption_column, image_column = args.image_column,
            text_column = args.text_column, source_image_column = args.source_image_column,
            instruction_column = args.instruction_column, target_image_column = args.target_image_column, split = args.split, shard_size = args.shard_size, batch_size = args.batch_size,
            max_text_tokens = args.max_text_tokens, max_caption_tokens = args.max_caption_tokens, long_captions = args.long_captions,
            device = args.device,
        )
        return prepare(config)
    except OSError as error:
        if error.errno is None:         # ours, e.g. a --vae folder without config.json: the message says it all
            raise ConfigError(str(error)) from None
        raise ConfigError(os_error_message(error, Path(args.out))) from None
    except ValueError as error:
        raise ConfigError(str(error)) from None


def os_error_message(error: OSError, out: Path) -> str:
    """A file that cannot be read or written, in one line, with what to do when it is --out that
    cannot be written (a partly written shard is never left: see shards.atomic_write)."""
    import errno
    where = Path(error.filename) if error.filename is not None else None
    message = f'{where}: {error.strerror}' if where is not None else error.strerror or str(error)
    inside = where is not None and (where.resolve() == out.resolve() or out.resolve() in where.resolve().parents)
    if inside and error.errno == errno.ENOSPC:
        message += '; free some space (or give --out on another disk), then run the same command again to go on'
    elif inside and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        message += f'; --out must be a folder you can write to, got {out}'
    return message


def command_shapes(args):
    from ..cli_options import UsageError
    from ..data.shapes import write_set
    out = Path(args.out)
    blocking = next((path for path in (out, *out.parents) if path.exists() and not path.is_dir()), None)
    if blocking == out:
        raise UsageError(f'OUT: {out} is a file; give a folder to write the drawings to')
    if blocking is not None:
        raise UsageError(f'OUT: {blocking} is a file, so the folder {out} cannot be made')
    try:
        out = write_set(out, args.num, args.size, args.seed, args.format)
    except OSError as error:
        raise UsageError(f'OUT: cannot write the drawings to {out} ({error.strerror or error})') from None
    print(f'wrote {args.num} captioned drawings ({args.size} x {args.size}, {args.format}) to {out}')
    return out


def command_caption(args):
    from .run_commands import command_caption
    return command_caption(args)


COMMANDS = dict(prepare = command_prepare, shapes = command_shapes, caption = command_caption)


def image_text_keys() -> str:
    from ..config_files import describe
    from .image_text import ImageTextConfig
    return describe(ImageTextConfig)



