"""Text only: a byte-level language model on the Python standard library's own source files,
a real corpus that every machine with Python has. Transfusion with no modality is a plain
causal transformer; this trains it with the library's Trainer on fixed-length byte rows, then
continues a prompt.

    python examples/train_text.py [--steps 300] [--seq-len 128] [--out-dir runs/text]
"""

import argparse
import sysconfig
from pathlib import Path

import torch

from transfusion_pytorch import Transfusion
from transfusion_pytorch.training import TrainConfig, Trainer


def stdlib_bytes(max_bytes: int) -> bytes:
    """The standard library's top-level .py files, in name order, up to `max_bytes`."""
    files = sorted(Path(sysconfig.get_paths()['stdlib']).glob('*.py'))
    data = bytearray()
    for path in files:
        data += path.read_bytes()
        if len(data) >= max_bytes:
            break
    if len(data) == 0:
        raise SystemExit('no standard library source files found')
    return bytes(data[:max_bytes])


class ByteRows:
    """Consecutive, non-overlapping rows of `seq_len` bytes; a sample is one text row."""

    def __init__(self, data: bytes, seq_len: int):
        self.data, self.seq_len = torch.tensor(list(data), dtype = torch.long), seq_len

    def __len__(self):
        return len(self.data) // self.seq_len

    def __getitem__(self, index):
        return [self.data[index * self.seq_len:(index + 1) * self.seq_len]]

    def num_tokens(self, index):
        return self.seq_len + 2             # SOS and EOS frame a sample


def main(argv = None):
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type = int, default = 300)
    parser.add_argument('--seq-len', type = int, default = 128)
    parser.add_argument('--rows-per-batch', type = int, default = 8)
    parser.add_argument('--max-bytes', type = int, default = 2_000_000, help = 'how much of the corpus to use')
    parser.add_argument('--dim', type = int, default = 128)
    parser.add_argument('--depth', type = int, default = 4)
    parser.add_argument('--lr', type = float, default = 2e-3)
    parser.add_argument('--out-dir', default = 'runs/text')
    parser.add_argument('--prompt', default = 'def ')
    parser.add_argument('--generate', type = int, default = 200, help = 'bytes to generate after training')
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dataset = ByteRows(stdlib_bytes(args.max_bytes), args.seq_len)
    model = Transfusion(num_text_tokens = 256, transformer = dict(dim = args.dim, depth = args.depth, dim_head = 32, heads = args.dim // 32))
    config = TrainConfig(
        out_dir = args.out_dir, max_steps = args.steps, max_tokens = args.rows_per_batch * (args.seq_len + 2), lr = args.lr,
        warmup_steps = max(1, args.steps // 20), checkpoint_every = max(args.steps, 1), log_every = max(1, min(25, args.steps)),
        ema_beta = None,
    )
    print(f'{len(dataset):,} rows of {args.seq_len} bytes of standard library source; '
          f'{sum(p.numel() for p in model.parameters()):,} parameters')
    history = Trainer(model, dataset, config).train()
    if not history:
        print(f'{args.out_dir} already holds a finished run (delete it to train again); sampling from it')
    else:
        print(f"loss {history[0]['loss']:.3f} at step {history[0]['step']} -> {history[-1]['loss']:.3f} at step {history[-1]['step']} (nats per byte)")

    # a sample was framed by SOS in training (see ByteRows), so the prompt starts with it too
    prompt = torch.tensor([[model.vocab.sos, *args.prompt.encode()]])
    generated = model.generate_text_only(prompt, prompt.shape[1] + args.generate, temperature = 0.8, seed = 0)
    text = bytes(prompt[0, 1:].tolist() + generated[0].tolist()).decode('utf-8', errors = 'replace')
    print('-' * 40 + '\n' + text + '\n' + '-' * 40)
    return history


if __name__ == '__main__':
    main()
