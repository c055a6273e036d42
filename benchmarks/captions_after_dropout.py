"""What condition dropout taught a digits model to write after an image.

For a digits run folder (`transfusion train` writes runs/digits): the share of the held-out
images that, given as the prompt and sampled at the default temperature, are answered with a
digit; the share answered by EOS right after the image; and the model's mean probability of
EOS right after `SOS [image]`. Dropout that removes the caption after an image, or teaches EOS
after `SOS [image]`, shows here (see docs/generation.md, classifier-free guidance).

    python benchmarks/captions_after_dropout.py runs/digits
"""

import argparse

import torch

from transfusion_pytorch import cli
from transfusion_pytorch.demos.digits import load_split
from transfusion_pytorch.demos.digits_eval import text_after_modality

DIGIT_IDS = set(range(10))          # the demo's vocabulary starts with the ten digit words


@torch.no_grad()
def main(argv = None):
    parser = argparse.ArgumentParser(description = __doc__.splitlines()[0])
    parser.add_argument('run', help = 'a digits run folder')
    parser.add_argument('--seed', type = int, default = 0)
    args = parser.parse_args(argv)

    loaded = cli.load(args.run, ema = True)
    model, codec = loaded.model, loaded.codec
    _, test = load_split()
    latents = codec.encode(test.images)
    vocab = model.vocab

    # up to three words generated after the image prompt
    answers = [text_after_modality(s) for s in model.sample([[latent] for latent in latents], max_length = 3, seed = args.seed)]
    with_digit = sum(any(i in DIGIT_IDS for i in answer) for answer in answers) / len(answers)
    ended = sum(len(answer) == 0 for answer in answers) / len(answers)

    packed = model.pack([[latent] for latent in latents])
    hidden = model.hidden_states(packed, packed.latents, torch.ones(packed.num_spans))
    after_image = packed.cu_seqlens[1:] - 2                     # EOM, which predicts what follows the image
    p_eos = model.to_logits(hidden[after_image]).softmax(-1)[:, vocab.eos].mean()

    print(f'{args.run}: {100 * with_digit:.1f}% of {len(answers)} held-out image prompts answered with a digit '
          f'(sampled, seed {args.seed}); {100 * ended:.1f}% ended right after the image; mean p(EOS | SOS [image]) = {p_eos:.4f}')
    return dict(with_digit = with_digit, ended = ended, p_eos = float(p_eos))


if __name__ == '__main__':
    main()
