"""What compiled training pads: the share of each batch's tokens that is padding (issue 25 item 18).

    python benchmarks/padding.py [--work DIR] [--batches 200]

With `TrainConfig(compile = True)` every batch's packed sequence is padded up to the token
budget rounded up to 128 (`parallelize.TOKEN_MULTIPLE`), so that the compiled blocks see one
length. The loader fills a batch greedily up to the budget, so the padding is what is left
when the next sample does not fit, plus the short batch that ends an epoch. Counted from the
loaders' batches, without a model step or a compile:

1. the digits demo (`transfusion train`, patch 4 and patch 2, budget 512): one epoch of the
   token-budget loader;
2. the README walk-through (coloured shapes, 24 x 24, patch 4, budget 1,024): `--batches`
   batches of the streaming loader over the walk-through set, written and prepared under
   `--work` when not there already.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def waste(num_tokens: list[int], max_tokens: int) -> str:
    from transfusion_pytorch.masks import padded_length
    from transfusion_pytorch.training.parallelize import TOKEN_MULTIPLE
    padded = padded_length(max_tokens, TOKEN_MULTIPLE)
    shares = [1. - n / padded for n in num_tokens]
    full = [share for share, n in zip(shares, num_tokens) if n > max_tokens // 2]       # all but an epoch's short last batch
    return (f'{len(num_tokens)} batches of {min(num_tokens)} to {max(num_tokens)} tokens, padded to {padded}: '
            f'padding {100 * statistics.mean(shares):.1f}% of the tokens on average '
            f'({100 * statistics.mean(full):.1f}% in the full batches, at most {100 * max(full):.1f}%)')


def digits(patch: int) -> str:
    from transfusion_pytorch.demos.digits_job import DigitsConfig, prepare
    from transfusion_pytorch.training.data import TokenBudgetLoader
    config = DigitsConfig(out_root = tempfile.mkdtemp(), patch = patch)
    dataset = prepare(config).dataset
    loader = TokenBudgetLoader(dataset, config.max_tokens, seed = config.seed)
    num_tokens = [loader.next_batch().num_tokens for _ in range(len(loader))]
    return f'digits, patch {patch} ({dataset.num_tokens(0)} tokens a sample), one epoch: ' + waste(num_tokens, config.max_tokens)


def walk_through(work: Path, batches: int) -> str:
    from transfusion_pytorch.data.loader import LoaderConfig, StreamingLoader, modality_tokens_of
    from transfusion_pytorch.data.prepare import PrepareConfig, prepare
    from transfusion_pytorch.data.shapes import write_set
    from transfusion_pytorch.data.shards import MANIFEST
    from transfusion_pytorch.jobs.image_text import build_model, load_config, open_data

    folder = work / 'shapes-prepared'
    if not (folder / MANIFEST).exists():
        write_set(work / 'shapes', 4000, 24)
        prepare(PrepareConfig(source = str(work / 'shapes'), out = str(folder), image_size = 24, patch = 4, progress = False))
    config = load_config(None, dict(data = str(folder), dim = 128, depth = 4, heads = 4, dim_head = 32, max_tokens = 1024,
                                    out_root = tempfile.mkdtemp(), workers = 0))
    folders, record = open_data(config, config.run_dir)
    loader = StreamingLoader(
        folders, modality_tokens_of(build_model(config, record)),
        LoaderConfig(max_tokens = config.max_tokens, seed = config.seed, caption_fraction = config.caption_fraction,
                     shuffle_buffer = config.shuffle_buffer, num_workers = 0, weights = tuple(record['weights'])),
        tokenizer = record['tokenizer'], codec = record['codec'],
    )
    try:
        num_tokens = [loader.next_batch().num_tokens for _ in range(batches)]
    finally:
        loader.close()
    return f'walk-through, {batches} batches: ' + waste(num_tokens, config.max_tokens)


def main():
    parser = argparse.ArgumentParser(description = __doc__.split('\n')[0])
    parser.add_argument('--work', type = Path, default = Path(tempfile.gettempdir()) / 'transfusion-padding')
    parser.add_argument('--batches', type = int, default = 200)
    args = parser.parse_args()
    for patch in (4, 2):
        print(digits(patch))
    print(walk_through(args.work, args.batches))


if __name__ == '__main__':
    main()
