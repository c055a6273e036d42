"""The same seed gives bit-identical numbers in separate processes, and no code path is chosen
by timing (the reference package picks an attention path by racing them, so its losses differ
from process to process)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import transfusion_pytorch

# run in a fresh interpreter: a loss with its gradients, sampling (text and modalities) and
# modality-only generation, each printed as exact bytes
CHILD = r'''
import hashlib, json, torch
from transfusion_pytorch import Transfusion

def digest(t):
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()

def digest_sample(sample):
    return [[e[0], digest(e[1])] if isinstance(e, tuple) else digest(e) for e in sample]

torch.set_num_threads(1)
torch.manual_seed(0)
model = Transfusion(num_text_tokens = 32, dim_latent = (6, 4), modality_default_shape = ((2,), (2, 2)),
                    transformer = dict(dim = 32, depth = 2, dim_head = 8, heads = 2, dropout = 0.1))
g = torch.Generator().manual_seed(1)
batch = [
    [torch.randint(0, 32, (5,), generator = g), (0, torch.randn(3, 6, generator = g)), torch.randint(0, 32, (2,), generator = g)],
    [(1, torch.randn(2, 3, 4, generator = g)), torch.randint(0, 32, (4,), generator = g)],
]
torch.manual_seed(2)
loss, breakdown = model(batch, return_breakdown = True)
loss.backward()
out = dict(
    loss = loss.item().hex(),
    per_sample_text = [x.hex() for x in breakdown.per_sample_text.tolist()],
    grads = digest(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])),
)
samples = model.sample(batch_size = 2, max_length = 28, seed = 3, modality_steps = 2, force_modality_at_start = 1)
out['samples'] = [digest_sample(s) for s in samples]
gen = torch.Generator().manual_seed(4)
out['sample_generator'] = digest_sample(model.sample([torch.tensor([1, 2])], max_length = 20, generator = gen, modality_steps = 2))
out['modality_only'] = digest(model.generate_modality_only(batch_size = 2, modality_type = 0, modality_steps = 2, seed = 5))
print(json.dumps(out))
'''


def start_child(hash_seed: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONHASHSEED = hash_seed, OMP_NUM_THREADS = '1')
    return subprocess.Popen([sys.executable, '-c', CHILD], stdout = subprocess.PIPE, stderr = subprocess.PIPE, text = True, env = env)


def result_of(child: subprocess.Popen) -> dict:
    stdout, stderr = child.communicate(timeout = 300)
    assert child.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


def test_same_seed_is_bit_identical_in_two_processes():
    children = [start_child('1'), start_child('2')]     # string hashing differs between them; numbers must not
    first, second = map(result_of, children)
    assert first == second
    assert len(first['samples']) == 2 and first['samples'][0] != first['samples'][1]   # rows get their own seeds


def test_no_code_path_is_chosen_by_timing():
    """Nothing that computes losses or samples reads a clock; the trainer reads one for its
    tokens/s metric only (and the demos and jobs time their runs for their logs)."""
    clock = re.compile(r'perf_counter|time\.time\(|time\.monotonic|timeit|torch\.utils\.benchmark|max-autotune|cudnn\.benchmark')
    root = Path(transfusion_pytorch.__file__).parent
    found = {
        str(path.relative_to(root)): line.strip()
        for path in root.rglob('*.py') if path.parent.name not in ('demos', 'jobs')
        for line in path.read_text().splitlines() if clock.search(line)
    }
    assert set(found) <= {'training/trainer.py'}, found
    trainer = (root / 'training' / 'trainer.py').read_text()
    assert all('window_start' in line or 'elapsed' in line for line in trainer.splitlines() if 'perf_counter' in line)
