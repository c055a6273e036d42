"""Tiny random Hugging Face causal LMs, written to a folder with `save_pretrained` (nothing is
downloaded). Between them they cover grouped-query attention, head_dim != hidden / heads, tied
and untied heads, q / k / v biases, q / k norms, Llama 3 rotary scaling and sharded files."""

import random
from pathlib import Path

import torch

VOCAB = 96
HIDDEN = 64
COMMON = dict(vocab_size = VOCAB, hidden_size = HIDDEN, intermediate_size = 80, num_hidden_layers = 2, num_attention_heads = 4)

LLAMA3_ROPE = dict(rope_type = 'llama3', rope_theta = 500000., factor = 8., low_freq_factor = 1., high_freq_factor = 4.,
                   original_max_position_embeddings = 16)

FAMILIES = {
    # GQA, a head wider than hidden / heads, an untied head, Llama 3 scaling (effective past 16 positions), 3 shards
    'llama': ('LlamaConfig', 'LlamaForCausalLM', dict(num_key_value_heads = 2, head_dim = 24, rms_norm_eps = 1e-5,
                                                      rope_parameters = LLAMA3_ROPE, max_position_embeddings = 64,
                                                      tie_word_embeddings = False)),
    # q / k / v biases, a tied head, GQA
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', dict(num_key_value_heads = 2, tie_word_embeddings = True,
                                                      rope_parameters = dict(rope_type = 'default', rope_theta = 1e6))),
    # q / k norms, one key / value head, a head wider than hidden / heads, biases on q, k, v and o
    'qwen3': ('Qwen3Config', 'Qwen3ForCausalLM', dict(num_key_value_heads = 1, head_dim = 32, attention_bias = True,
                                                      tie_word_embeddings = False)),
}


def build_language_model(family: str, folder: Path, seed: int = 0):
    """A random model of the family, its norms and biases perturbed away from their starting
    values (so a misplaced one shows), saved to `folder`. Returns the model, in eval mode."""
    import transformers

    config_name, model_name, options = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**COMMON, **options)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    shard = dict(max_shard_size = '60KB') if family == 'llama' else {}
    model.save_pretrained(folder, **shard)
    return model


def frozen_language_model_run(folder, rng: random.Random) -> tuple[list, object]:
    """24 samples (text only, mixed, a modality alone) and a model started from the LM in
    `folder`, frozen, with separate modality weights: the distributed test's run."""
    from transfusion_pytorch import Transfusion

    def sample() -> list:
        text = lambda: torch.randint(0, VOCAB, (rng.randint(1, 6),))
        kind = rng.choice(['text', 'mixed', 'modality'])
        if kind == 'text':
            return [text()]
        modality = (0, torch.randn(rng.randint(1, 4), 6))
        return [text(), modality, text()] if kind == 'mixed' else [modality]

    model = Transfusion.from_language_model(folder, freeze_language_model = True, separate_modality_weights = True,
                                            dim_latent = 6, modality_default_shape = (3,))
    return [sample() for _ in range(24)], model
