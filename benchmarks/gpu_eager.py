"""Eager training side by side, each side in its own process (so that each peak memory is its
own), bf16 autocast and fused AdamW on both sides:

- multimodal: this package against the public `transfusion-pytorch` 0.20.0, the same
  `Transfusion(...)` call (width 1024, depth 12, a 50k vocabulary, 16 x 16 latents of 16
  channels; flex attention on CUDA) on the same 32 caption-then-image samples; tokens/s counts
  the tokens given (text ids + latent tokens);
- text: `transformers`' `LlamaForCausalLM` (SDPA) of the Llama-3.2-1B shape, random weights
  written with `save_pretrained` (nothing is downloaded), against this package's
  `Transfusion.from_language_model` of the same folder, on the same 4 x 2048 rows; the losses
  are compared step by step.

Where 0.20.0 comes from (`public_python`): `--public-python`, an interpreter that imports it
(its own virtualenv); or `--public-wheels DIR` (or $TRANSFUSION_PUBLIC_WHEELS), wheels of
0.20.0 and of its pure-Python requirements, installed with `pip --no-index --target` into
`.venv-public-site` and put on the worker's PYTHONPATH, so that it runs on this interpreter's
torch (a GPU machine has no network, and a new virtualenv would need its own multi-GB torch);
`--download-public-wheels DIR` writes such a folder where PyPI can be reached. Without either, a
run takes the wheels in `.venv-public-wheels` when there are some; else a real run tries to
download them from PyPI, and a dry run skips 0.20.0, with the reason printed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import ROOT, peak_memory_gib, reset_peak_memory, run_worker, sync, worker_main   # noqa: E402

PUBLIC = ('transfusion-pytorch', '0.20.0')
PUBLIC_SITE = ROOT / '.venv-public-site'           # 0.20.0 installed from wheels (ignored by git, as is the next)
PUBLIC_WHEELS = ROOT / '.venv-public-wheels'       # the wheels, where a run looks for them by default
WHEELS_ENV = 'TRANSFUSION_PUBLIC_WHEELS'

MULTIMODAL = dict(
    full = dict(vocab = 50257, dim = 1024, depth = 12, samples = 32, grid = 16, dim_latent = 16, steps = 5, warmup = 2),
    tiny = dict(vocab = 1000, dim = 64, depth = 2, samples = 4, grid = 4, dim_latent = 8, steps = 2, warmup = 1),
)
TEXT = dict(      # Llama 3.2 1B (tied embeddings, as released)
    full = dict(vocab = 128256, dim = 2048, depth = 16, heads = 32, kv_heads = 8, dim_ff = 8192, rows = 4, length = 2048, steps = 5, warmup = 2),
    tiny = dict(vocab = 512, dim = 64, depth = 2, heads = 4, kv_heads = 2, dim_ff = 128, rows = 2, length = 64, steps = 2, warmup = 1),
)


# the workers (the multimodal one also runs under 0.20.0: torch and the standard library only)

def transfusion_kwargs(config: dict, cuda: bool) -> dict:
    """The one `Transfusion(...)` call of both packages (each with its own defaults beyond it)."""
    return dict(num_text_tokens = config['vocab'], dim_latent = config['dim_latent'], modality_default_shape = (config['grid'],) * 2,
                transformer = dict(dim = config['dim'], depth = config['depth'], use_flex_attn = cuda))


def multimodal_batch(config: dict, device) -> list:
    """Captions of 8 to 64 ids, each followed by a grid x grid image of latents, from seed 0."""
    generator = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(config['samples']):
        length = int(torch.randint(8, 65, (), generator = generator))
        caption = torch.randint(0, config['vocab'], (length,), generator = generator)
        image = torch.randn(config['grid'], config['grid'], config['dim_latent'], generator = generator)
        batch.append([caption.to(device), (0, image.to(device))])
    return batch


def fingerprint(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def train_steps(compute_loss, parameters, device, steps: int, warmup: int) -> dict:
    """Eager steps under bf16 autocast with fused AdamW: the median step time and every loss."""
    optimizer = torch.optim.AdamW(parameters, lr = 1e-4, fused = True)
    reset_peak_memory(device)
    times, losses = [], []
    for _ in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype = torch.bfloat16):
            loss = compute_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none = True)
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return dict(step_s = statistics.median(times[warmup:]), all_step_s = times, losses = losses, peak_gib = peak_memory_gib(device))


def package_of(module) -> dict:
    path = Path(module.__file__).parent
    version = 'this repository' if path == ROOT / 'transfusion_pytorch' else importlib.metadata.version('transfusion-pytorch')
    return dict(package = str(path), version = version)


def multimodal_worker(spec: dict) -> dict:
    import transfusion_pytorch
    from transfusion_pytorch import Transfusion
    device, config = torch.device(spec['device']), spec['config']
    batch = multimodal_batch(config, device)
    torch.manual_seed(0)
    model = Transfusion(**transfusion_kwargs(config, device.type == 'cuda')).to(device)    # built alike: on the CPU, then moved
    package = package_of(transfusion_pytorch)
    if spec['side'] == 'public' and package['version'] != PUBLIC[1]:
        raise RuntimeError(f'the public side imported transfusion-pytorch {package["version"]} from {package["package"]}, not {PUBLIC[1]}')
    result = train_steps(lambda: model(batch), model.parameters(), device, config['steps'], config['warmup'])
    text = sum(sample[0].numel() for sample in batch)
    latent = sum(sample[1][1][..., 0].numel() for sample in batch)
    return dict(result, **package, side = spec['side'], torch = torch.__version__, text_tokens = text,
                latent_tokens = latent, tokens = text + latent, tokens_per_s = (text + latent) / result['step_s'],
                params = sum(p.numel() for p in model.parameters()), fingerprint = fingerprint(t for s in batch for t in (s[0], s[1][1])))


def text_rows(config: dict, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config['vocab'], (config['rows'], config['length']), generator = generator).to(device)


def text_worker(spec: dict) -> dict:
    device, config = torch.device(spec['device']), spec['config']
    rows = text_rows(config, device)
    torch.manual_seed(0)
    if spec['side'] == 'transformers':
        import transformers
        model = transformers.LlamaForCausalLM.from_pretrained(spec['folder'], dtype = torch.float32, attn_implementation = 'sdpa').to(device)
        compute_loss, version = (lambda: model(input_ids = rows, labels = rows).loss), f'transformers {transformers.__version__}'
    else:
        from transfusion_pytorch import Transfusion
        with torch.device(device):
            model = Transfusion.from_language_model(spec['folder'], dim_latent = 8, transformer = dict(use_flex_attn = device.type == 'cuda'))
        compute_loss, version = (lambda: model(rows)), 'this repository'
    model.train()
    result = train_steps(compute_loss, [p for p in model.parameters() if p.requires_grad], device, config['steps'], config['warmup'])
    return dict(result, side = spec['side'], version = version, tokens = rows.numel(), tokens_per_s = rows.numel() / result['step_s'],
                params = sum(p.numel() for p in model.parameters()), fingerprint = fingerprint([rows]))


def write_llama(folder: Path, config: dict, device):
    """A Llama-shaped causal LM with random weights, saved in the Hugging Face layout (bf16, as released)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size = config['vocab'], hidden_size = config['dim'], intermediate_size = config['dim_ff'],
                     num_hidden_layers = config['depth'], num_attention_heads = config['heads'], num_key_value_heads = config['kv_heads'],
                     head_dim = config['dim'] // config['heads'], max_position_embeddings = 131072, rms_norm_eps = 1e-5,
                     rope_theta = 5e5, rope_parameters = dict(rope_type = 'default', rope_theta = 5e5),
                     tie_word_embeddings = True)
    with torch.device(device):
        model = LlamaForCausalLM(hf)
    model.to(torch.bfloat16).save_pretrained(folder)
    del model


# where 0.20.0 comes from

def pure_requirements(wheel: Path) -> list[str]:
    """The requirements of a wheel that apply here (markers evaluated, extras left out)."""
    import zipfile
    from email.parser import Parser
    from packaging.requirements import Requirement
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith('.dist-info/METADATA'))
        metadata = Parser().parsestr(archive.read(name).decode())
    wanted = []
    for line in metadata.get_all('Requires-Dist') or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({'extra': ''}):
            wanted.append(str(requirement).split(';')[0])
    return wanted


def download_public_wheels(folder: Path) -> list[str]:
    """Wheels of 0.20.0 and of everything it needs except torch, torch's own requirements and
    numpy / scipy (which a machine with torch has, built for it), into `folder`, with pip, one
    package at a time (`--no-deps`: nothing of torch's comes along)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    present = {'torch', 'numpy', 'scipy'} | {canonicalize_name(Requirement(r).name) for r in importlib.metadata.requires('torch') or []}
    folder.mkdir(parents = True, exist_ok = True)
    queue, seen, got = [f'{PUBLIC[0]}=={PUBLIC[1]}'], set(), []
    while queue:
        requirement = queue.pop(0)
        name = canonicalize_name(Requirement(requirement).name)
        if name in seen or name in present or name.startswith('nvidia-'):
            continue
        seen.add(name)
        before = set(folder.glob('*.whl'))
        subprocess.run([sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--only-binary=:all:', '-d', str(folder), requirement],
                       check = True)
        wheel = next(iter(set(folder.glob('*.whl')) - before), None) or next(
            w for w in folder.glob('*.whl') if canonicalize_name(w.name.split('-')[0]) == name)
        got.append(wheel.name)
        queue += pure_requirements(wheel)
    return got


def install_public_wheels(folder: Path) -> Path:
    """The wheels of `folder` (but torch and the CUDA libraries, which stay this interpreter's)
    installed into PUBLIC_SITE, without an index; returns PUBLIC_SITE."""
    wheels = [str(w) for w in sorted(folder.glob('*.whl')) if not w.name.startswith(('torch-', 'nvidia_', 'triton-', 'numpy-'))]
    if not any(Path(w).name.startswith('transfusion_pytorch-0.20.0-') for w in wheels):
        raise FileNotFoundError(f'{folder} holds no transfusion_pytorch-0.20.0 wheel')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-index', '--no-deps', '--no-compile', '--upgrade',
                    '--target', str(PUBLIC_SITE), *wheels], check = True, capture_output = True, text = True)
    return PUBLIC_SITE


def public_python(args) -> tuple[dict | None, str]:
    """(how to run a worker under 0.20.0: python and PYTHONPATH, where it came from), or (None, why not)."""
    if args.public_python:
        return dict(python = args.public_python, pythonpath = ''), f'--public-python {args.public_python}'
    wheels = args.public_wheels or os.environ.get(WHEELS_ENV) or (PUBLIC_WHEELS if any(PUBLIC_WHEELS.glob('transfusion_pytorch-0.20.0-*')) else None)
    try:
        if wheels:
            return dict(python = sys.executable, pythonpath = str(install_public_wheels(Path(wheels)))), f'wheels in {wheels}'
        if args.dry_run:
            return None, (f'skipped: 0.20.0 is not installed for this run (give --public-wheels DIR, ${WHEELS_ENV} or --public-python; '
                          f'`python benchmarks/gpu.py --download-public-wheels {PUBLIC_WHEELS.name}` writes the wheels where PyPI '
                          f'can be reached, and a run finds them there)')
        download_public_wheels(PUBLIC_WHEELS)
        return dict(python = sys.executable, pythonpath = str(install_public_wheels(PUBLIC_WHEELS))), 'PyPI'
    except (OSError, subprocess.SubprocessError, StopIteration) as error:
        detail = getattr(error, 'stderr', None) or error
        return None, f'skipped: 0.20.0 could not be installed ({str(detail).strip().splitlines()[-1][:300]})'


# the section

def side_by_side(device, dry_run: bool, args, folder: Path) -> dict:
    """Both comparisons; a side that cannot run is reported with its reason."""
    size = 'tiny' if dry_run else 'full'
    script = Path(__file__).resolve()
    spec = dict(device = device.type, config = MULTIMODAL[size])
    out = dict(multimodal = dict(config = MULTIMODAL[size]), text = dict(config = TEXT[size]))
    if device.type == 'cuda':
        torch.cuda.empty_cache()

    multimodal = out['multimodal']
    multimodal['ours'] = run_worker(script, dict(spec, kind = 'multimodal', side = 'ours'))
    public, multimodal['public_source'] = public_python(args)
    print(f'  multimodal, ours: {multimodal["ours"]["tokens_per_s"]:,.0f} tokens/s, peak {multimodal["ours"]["peak_gib"]:.1f} GiB; '
          f'0.20.0 from {multimodal["public_source"]}', flush = True)
    if public is not None:
        theirs = run_worker(script, dict(spec, kind = 'multimodal', side = 'public'), **public)
        if theirs['fingerprint'] != multimodal['ours']['fingerprint']:
            raise RuntimeError('the two packages trained on different batches')
        multimodal['public'] = theirs
        multimodal['speed_ratio'] = multimodal['ours']['tokens_per_s'] / theirs['tokens_per_s']
        multimodal['memory_ratio'] = multimodal['ours']['peak_gib'] / theirs['peak_gib']

    text = out['text']
    try:
        write_llama(folder / 'llama', TEXT[size], device)
    except ImportError as error:
        text['skipped'] = f'skipped: transformers is not installed ({error})'
        return out
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    spec = dict(device = device.type, config = TEXT[size], folder = str(folder / 'llama'), kind = 'text')
    for side in ('transformers', 'ours'):
        text[side] = run_worker(script, dict(spec, side = side))
    text['speed_ratio'] = text['ours']['tokens_per_s'] / text['transformers']['tokens_per_s']
    text['memory_ratio'] = text['ours']['peak_gib'] / text['transformers']['peak_gib']
    text['loss_relative_diff'] = [abs(a - b) / abs(b) for a, b in zip(text['ours']['losses'], text['transformers']['losses'])]
    from gpu_training import check          # not at the top: the workers of 0.20.0 import this module
    # ours also gives the structural ids (SOS, BOM, ...) a little probability: 2% of it in the dry run's 512-id vocabulary
    check(max(text['loss_relative_diff']) < 2e-2, f'text only: our loss = LlamaForCausalLM\'s at every step, to 2e-2 relative '
                                                   f'(largest {max(text["loss_relative_diff"]):.1e})')
    return out


def run(spec: dict) -> dict:
    return (multimodal_worker if spec['kind'] == 'multimodal' else text_worker)(spec)


if __name__ == '__main__':
    worker_main(run)
