"""A toy Transfusion run on synthetic data, small enough for a laptop CPU (about 20 seconds on 2 cores).

Each sample is "a class word, then a modality of that class": the text is one of 10 class
ids, the modality a 1-d sequence of 8 latent tokens whose values are a fixed pattern of the
class plus a little noise. The model learns to predict the text and to flow from noise to the
class's pattern; the loss printed every 25 steps falls almost tenfold (5.2 to 0.6). The text
loss levels off near ln(10) / 6 = 0.38: the class word is drawn at random, so the first of the
six predicted tokens of a sample cannot be known in advance.

    python examples/train_toy.py [--steps 1000] [--batch-size 16] [--seed 0]
"""

import argparse

import torch
from tqdm import tqdm

from transfusion_pytorch import Transfusion

NUM_CLASSES, NUM_TEXT_TOKENS, DIM_LATENT, LENGTH = 10, 16, 8, 8


def make_batch(patterns: torch.Tensor, batch_size: int, generator: torch.Generator) -> list:
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator = generator)
    batch = []
    for label in labels.tolist():
        latent = patterns[label] + 0.05 * torch.randn(LENGTH, DIM_LATENT, generator = generator)
        batch.append([torch.tensor([label]), latent, torch.tensor([NUM_CLASSES])])   # "label", modality, "end word"
    return batch


def main():
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type = int, default = 1000)
    parser.add_argument('--batch-size', type = int, default = 16)
    parser.add_argument('--lr', type = float, default = 2e-3)
    parser.add_argument('--seed', type = int, default = 0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    patterns = torch.randn(NUM_CLASSES, LENGTH, DIM_LATENT, generator = generator)

    model = Transfusion(
        num_text_tokens = NUM_TEXT_TOKENS,
        dim_latent = DIM_LATENT,
        modality_default_shape = (LENGTH,),
        transformer = dict(dim = 64, depth = 2, dim_head = 16, heads = 4),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr = args.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr = args.lr, total_steps = args.steps, pct_start = 0.1)

    print(f'{sum(p.numel() for p in model.parameters()):,} parameters, {args.steps} steps of {args.batch_size} samples')

    window, first = [], None
    progress = tqdm(range(1, args.steps + 1), desc = 'training')
    for step in progress:
        loss, breakdown = model(make_batch(patterns, args.batch_size, generator), return_breakdown = True)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.)
        optimizer.step()
        schedule.step()

        window.append((loss.item(), breakdown.text.item(), breakdown.flow[0].item()))
        if step % 25 == 0:
            total, text, flow = (sum(values) / len(values) for values in zip(*window))
            first = first or total
            progress.write(f'step {step:4d}  loss {total:.4f}  (text {text:.4f}, flow {flow:.4f})')
            progress.set_postfix(loss = f'{total:.3f}')
            window = []

    print(f'loss fell from {first:.3f} (first 25 steps) to {total:.3f} (last 25 steps): {first / total:.1f}x')


if __name__ == '__main__':
    main()
