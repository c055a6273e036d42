"""Image only: modality-only training, `model(images, modality_type = 0)`, on scikit-learn's
8 x 8 digits cut into 2 x 2 patches (a 4 x 4 grid of 4-dim latents), then unconditional
sampling with `generate_modality_only` into a PNG grid.

    python examples/train_image_only.py [--steps 400] [--out runs/image_only.png]
"""

import argparse
from pathlib import Path

import torch

from transfusion_pytorch import Transfusion
from transfusion_pytorch.demos.codecs import PatchCodec
from transfusion_pytorch.demos.digits import load_split
from transfusion_pytorch.demos.plots import save_digit_grid
from transfusion_pytorch.training.trainer import warmup_cosine


def main(argv = None):
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type = int, default = 400)
    parser.add_argument('--batch-size', type = int, default = 32)
    parser.add_argument('--lr', type = float, default = 2e-3)
    parser.add_argument('--dim', type = int, default = 64)
    parser.add_argument('--depth', type = int, default = 3)
    parser.add_argument('--modality-steps', type = int, default = 16)
    parser.add_argument('--out', default = 'runs/image_only.png')
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    codec = PatchCodec(2)
    train, _ = load_split()
    latents = codec.encode(train.images)                                    # (n, 4, 4, 4)

    model = Transfusion(
        num_text_tokens = 1,                                                # no text: the structural tokens only
        dim_latent = codec.dim_latent, modality_default_shape = codec.shape,
        transformer = dict(dim = args.dim, depth = args.depth, dim_head = 32, heads = args.dim // 32),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr = args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps // 10, args.steps, 0.1))

    losses = []
    for step in range(1, args.steps + 1):
        batch = latents[torch.randint(0, len(latents), (args.batch_size,))]
        loss = model(batch, modality_type = 0)                              # Float[b, 4, 4, 4]: one image per sample
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            print(f'step {step:4d}  flow loss {sum(losses[-50:]) / len(losses[-50:]):.4f}')

    sampled = model.generate_modality_only(batch_size = 32, modality_steps = args.modality_steps, seed = 0)   # (32, 4, 4, 4)
    path = save_digit_grid(codec.decode(sampled).reshape(4, 8, 8, 8), Path(args.out), title = 'unconditional samples')
    print(f'wrote {path}')
    return losses


if __name__ == '__main__':
    main()
