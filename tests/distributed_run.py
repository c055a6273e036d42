"""Run by tests/test_training_distributed.py, alone or under torchrun: trains the same tiny model on
the same data for a few steps and saves the final parameters (gathered to full tensors) to argv[1].

    python tests/distributed_run.py OUT.pt STRATEGY GRAD_ACCUM [KEY=VALUE ...] [LANGUAGE_MODEL_FOLDER]

KEY=VALUE pairs set more TrainConfig fields: activation_checkpointing, compile, compile_backend,
bf16. The saved state also records the dtypes of the attention weights that the forward pass saw
and the number of graphs compiled. With a language model folder, the model starts from it,
frozen, with separate modality weights (`lm_helpers.frozen_language_model_run`).
"""

import random
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, __file__.rsplit('/', 1)[0])

from conftest import random_sample, tiny_model  # noqa: E402
from lm_helpers import frozen_language_model_run  # noqa: E402
from test_training_data import ListDataset  # noqa: E402

from transfusion_pytorch.training import TrainConfig, Trainer  # noqa: E402
from transfusion_pytorch.training.distributed import teardown  # noqa: E402


OPTIONS = dict(activation_checkpointing = str, compile = lambda text: text == 'True', compile_backend = str, bf16 = lambda text: text == 'True')


def main(out_path: str, strategy: str, grad_accum: int, options: dict, language_model: str | None = None):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    if language_model is None:
        data = ListDataset([random_sample(rng) for _ in range(24)])     # mixed: text-only, one type, both types
        model = tiny_model()
    else:
        samples, model = frozen_language_model_run(language_model, rng)
        data = ListDataset(samples)
    initial = {name: value.clone() for name, value in model.state_dict().items()}

    config = TrainConfig(
        out_dir = out_path + '.run', max_steps = 3, max_tokens = 60, grad_accum = grad_accum, lr = 1e-3,
        strategy = strategy, checkpoint_every = 100, log_every = 1, progress = False, ema_beta = 0.5, **options,
    )
    trainer = Trainer(model, data, config)
    seen = set()
    if not config.compile:
        # the dtype of the attention weights as the forward pass sees them (under FSDP: gathered)
        for name, module in model.named_modules():
            if name.endswith('attn.to_qkv'):
                module.register_forward_pre_hook(lambda module, args: seen.add(module.weight.dtype))
    history = trainer.train()

    options = StateDictOptions(full_state_dict = True, cpu_offload = True)
    state = dict(model = get_model_state_dict(trainer.wrapped, options = options), ema = get_model_state_dict(trainer.ema, options = options),
                 initial = initial, losses = [entry['loss'] for entry in history], forward_dtypes = seen,
                 graphs = torch._dynamo.utils.counters['stats']['unique_graphs'],
                 frozen = [name for name, p in model.named_parameters() if not p.requires_grad])
    if trainer.dist.is_main:
        torch.save(state, out_path)
    teardown()


if __name__ == '__main__':
    extra = sys.argv[4:]
    pairs = [arg.split('=', 1) for arg in extra if '=' in arg]
    folders = [arg for arg in extra if '=' not in arg]
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), {key: OPTIONS[key](value) for key, value in pairs}, *folders)
