"""Text-only training of a model started from a language model, against `transformers`'
`LlamaForCausalLM` itself, side by side on the same weights and the same rows (issue 14).

    python benchmarks/language_model.py                     # both cases, fp32, 2 threads
    python benchmarks/language_model.py --device cuda --bf16 --rows 32 --max-len 2048

A random Llama-shaped model (by default dim 512, 8 layers, 8 query / 2 key-value heads of 64,
SwiGLU 1,376, vocabulary 32,000) is written once with `save_pretrained`; each side loads it
in a fresh process (so that each peak memory belongs to one side):

- transformers: `LlamaForCausalLM.from_pretrained` (SDPA attention), the rows right-padded
  to the longest with an attention mask and -100 labels at the padding, as HF training does;
- ours: `Transfusion.from_language_model`, the rows as text-only samples: packed end to end
  without padding, each attended over its own length.

Cases: 'unequal' rows (lengths uniform in [max_len / 8, max_len]), where packing saves the
padding, and 'equal' rows of max_len, where there is nothing to save (ours then takes the
Int[b n] form, and the next-token loss over the LM's vocabulary before training is printed
for both, as a check that they are the same model). A step is forward +
backward + AdamW step; tokens/s counts the rows' own tokens (ours also reads the SOS / EOS
that frame each list-form sample, uncounted) over the median of --steps steps after --warmup.
Each side runs `--rounds` times in alternating order, and its step time is the median over
the rounds: on a shared machine whose speed drifts, neither side gets the quiet moments.
Memory is the peak RSS of the process on CPU, the peak allocated memory on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = 'RESULT '


def make_rows(case: str, args) -> list:
    import torch
    generator = torch.Generator().manual_seed(args.seed)
    if case == 'equal':
        lengths = [args.max_len] * args.rows
    else:
        lengths = torch.randint(args.max_len // 8, args.max_len + 1, (args.rows,), generator = generator).tolist()
    return [torch.randint(0, args.vocab, (length,), generator = generator) for length in lengths]


def hf_step_inputs(rows: list, device) -> dict:
    import torch
    longest = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), longest, dtype = torch.long)
    mask = torch.zeros(len(rows), longest, dtype = torch.long)
    for index, row in enumerate(rows):
        ids[index, :len(row)], mask[index, :len(row)] = row, 1
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids = ids.to(device), attention_mask = mask.to(device), labels = labels.to(device))


def peak_memory_mb(device) -> float:
    import torch
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = make_rows(args.case, args)
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    if args.side == 'hf':
        from transformers import LlamaForCausalLM
        model = LlamaForCausalLM.from_pretrained(args.folder, dtype = dtype, attn_implementation = 'sdpa').to(device).train()
        inputs = hf_step_inputs(rows, device)
        compute_loss = lambda: model(**inputs).loss
    else:
        sys.path.insert(0, str(ROOT))
        from transfusion_pytorch import Transfusion
        model = Transfusion.from_language_model(args.folder, dim_latent = 8, dtype = dtype).to(device).train()
        batch = torch.stack(rows).to(device) if args.case == 'equal' else [[row] for row in rows]
        compute_loss = lambda: model(batch)

    check = None
    if args.case == 'equal':        # the next-token loss over the LM's vocabulary, as transformers computes it
        with torch.no_grad():
            logits = (model(**inputs).logits if args.side == 'hf' else model(batch, return_loss = False)[..., :args.vocab])
            check = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), torch.stack(rows)[:, 1:].flatten().to(device)).item()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr = 1e-5)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    times, losses = [], []
    for _ in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        loss = compute_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none = True)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())

    return dict(side = args.side, case = args.case, tokens = sum(len(row) for row in rows),
                padded_tokens = len(rows) * max(len(row) for row in rows),
                step_s = statistics.median(times[args.warmup:]), all_step_s = times, losses = losses, check_loss = check,
                peak_memory_mb = peak_memory_mb(device), params = sum(p.numel() for p in model.parameters()))


def write_language_model(folder: Path, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size = args.vocab, hidden_size = args.dim, intermediate_size = args.dim_ff, num_hidden_layers = args.depth,
                         num_attention_heads = args.heads, num_key_value_heads = args.kv_heads, head_dim = args.dim // args.heads,
                         max_position_embeddings = args.max_len, rms_norm_eps = 1e-5, tie_word_embeddings = False)
    LlamaForCausalLM(config).save_pretrained(folder)


def run_worker(side: str, case: str, folder: Path, args) -> dict:
    options = [f'--{key.replace("_", "-")}={value}' for key, value in vars(args).items()
               if key not in ('side', 'case', 'folder', 'worker', 'bf16', 'cases', 'rounds')]
    command = [sys.executable, str(Path(__file__).resolve()), '--worker', '--side', side, '--case', case, '--folder', str(folder),
               *options, *(['--bf16'] if args.bf16 else [])]
    done = subprocess.run(command, capture_output = True, text = True, env = dict(os.environ, OMP_NUM_THREADS = str(args.threads)))
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f'{side} / {case} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}')
    return json.loads(lines[-1][len(RESULT):])


def rounds(case: str, folder, args) -> tuple[dict, dict]:
    """Each side `--rounds` times, in alternating order (ours, transformers, transformers, ours,
    ...), so that a machine whose speed drifts favours neither; per side the median step time
    over its rounds and the largest peak memory."""
    runs = dict(ours = [], hf = [])
    for index in range(args.rounds):
        for side in (('ours', 'hf') if index % 2 == 0 else ('hf', 'ours')):
            runs[side].append(run_worker(side, case, folder, args))
    merged = []
    for side in ('ours', 'hf'):
        result = dict(runs[side][0])
        result['step_s'] = statistics.median(run['step_s'] for run in runs[side])
        result['round_step_s'] = [run['step_s'] for run in runs[side]]
        result['peak_memory_mb'] = max(run['peak_memory_mb'] for run in runs[side])
        merged.append(result)
    return tuple(merged)


def driver(args):
    import torch
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        write_language_model(Path(folder), args)
        results = {case: rounds(case, folder, args) for case in args.cases}
    load_after = os.getloadavg()

    print(f'\ntorch {torch.__version__}, {args.device}, {"bf16" if args.bf16 else "fp32"}, {args.threads} threads; Llama dim {args.dim}, '
          f'{args.depth} layers, {args.heads} / {args.kv_heads} heads, SwiGLU {args.dim_ff}, vocab {args.vocab:,}; {args.rows} rows, '
          f'median of {args.steps} steps after {args.warmup}, median of {args.rounds} alternating rounds; load average {load[0]:.2f} before, {load_after[0]:.2f} after\n')
    memory = 'peak allocated' if args.device.startswith('cuda') else 'peak RSS'
    print(f'| case | tokens (padded for transformers) | ours tok/s | transformers tok/s | speed-up | ours {memory} | transformers {memory} | loss before training, ours / transformers |')
    print('|---|---|---|---|---|---|---|---|')
    for case, (ours, theirs) in results.items():
        rate, their_rate = ours['tokens'] / ours['step_s'], theirs['tokens'] / theirs['step_s']
        check = f'{ours["check_loss"]:.5f} / {theirs["check_loss"]:.5f}' if case == 'equal' else '-'
        print(f'| {case} | {ours["tokens"]:,} ({theirs["padded_tokens"]:,}) | {rate:,.0f} | {their_rate:,.0f} | {rate / their_rate:.2f}x | '
              f'{ours["peak_memory_mb"]:,.0f} MB | {theirs["peak_memory_mb"]:,.0f} MB | {check} |')


def main():
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cases', nargs = '+', default = ['unequal', 'equal'], choices = ['unequal', 'equal'])
    parser.add_argument('--dim', type = int, default = 512)
    parser.add_argument('--depth', type = int, default = 8)
    parser.add_argument('--heads', type = int, default = 8)
    parser.add_argument('--kv-heads', type = int, default = 2)
    parser.add_argument('--dim-ff', type = int, default = 1376)
    parser.add_argument('--vocab', type = int, default = 32000)
    parser.add_argument('--rows', type = int, default = 8)
    parser.add_argument('--max-len', type = int, default = 256)
    parser.add_argument('--steps', type = int, default = 3)
    parser.add_argument('--warmup', type = int, default = 1)
    parser.add_argument('--rounds', type = int, default = 2, help = 'processes per side, in alternating order')
    parser.add_argument('--threads', type = int, default = 2)
    parser.add_argument('--seed', type = int, default = 0)
    parser.add_argument('--device', default = 'cpu')
    parser.add_argument('--bf16', action = 'store_true', help = 'weights in bfloat16 on both sides')
    parser.add_argument('--worker', action = 'store_true', help = argparse.SUPPRESS)
    parser.add_argument('--side', choices = ['ours', 'hf'], help = argparse.SUPPRESS)
    parser.add_argument('--case', help = argparse.SUPPRESS)
    parser.add_argument('--folder', help = argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(RESULT + json.dumps(worker(args)))
    else:
        driver(args)


if __name__ == '__main__':
    main()
