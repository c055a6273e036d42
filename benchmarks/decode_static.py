"""Decoding speed of the dynamic path against the static one (`static_decode.py`): greedy
`generate_text_only` and `generate_modality_only` both ways, with how far their outputs agree
(issue 21: at least 10x the dynamic path's decoding steps/s on CUDA). A benchmark, not a code
path of the library: the package reads no clock (tests/test_reproducibility.py)."""

from __future__ import annotations

import time

import torch

from transfusion_pytorch.generation import generate_modality_only, generate_text_only


def decode_benchmark(model, batch_size: int = 8, prompt_length: int = 16, new_tokens: int = 240, repeats: int = 3,
                     modality_batch: int = 4, modality_steps: int = 16) -> dict:
    """Greedy `generate_text_only` and `generate_modality_only` (of type 0's default shape) on the
    dynamic path and on the static one (CUDA graphs on CUDA, eager static shapes elsewhere):
    decoding steps/s, modalities/s, and how far the two agree. For `benchmarks/gpu.py` (issue 21:
    at least 10x the dynamic decoding steps/s on CUDA); on CPU it checks the static path runs
    and agrees, and its figures mean little. Call it inside the autocast region to measure."""
    device = model.device
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.vocab.num_text_tokens, (batch_size, prompt_length), generator = generator).to(device)

    def timed(fn) -> tuple[float, object]:
        result = fn()                   # warm-up: graphs captured, kernels chosen
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            result = fn()
        sync(device)
        return (time.perf_counter() - start) / repeats, result

    seq_len = prompt_length + new_tokens
    results, tokens, latents = {}, {}, {}
    for name, static in (('dynamic', False), ('static', True)):
        text = lambda: generate_text_only(model, prompt, seq_len, temperature = 0., static_decode = static)
        seconds, tokens[name] = timed(text)
        results[f'{name}_steps_per_s'] = new_tokens / seconds
        results[f'{name}_tokens_per_s'] = new_tokens * batch_size / seconds
        if model.vocab.num_modality_types > 0 and model.config.modality_default_shape[0] is not None:
            modality = lambda: generate_modality_only(model, batch_size = modality_batch, modality_steps = modality_steps, seed = 0,
                                                      return_latents = True, static_decode = static)
            seconds, latents[name] = timed(modality)
            results[f'{name}_modalities_per_s'] = modality_batch / seconds

    same = (tokens['dynamic'] == tokens['static']).cumprod(dim = 1).sum(dim = 1)
    results['speedup'] = results['static_steps_per_s'] / results['dynamic_steps_per_s']
    results['tokens_equal'] = bool(same.min() == new_tokens)
    results['steps_equal_before_first_difference'] = int(same.min())
    if len(latents) > 0:
        results['max_latent_difference'] = float((latents['dynamic'] - latents['static']).abs().max())
    results['captured'] = device.type == 'cuda'
    return results


def sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
