"""A small, working training run on synthetic data, alone or under torchrun:

    python -m transfusion_pytorch.training --out-dir runs/toy --steps 200
    torchrun --nproc_per_node 2 -m transfusion_pytorch.training --out-dir runs/toy-ddp --steps 200
    torchrun --nproc_per_node 2 -m transfusion_pytorch.training --out-dir runs/toy-fsdp --strategy fsdp
    torchrun --nproc_per_node 8 -m transfusion_pytorch.training --out-dir runs/toy-scale --strategy fsdp --compile --activation-checkpointing selective

Rerunning a command resumes from the newest good checkpoint in --out-dir. Each sample is a
class word, then 8 latent tokens of that class's fixed pattern plus noise, then an end word
(as in `examples/train_toy.py`). The trained model is written to <out-dir>/pretrained (and
<out-dir>/pretrained_ema). The configurable CLI is a later issue; this is the example.
"""

import argparse
import os

import torch

from transfusion_pytorch import Transfusion

from . import TrainConfig, train
from .distributed import teardown

NUM_CLASSES, NUM_TEXT_TOKENS, DIM_LATENT, LENGTH = 10, 16, 8, 8


class ToyDataset:
    def __init__(self, size: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(NUM_CLASSES, LENGTH, DIM_LATENT, generator = generator)
        self.labels = torch.randint(0, NUM_CLASSES, (size,), generator = generator).tolist()
        self.noise = 0.05 * torch.randn(size, LENGTH, DIM_LATENT, generator = generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        label = self.labels[index]
        return [torch.tensor([label]), self.patterns[label] + self.noise[index], torch.tensor([NUM_CLASSES])]

    def num_tokens(self, index):
        return 2 + 1 + (1 + 1 + 1 + LENGTH + 1) + 1      # SOS, label, META '8' BOM latents EOM, end word, EOS


def main():
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out-dir', required = True)
    parser.add_argument('--steps', type = int, default = 200)
    parser.add_argument('--max-tokens', type = int, default = 256, help = 'token budget of a micro-batch per rank')
    parser.add_argument('--grad-accum', type = int, default = 1)
    parser.add_argument('--lr', type = float, default = 2e-3)
    parser.add_argument('--strategy', choices = ('ddp', 'fsdp'), default = 'ddp')
    parser.add_argument('--compile', action = 'store_true', help = 'torch.compile each transformer block (batches padded to --max-tokens)')
    parser.add_argument('--activation-checkpointing', choices = ('selective', 'full'), help = 'recompute every other block ("selective") or every block ("full") in the backward pass')
    parser.add_argument('--bf16', choices = ('auto', 'on', 'off'), default = 'auto', help = 'bf16 autocast (and FSDP mixed precision); auto: on CUDA only')
    parser.add_argument('--checkpoint-every', type = int, default = 50)
    parser.add_argument('--seed', type = int, default = 0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = Transfusion(
        num_text_tokens = NUM_TEXT_TOKENS,
        dim_latent = DIM_LATENT,
        modality_default_shape = (LENGTH,),
        transformer = dict(dim = 64, depth = 2, dim_head = 16, heads = 4),
    )
    config = TrainConfig(
        out_dir = args.out_dir, max_steps = args.steps, max_tokens = args.max_tokens, grad_accum = args.grad_accum,
        lr = args.lr, warmup_steps = args.steps // 10, strategy = args.strategy, checkpoint_every = args.checkpoint_every,
        log_every = 25, seed = args.seed, ema_beta = 0.99, compile = args.compile, activation_checkpointing = args.activation_checkpointing,
        bf16 = dict(auto = None, on = True, off = False)[args.bf16],
    )
    try:
        history = train(model, ToyDataset(4096, seed = args.seed), config)
    finally:
        teardown()
    if history and int(os.environ.get('RANK', 0)) == 0:
        print(f"loss {history[0]['loss']:.3f} at step {history[0]['step']} -> {history[-1]['loss']:.3f} at step {history[-1]['step']}")


if __name__ == '__main__':
    main()
