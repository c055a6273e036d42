"""Run by tests/test_training_distributed.py under torchrun (2 gloo processes): FSDP2 on a model with
frozen text weights (as a frozen LM), 3 steps and a checkpoint; then a model of other initial
weights, frozen ones included, resumes from it. Writes to argv[2] whether the resumed model and
EMA (gathered to full tensors) equal the trained ones, and the checkpoint's keys.

    torchrun --nproc_per_node 2 tests/fsdp_resume_run.py OUT_DIR RESULT.pt
"""

import random
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, __file__.rsplit('/', 1)[0])

from conftest import random_sample, tiny_model  # noqa: E402
from test_training_data import ListDataset  # noqa: E402

from transfusion_pytorch.training import TrainConfig, Trainer  # noqa: E402
from transfusion_pytorch.training.checkpoint import list_checkpoints  # noqa: E402
from transfusion_pytorch.training.distributed import teardown  # noqa: E402

FROZEN_LM = dict(dim = 32, depth = 2, dim_head = 8, heads = 2, separate_modality_weights = True, freeze_text_weights = True)


def trainer(out_dir: str, model_seed: int) -> Trainer:
    torch.manual_seed(0)
    rng = random.Random(0)
    data = ListDataset([random_sample(rng) for _ in range(24)])
    torch.manual_seed(model_seed)
    config = TrainConfig(out_dir = out_dir, max_steps = 3, max_tokens = 60, lr = 1e-3, checkpoint_every = 100, log_every = 1,
                         progress = False, ema_beta = 0.5, strategy = 'fsdp')
    return Trainer(tiny_model(transformer = FROZEN_LM), data, config)


def full_state(trainer: Trainer) -> dict:
    options = StateDictOptions(full_state_dict = True, cpu_offload = True)
    return dict(model = get_model_state_dict(trainer.wrapped, options = options), ema = get_model_state_dict(trainer.ema, options = options))


def main(out_dir: str, result: str):
    torch.set_num_threads(1)
    trained = trainer(out_dir, model_seed = 0)
    trained.train()
    expected = full_state(trained)
    resumed = trainer(out_dir, model_seed = 123)
    resumed.resume()
    got = full_state(resumed)
    if resumed.dist.is_main:
        checkpoint = list_checkpoints(resumed.checkpoint_dir)[-1]
        keys = list(dcp.FileSystemReader(checkpoint / 'state').read_metadata().state_dict_metadata)
        equal = {part: sorted(got[part]) == sorted(expected[part]) and all(torch.equal(got[part][k], v) for k, v in expected[part].items())
                 for part in expected}
        torch.save(dict(equal = equal, keys = keys, shared = list(resumed.ema.shared), step = resumed.step), result)
    teardown()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
