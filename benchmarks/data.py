"""The streaming loader against what training consumes, and its memory as the data grows.

    python benchmarks/data.py [--work DIR] [--num 4000] [--threads 1]

1. Data: the walk-through set (`transfusion shapes`, 24 x 24 pictures), prepared as in the
   walk-through of docs/own-data.md (patch codec, patch 4, UTF-8 bytes), and a 10x larger prepared folder
   made of the same shards copied ten times (so the two differ only in size).
2. Checking the shards: one epoch read with no workers, each shard's SHA-256 checked as the
   loader opens it (as in training: once per process, in the process that reads it); the MB
   hashed, at how many MB/s, and the share of the epoch's reading time spent hashing. Later
   epochs, and the figures below (whose processes have checked the shards already), hash nothing.
   Loader throughput, samples/s and tokens/s, with 0, 1 and 2 DataLoader workers, batches of
   the walk-through configuration's budget (1,024 tokens), no model.
3. What training consumes: steps of the walk-through model (dim 128, depth 4, 4 heads of 32) fed by
   the loader with its default 2 workers, each step timed in two parts, waiting for the batch
   and the forward, backward and AdamW step; the share of time spent waiting.
4. Peak resident memory while reading one epoch of the 1x and of the 10x folder, each in a
   fresh process, sampled every 10 ms: the training-side process, and with 2 workers the
   largest worker; beside the process's memory before reading (torch and the package).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WALKTHROUGH_MODEL = dict(dim = 128, depth = 4, heads = 4, dim_head = 32)
MAX_TOKENS = 1024


def prepared_folders(work: Path, num: int) -> tuple[Path, Path]:
    from transfusion_pytorch.data.prepare import PrepareConfig, prepare
    from transfusion_pytorch.data.shapes import write_set
    from transfusion_pytorch.data.shards import MANIFEST, shard_name, write_json
    one, ten = work / 'prepared', work / 'prepared_x10'
    if not (one / MANIFEST).exists():
        write_set(work / 'shapes', num, 24)
        prepare(PrepareConfig(source = str(work / 'shapes'), out = str(one), image_size = 24, patch = 4, progress = False))
    if not (ten / MANIFEST).exists():
        shutil.rmtree(ten, ignore_errors = True)
        ten.mkdir(parents = True)
        manifest = json.loads((one / MANIFEST).read_text())
        entries = []
        for copy in range(10):
            for entry in manifest['shards']:
                name = shard_name(len(entries))
                shutil.copyfile(one / entry['file'], ten / name)
                entries.append(dict(entry, file = name))
        manifest['shards'] = entries
        manifest['counts'] = {k: v * 10 for k, v in manifest['counts'].items()}
        write_json(ten / MANIFEST, manifest)
    return one, ten


def model():
    import torch
    from transfusion_pytorch import Transfusion
    torch.manual_seed(0)
    return Transfusion(num_text_tokens = 256, dim_latent = 48, modality_default_shape = (6, 6), transformer = WALKTHROUGH_MODEL)


def make_loader(folder: Path, workers: int, tokens_of):
    from transfusion_pytorch.data.loader import LoaderConfig, StreamingLoader
    return StreamingLoader([folder], tokens_of, LoaderConfig(max_tokens = MAX_TOKENS, num_workers = workers))


def loader_throughput(folder: Path, tokens_of, workers: int, seconds: float = 5.) -> dict:
    loader = make_loader(folder, workers, tokens_of)
    loader.next_batch()                                     # workers started
    samples = tokens = batches = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = loader.next_batch()
        samples, tokens, batches = samples + len(batch.samples), tokens + batch.num_tokens, batches + 1
    elapsed = time.perf_counter() - start
    loader.close()
    return dict(workers = workers, samples_per_s = samples / elapsed, tokens_per_s = tokens / elapsed, batches = batches)


def verification_cost(folder: Path, tokens_of) -> dict:
    """One epoch read with no workers by a process that has checked no shard yet: the time spent
    hashing shards (each as the loader opens it) against the epoch's."""
    from transfusion_pytorch.data import shards
    real, spent = shards.sha256, dict(seconds = 0., bytes = 0)

    def timed(path):
        start = time.perf_counter()
        digest = real(path)
        spent['seconds'] += time.perf_counter() - start
        spent['bytes'] += path.stat().st_size
        return digest

    samples = shards.Prepared(folder).num_samples
    shards.VERIFIED.clear()
    shards.sha256 = timed
    try:
        loader = make_loader(folder, 0, tokens_of)
        seen, start = 0, time.perf_counter()
        while seen < samples:
            seen += len(loader.next_batch().samples)
        epoch = time.perf_counter() - start
    finally:
        shards.sha256 = real
    return dict(mb = spent['bytes'] / 1e6, mb_per_s = spent['bytes'] / 1e6 / spent['seconds'], hash_s = spent['seconds'], epoch_s = epoch,
                share = spent['seconds'] / epoch)


def training_steps(folder: Path, steps: int, workers: int = 2) -> dict:
    import torch
    from transfusion_pytorch.data.loader import modality_tokens_of
    net = model()
    optimizer = torch.optim.AdamW(net.parameters(), lr = 1e-3)
    loader = make_loader(folder, workers, modality_tokens_of(net))
    waits, computes, tokens = [], [], 0
    for step in range(steps + 3):
        start = time.perf_counter()
        batch = loader.next_batch()
        got = time.perf_counter()
        loss = net(batch.samples)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none = True)
        done = time.perf_counter()
        if step >= 3:                                       # after warm-up
            waits.append(got - start)
            computes.append(done - got)
            tokens += batch.num_tokens
    loader.close()
    total = sum(waits) + sum(computes)
    return dict(workers = workers, steps = steps, step_s = total / steps, tokens_per_s = tokens / total,
                wait_share = sum(waits) / total, longest_wait_s = max(waits))


def rss_mb(pid: int | str = 'self') -> float:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    return 0.


def children(pid: int) -> list[int]:
    found = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def memory_of_an_epoch(folder: Path, workers: int) -> dict:
    """Run in a fresh process: reads one epoch's worth of batches while a thread samples the
    resident memory of this process and of its workers every 10 ms; in MB."""
    import threading
    from transfusion_pytorch.data.shards import Prepared
    samples = Prepared(folder).num_samples
    loader = make_loader(folder, workers, lambda shape: 1 + 3 + 1 + shape[0] * shape[1] + 1)
    before, peaks, done = rss_mb(), dict(main = 0., workers = 0.), threading.Event()

    def sample():
        while not done.is_set():
            peaks['main'] = max(peaks['main'], rss_mb())
            peaks['workers'] = max([peaks['workers']] + [rss_mb(pid) for pid in children(os.getpid())])
            time.sleep(0.01)
    thread = threading.Thread(target = sample, daemon = True)
    thread.start()
    seen = 0
    while seen < samples:
        seen += len(loader.next_batch().samples)
    done.set()
    thread.join()
    loader.close()
    return dict(samples = samples, workers = workers, rss_before_mb = before, peak_rss_mb = peaks['main'],
                worker_peak_rss_mb = peaks['workers'] if workers else None)


def in_fresh_process(folder: Path, workers: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS = str(threads))
    out = subprocess.run([sys.executable, __file__, '--memory-of', str(folder), '--workers', str(workers)], env = env,
                         capture_output = True, text = True, check = True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description = __doc__, formatter_class = argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--work', default = '/tmp/transfusion-data-bench', help = 'where the data sets go (kept between runs)')
    parser.add_argument('--num', type = int, default = 4000, help = 'pictures in the 1x set')
    parser.add_argument('--steps', type = int, default = 40, help = 'training steps timed')
    parser.add_argument('--threads', type = int, default = 1, help = 'torch threads of the training process (the walk-through run uses 1)')
    parser.add_argument('--memory-of', help = argparse.SUPPRESS)
    parser.add_argument('--workers', type = int, default = 0, help = argparse.SUPPRESS)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(memory_of_an_epoch(Path(args.memory_of), args.workers)))
        return

    one, ten = prepared_folders(Path(args.work), args.num)
    from transfusion_pytorch.data.loader import modality_tokens_of
    tokens_of = modality_tokens_of(model())
    load = os.getloadavg()[0]
    print(f'torch {torch.__version__}, {args.threads} thread(s) for training, {os.cpu_count()} CPUs, load average {load:.2f} before')
    print(f'data: {args.num} pictures 24 x 24, patch 4 (36 latent tokens of 48), captions as UTF-8 bytes; batches of {MAX_TOKENS} tokens\n')

    v = verification_cost(one, tokens_of)
    print(f"checking the shards' SHA-256: {v['mb']:.1f} MB hashed at {v['mb_per_s']:,.0f} MB/s, {v['hash_s'] * 1000:.0f} ms, "
          f"{v['share']:.1%} of reading the first epoch with no workers ({v['epoch_s']:.2f} s); later epochs hash nothing\n")

    print('| loader workers | samples/s | tokens/s |\n|---|---|---|')
    for workers in (0, 1, 2):
        r = loader_throughput(one, tokens_of, workers)
        print(f"| {workers} | {r['samples_per_s']:,.0f} | {r['tokens_per_s']:,.0f} |")

    r = training_steps(one, args.steps)
    print(f"\ntraining, walk-through model, 2 workers: {r['step_s'] * 1000:.0f} ms per step, consuming {r['tokens_per_s']:,.0f} tokens/s; "
          f"waiting for data {r['wait_share']:.2%} of the time (longest wait {r['longest_wait_s'] * 1000:.1f} ms)")

    print('\n| data | samples | workers | RSS before reading | peak RSS while reading | peak RSS of a worker |\n|---|---|---|---|---|---|')
    for name, folder in (('1x', one), ('10x', ten)):
        for workers in (0, 2):
            m = in_fresh_process(folder, workers, args.threads)
            worker = f"{m['worker_peak_rss_mb']:.0f} MB" if m['worker_peak_rss_mb'] else '-'
            print(f"| {name} | {m['samples']:,} | {workers} | {m['rss_before_mb']:.0f} MB | {m['peak_rss_mb']:.0f} MB | {worker} |")
    print(f'\nload average {os.getloadavg()[0]:.2f} after')


if __name__ == '__main__':
    main()
