"""Run by tests/test_language_models_distributed.py, alone or under torchrun: trains a model
started from a tiny language model, frozen, with separate modality weights, for a few steps,
and saves the final parameters (gathered to full tensors) and the initial ones to argv[1].

    python tests/distributed_lm_run.py OUT.pt LM_FOLDER STRATEGY GRAD_ACCUM
"""

import random
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, __file__.rsplit('/', 1)[0])

from lm_helpers import VOCAB  # noqa: E402
from test_training_data import ListDataset  # noqa: E402

from transfusion_pytorch import Transfusion  # noqa: E402
from transfusion_pytorch.training import TrainConfig, Trainer  # noqa: E402
from transfusion_pytorch.training.distributed import teardown  # noqa: E402


def sample(rng: random.Random) -> list:
    text = lambda: torch.randint(0, VOCAB, (rng.randint(1, 6),))
    kind = rng.choice(['text', 'mixed', 'modality'])
    if kind == 'text':
        return [text()]
    modality = (0, torch.randn(rng.randint(1, 4), 6))
    return [text(), modality, text()] if kind == 'mixed' else [modality]


def main(out_path: str, folder: str, strategy: str, grad_accum: int):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    data = ListDataset([sample(rng) for _ in range(24)])
    model = Transfusion.from_language_model(folder, freeze_language_model = True, separate_modality_weights = True,
                                            dim_latent = 6, modality_default_shape = (3,))
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]

    config = TrainConfig(
        out_dir = out_path + '.run', max_steps = 3, max_tokens = 60, grad_accum = grad_accum, lr = 1e-3,
        strategy = strategy, checkpoint_every = 100, log_every = 1, progress = False, ema_beta = 0.5,
    )
    trainer = Trainer(model, data, config)
    history = trainer.train()

    options = StateDictOptions(full_state_dict = True, cpu_offload = True)
    state = dict(model = get_model_state_dict(trainer.wrapped, options = options), initial = initial, frozen = frozen,
                 losses = [entry['loss'] for entry in history])
    if trainer.dist.is_main:
        torch.save(state, out_path)
    teardown()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
