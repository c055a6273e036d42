"""The EMA of the weights: frozen weights (a frozen language model) shared with the online
model rather than copied, and an EMA that still averages, saves and samples as a full copy does."""

import copy
import math
import random

import pytest
import torch

from transfusion_pytorch import Transfusion

from conftest import random_batch, tiny_model

pytestmark = pytest.mark.usefixtures('one_thread')

FROZEN_LM = dict(dim = 32, depth = 2, dim_head = 8, heads = 2, separate_modality_weights = True, freeze_text_weights = True)


def frozen_model():
    torch.manual_seed(0)
    return tiny_model(transformer = FROZEN_LM)


def storages(module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_frozen_weights_are_shared_not_copied():
    model = frozen_model()
    ema = model.create_ema()
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) > 10 and 'transformer.blocks.0.attn.to_qkv.weight' in frozen and 'token_embed.weight' in frozen
    ema_params, online = dict(ema.module.named_parameters()), dict(model.named_parameters())
    assert all(ema_params[name] is online[name] for name in frozen)
    trained = [name for name in online if name not in frozen]
    assert all(ema_params[name].untyped_storage().data_ptr() != online[name].untyped_storage().data_ptr() for name in trained)
    # the two models together hold the frozen weights once and the trained ones twice
    frozen_numel = sum(online[name].numel() for name in frozen)
    trained_numel = sum(online[name].numel() for name in trained)
    assert sum(p.numel() for p in {id(p): p for p in [*model.parameters(), *ema.module.parameters()]}.values()) == frozen_numel + 2 * trained_numel
    assert storages(model) & storages(ema.module) == {online[name].untyped_storage().data_ptr() for name in frozen}


def test_an_ema_sharing_frozen_weights_averages_saves_and_samples_as_a_full_copy(tmp_path):
    model = frozen_model()
    ema = model.create_ema(beta = 0.5)
    reference = copy.deepcopy(model).requires_grad_(False)          # the old EMA: a full copy, every weight averaged
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr = 1e-2)
    rng = random.Random(0)
    for step in range(4):
        model(random_batch(rng)).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        with torch.no_grad():
            for averaged, online in zip(reference.parameters(), model.parameters()):
                averaged.lerp_(online, 1. if step == 0 else 0.5)

    state, expected = ema.module.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, dict(ema.module.named_parameters())[n])]
    assert moved, 'the averaged trained weights lag behind the online ones'

    options = dict(max_length = 24, text_temperature = 0., modality_steps = 2, force_modality_at_start = (1, (2, 2)), seed = 0)
    samples, expected_samples = ema.sample(**options), reference.eval().sample(**options)
    for a, b in zip(samples, expected_samples, strict = True):
        assert torch.equal(a[1], b[1]) if isinstance(a, tuple) else torch.equal(a, b)

    # a saved EMA is a whole model: every weight, the shared ones included
    ema.module.save_pretrained(tmp_path / 'ema')
    loaded = Transfusion.from_pretrained(tmp_path / 'ema').state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_unfreezing_a_shared_weight_is_refused_by_the_next_update():
    model = frozen_model()
    ema = model.create_ema()
    ema.update()
    model.transformer.blocks[0].attn.to_qkv.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match = r'EMA: transformer.blocks.0.attn.to_qkv.weight was frozen when the EMA was made, so '
                                             r'the EMA shares it rather than averaging it, but it trains now'):
        ema.update()


def test_a_checkpoint_holds_the_frozen_weights_once_and_resumes_exactly(tmp_path):
    """Issue 25, item 18: the weights the EMA shares with the model (a frozen LM) were saved in
    each checkpoint twice, under the model and the EMA. Now once: a resumed run, started from
    other weights, frozen ones included, still continues the uninterrupted one exactly."""
    import torch.distributed.checkpoint as dcp
    from transfusion_pytorch.training import Every, TrainConfig, Trainer
    from transfusion_pytorch.training.checkpoint import list_checkpoints
    from conftest import random_sample
    from test_training_data import ListDataset

    class Interrupt(Exception):
        pass

    def stop(trainer, step):
        raise Interrupt(step)

    def train(out_dir, model_seed = 0, callbacks = ()):
        torch.manual_seed(0)
        rng = random.Random(0)
        data = ListDataset([random_sample(rng) for _ in range(24)])
        torch.manual_seed(model_seed)
        model = tiny_model(transformer = FROZEN_LM)
        config = TrainConfig(out_dir = str(out_dir), max_steps = 6, max_tokens = 60, lr = 1e-3, checkpoint_every = 3, log_every = 1,
                             progress = False, ema_beta = 0.5)
        trainer = Trainer(model, data, config, callbacks = list(callbacks))
        return trainer, {entry['step']: entry['loss'] for entry in trainer.train()}

    full, full_losses = train(tmp_path / 'full')
    with pytest.raises(Interrupt):
        train(tmp_path / 'run', callbacks = [Every(5, stop)])
    checkpoint = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1]
    saved = dcp.FileSystemReader(checkpoint / 'state').read_metadata().state_dict_metadata

    shared = full.ema.shared
    assert len(shared) > 10 and 'transformer.blocks.0.attn.to_qkv.weight' in shared
    assert all(f'model.{name}' in saved and f'ema.module.{name}' not in saved for name in shared)
    trained = [name for name, p in full.model.named_parameters() if p.requires_grad]
    assert trained and all(f'ema.module.{name}' in saved for name in trained)
    # the EMA's part of the checkpoint is as large as the trained weights (and its update count), not the whole model
    ema_bytes = sum(math.prod(entry.size) * entry.properties.dtype.itemsize for key, entry in saved.items() if key.startswith('ema.'))
    trained_bytes = sum(p.numel() * p.element_size() for name, p in full.model.named_parameters() if p.requires_grad)
    assert ema_bytes == trained_bytes + full.ema.num_updates.element_size()

    resumed, resumed_losses = train(tmp_path / 'run', model_seed = 123)
    assert sorted(resumed_losses) == [4, 5, 6] and all(resumed_losses[step] == full_losses[step] for step in (4, 5, 6))
    for module, expected in ((resumed.model, full.model), (resumed.ema, full.ema)):
        state, want = module.state_dict(), expected.state_dict()
        assert state.keys() == want.keys() and all(torch.equal(state[name], want[name]) for name in want)
    ema_params, online = dict(resumed.ema.module.named_parameters()), dict(resumed.model.named_parameters())
    assert all(ema_params[name] is online[name] for name in shared)         # still shared, not copied by loading
