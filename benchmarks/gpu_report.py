"""The end of `benchmarks/gpu.py`'s run: the summary printed to stdout, issue 21's targets, and
the figures measured before issue 21's changes, for comparison."""

from __future__ import annotations

import math

import gpu_profile
from gpu_common import gib

# issue 21: measured on one NVIDIA H200 with torch 2.11.0+cu130, on the code before any of its changes
PREVIOUS = dict(
    machine = 'NVIDIA H200, torch 2.11.0+cu130, before the changes of issue 21',
    table = {'image_text / none': dict(tokens_per_s = 118681, mfu = 0.218, peak_gib = 22.4),
             'image_text / full': dict(tokens_per_s = 100300, mfu = 0.184, peak_gib = 11.0),
             'image_text / selective': dict(tokens_per_s = 115064, mfu = 0.211, peak_gib = 20.7),
             'llama / none': dict(tokens_per_s = 58209, mfu = 0.461, peak_gib = 54.6),
             'llama / full': dict(tokens_per_s = 45791, mfu = 0.363, peak_gib = 38.3),
             'llama / selective': dict(tokens_per_s = 50413, mfu = 0.399, peak_gib = 52.7)},
    profile_image_text_ms_per_step = {'matmul': 44.2, 'attention (forward + backward)': 30.0, 'index / scatter': 12.1,
                                      'aten elementwise & reductions': 21.4, 'inductor-fused elementwise': 12.5, 'other': 8.6,
                                      'kernel time': 117.5, 'wall': 135.},
    eager_multimodal = dict(ours_tokens_per_s = 51220, ours_peak_gib = 13.2, public_tokens_per_s = 28689, public_peak_gib = 32.8,
                            speed_ratio = 1.79, memory_ratio = 0.40),
    eager_text = dict(transformers_tokens_per_s = 44180, ours_tokens_per_s = 41774, speed_ratio = 0.95),
    walkthrough_steps_per_s = 12, decoding_steps_per_s = 54, decoding_new_tokens_per_s = 433, images_per_s = 27.7,
)


def row_of(report: dict, name: str, mode: str) -> dict | None:
    return next((r for r in report.get('table', []) if r['model'] == name and r['mode'] == mode), None)


def targets(report: dict) -> list[dict]:
    """Issue 21's targets, each with the figure measured now (None where not measured) and before."""
    def get(*keys):
        value = report
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    image_text, llama = row_of(report, 'image_text', 'none'), row_of(report, 'llama', 'none')
    rows = [
        ('image-text MFU, no checkpointing', image_text and image_text['mfu'], 0.40, PREVIOUS['table']['image_text / none']['mfu'], '{:.1%}'),
        ('Llama-shape MFU, no checkpointing', llama and llama['mfu'], 0.46, PREVIOUS['table']['llama / none']['mfu'], '{:.1%}'),
        ('walk-through steps/s', get('walkthrough', 'steps_per_s'), 60, PREVIOUS['walkthrough_steps_per_s'], '{:,.1f}'),
        ('decoding steps/s, batch 8', get('decoding', 'steps_per_s'), 540, PREVIOUS['decoding_steps_per_s'], '{:,.1f}'),
        ('eager text-only speed / transformers', get('eager', 'text', 'speed_ratio'), 1.0, PREVIOUS['eager_text']['speed_ratio'], '{:.2f}x'),
        ('eager multimodal speed / 0.20.0', get('eager', 'multimodal', 'speed_ratio'), 2.0, PREVIOUS['eager_multimodal']['speed_ratio'], '{:.2f}x'),
    ]
    return [dict(name = name, value = value, target = target, previous = previous, met = None if value is None else value >= target,
                 format = fmt) for name, value, target, previous, fmt in rows]


def print_table(report: dict):
    machine = report['machine']
    print(f'\nsummary: {machine["device"]}, torch {machine["torch"]}, {machine["date"]}, commit {machine["commit"]}'
          + (f', bf16 matmul peak {machine["bf16_matmul_tflops"]:.1f} TFLOP/s' if 'bf16_matmul_tflops' in machine else '')
          + f', {report["total_s"]:.0f} s in all' + (' (DRY RUN: CPU, tiny sizes; no figure here means anything for a GPU)' if machine['dry_run'] else ''))
    if report.get('table'):
        print('\n| model | checkpointing | params | tokens/s | MFU | peak memory | step | first step | before (issue 21): tokens/s, MFU |')
        print('|---|---|---|---|---|---|---|---|---|')
        for r in report['table']:
            before = PREVIOUS['table'].get(f'{r["model"]} / {r["mode"]}')
            print(f'| {r["model"]} | {r["mode"]} | {r["params"] / 1e6:,.1f}M | {r["tokens_per_s"]:,.0f} | {100 * r["mfu"]:.1f}% | '
                  f'{gib(r["peak_gib"])} | {r["step_s"] * 1e3:.0f} ms | {r["first_s"]:.0f} s | '
                  f'{before["tokens_per_s"]:,}, {100 * before["mfu"]:.1f}% |')
    for name, profile in report.get('profile', {}).items():
        gpu_profile.print_profile(name, profile)


def print_eager(eager: dict):
    multimodal, text = eager['multimodal'], eager['text']
    print('\neager, bf16 autocast, fused AdamW, each side in its own process:')
    ours = multimodal['ours']
    print(f'  multimodal ({multimodal["config"]["samples"]} captions + {multimodal["config"]["grid"]}x{multimodal["config"]["grid"]} images, '
          f'dim {multimodal["config"]["dim"]}, depth {multimodal["config"]["depth"]}, {ours["params"] / 1e6:,.1f}M parameters): '
          f'ours {ours["tokens_per_s"]:,.0f} tokens/s, peak {gib(ours["peak_gib"])}')
    if 'public' in multimodal:
        theirs = multimodal['public']
        print(f'    0.20.0 ({multimodal["public_source"]}): {theirs["tokens_per_s"]:,.0f} tokens/s, peak {gib(theirs["peak_gib"])}; '
              f'ours {multimodal["speed_ratio"]:.2f}x the speed at {multimodal["memory_ratio"]:.2f}x the memory')
    else:
        print(f'    0.20.0: {multimodal["public_source"]}')
    if 'skipped' in text:
        print(f'  text only: {text["skipped"]}')
        return
    hf, ours = text['transformers'], text['ours']
    print(f'  text only ({text["config"]["rows"]} x {text["config"]["length"]} tokens, {hf["params"] / 1e6:,.1f}M parameters): '
          f'LlamaForCausalLM (SDPA) {hf["tokens_per_s"]:,.0f} tokens/s, peak {gib(hf["peak_gib"])}; ours {ours["tokens_per_s"]:,.0f} tokens/s, '
          f'peak {gib(ours["peak_gib"])}: {text["speed_ratio"]:.2f}x the speed at {text["memory_ratio"]:.2f}x the memory; losses '
          + ', '.join(f'{a:.4f} / {b:.4f}' for a, b in zip(ours['losses'], hf['losses'])))


def print_summary(report: dict):
    print_table(report)
    if 'eager' in report:
        print_eager(report['eager'])
    if 'walkthrough' in report:
        w = report['walkthrough']
        print(f'\nwalk-through (dim 128, depth 4, 1,024-token batches, the README\'s train command, {w["steps"]} steps): '
              f'{w["steps_per_s"]:,.1f} steps/s ({w["ms_per_step"]:.1f} ms per step over the last {w["measured_steps"]}), '
              f'{w["tokens_per_s"]:,.0f} tokens/s')
    if 'decoding' in report:
        d = report['decoding']
        eager = d['eager'] if isinstance(d['eager'], str) else f'eager path {d["eager"]["steps_per_s"]:,.1f} steps/s, tokens equal in float32: {d["tokens_equal_eager"]}, under bf16 {d["bf16_tokens_agreeing"]:.1%} of them'
        print(f'decoding: {d["steps_per_s"]:,.1f} steps/s, {d["new_tokens_per_s"]:,.0f} new tokens/s; images: {d["images_per_s"]:,.1f} per s; {eager}')
    print('\nissue 21 targets (now / before):')
    for t in report['targets']:
        now = '-' if t['value'] is None else t['format'].format(t['value'])
        met = 'not measured' if t['met'] is None else 'met' if t['met'] else 'NOT met'
        print(f'  [{met}] {t["name"]}: {now} (target {t["format"].format(t["target"])}; before {t["format"].format(t["previous"])})')
    budget = f' (budget {report["budget_s"]:.0f} s)' if math.isfinite(report['budget_s']) else ''
    print('\nelapsed: ' + ', '.join(f'{name} {seconds:.0f} s' for name, seconds in report['elapsed_s'].items() if ':' not in name)
          + f'; {report["total_s"]:.0f} s in all{budget}')
    for what in report['skipped']:
        print(f'skipped (over --budget): {what}')
    for name in report['errors']:
        print(f'ERROR in {name} (traceback above and in the JSON)')
    for message in report['failed_checks']:
        print(f'FAILED check: {message}')
