"""Runs the public `transfusion-pytorch` repository's test file against this package.

    python benchmarks/run_public_tests.py PATH/TO/test_transfusion.py [--seeds 0 1 2] [--python PYTHON] [--public]

Nothing is fetched: the file is given by its path. It is copied into a temporary folder, never
into this repository, and its imports are pointed at this package's public names:
`from transfusion_pytorch.transfusion import (...)` becomes `from transfusion_pytorch import
Transfusion`, with two helpers of the test file's own (`exists`, and torch's `flex_attention`,
which the CUDA tests check for). `random_modality_length_to_time_fn`, a helper of the public
module that one test passes as `num_modalities_to_times_fn`, becomes a function of the test
file drawing the same uniform times.

Not counted as tests of public behaviour, and skipped with their reason:
- tests of the public package's private helpers (`stack_same_shape_tensors_with_inverse`,
  `filter_with_inverse`, `apply_fn_modality_type`, `modality_processing` internals);
- tests of `SelfMaskedRepTraining`, a training method of the public package that this one
  does not offer (see docs/differences.md);
- tests that need CUDA skip themselves where there is none.

Each test runs after `torch.manual_seed(seed)`, so that the counts can be reproduced: the
tests sample from untrained models, and what such a model writes decides some of them.
`--public` runs the file unchanged (for the baseline), e.g. with
`--python /path/to/venv-with-transfusion-pytorch-0.20.0/bin/python`, with the same skips and
seeds. The counts are printed per seed: passed / failed / skipped.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

NOT_PUBLIC_BEHAVIOUR = {
    'test_stack_similar_shape_fn': "a private helper of the public package's module",
    'test_filter_with_inverse': "a private helper of the public package's module",
    'test_apply_fn_modality_type': "a private helper of the public package's module",
    'test_processing_equivalence': "the public package's modality_processing internals",
    'test_processing_channel_first_equivalence': "the public package's modality_processing internals",
    'test_self_flow': 'SelfMaskedRepTraining, a training method not offered here',
    'test_e2e_self_flow_with_cfg': 'SelfMaskedRepTraining, a training method not offered here',
}

OUR_IMPORTS = '''from transfusion_pytorch import Transfusion

def exists(v):
    return v is not None

try:
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:
    flex_attention = None

stack_same_shape_tensors_with_inverse = filter_with_inverse = apply_fn_modality_type = SelfMaskedRepTraining = None
'''

TIME_FN = '''def random_modality_length_to_time_fn(num_modalities):
        return torch.rand(num_modalities.shape[0], int(num_modalities.amax()), device = num_modalities.device)'''

CONFTEST = '''import pytest
import torch

SEED = {seed}
NOT_PUBLIC_BEHAVIOUR = {skips!r}


@pytest.fixture(autouse = True)
def seed():
    torch.manual_seed(SEED)


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = NOT_PUBLIC_BEHAVIOUR.get(item.originalname)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason = 'not public behaviour: ' + reason))
'''


def rewrite_imports(source: str) -> str:
    """Points the test file's imports of the public package's module at this package."""
    block = re.search(r'from transfusion_pytorch\.transfusion import \((.*?)\)\n', source, flags = re.S)
    if block is None:
        raise SystemExit('the test file has no `from transfusion_pytorch.transfusion import (...)` block to rewrite')
    source = source[:block.start()] + OUR_IMPORTS + source[block.end():]
    return source.replace('from transfusion_pytorch.transfusion import random_modality_length_to_time_fn', TIME_FN)


def run(test_file: Path, seed: int, python: str, public: bool, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix = 'public-tests-') as folder:
        folder = Path(folder)
        source = test_file.read_text()
        (folder / 'test_public.py').write_text(source if public else rewrite_imports(source))
        (folder / 'conftest.py').write_text(CONFTEST.format(seed = seed, skips = NOT_PUBLIC_BEHAVIOUR))
        env = dict(os.environ)
        if not public:
            env['PYTHONPATH'] = os.pathsep.join([str(REPO), env.get('PYTHONPATH', '')]).rstrip(os.pathsep)
        command = [python, '-m', 'pytest', str(folder), '-q', '-rfs', '-p', 'no:cacheprovider', '--rootdir', str(folder), *extra]
        result = subprocess.run(command, cwd = folder, env = env, capture_output = True, text = True)
    output = result.stdout + result.stderr
    counts = {kind: int(number) for number, kind in re.findall(r'(\d+) (passed|failed|skipped|error)', output.splitlines()[-1] if output else '')}
    failed = re.findall(r'^FAILED \S+::(\S+)', output, flags = re.M)
    skipped = [(int(number), reason) for number, reason in re.findall(r'^SKIPPED \[(\d+)\] [^:]+(?::\d+)?: (.*)$', output, flags = re.M)]
    return dict(counts = counts, failed = failed, skipped = skipped, output = output, returncode = result.returncode)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description = __doc__.split('\n\n')[0])
    parser.add_argument('test_file', type = Path, help = "the public repository's tests/test_transfusion.py")
    parser.add_argument('--seeds', type = int, nargs = '+', default = [0], help = 'torch seeds to run the file under (default 0)')
    parser.add_argument('--python', default = sys.executable, help = 'the interpreter to run pytest with (default: this one)')
    parser.add_argument('--public', action = 'store_true', help = 'run the file unchanged, against whatever package --python imports')
    parser.add_argument('--verbose', action = 'store_true', help = "print pytest's output")
    args, extra = parser.parse_known_args(argv)

    target = 'the package --python imports (file unchanged)' if args.public else f'this package ({REPO})'
    print(f'{args.test_file} against {target}')
    for seed in args.seeds:
        result = run(args.test_file, seed, args.python, args.public, extra)
        if args.verbose:
            print(result['output'])
        counts = result['counts']
        print(f"seed {seed}: {counts.get('passed', 0)} passed, {counts.get('failed', 0) + counts.get('error', 0)} failed, "
              f"{counts.get('skipped', 0)} skipped")
        for name in result['failed']:
            print(f'  failed: {name}')
        reasons = {}
        for number, reason in result['skipped']:
            reason = "the file's own skip (flex attention without CUDA)" if reason == 'Skipped' else reason
            reasons[reason] = reasons.get(reason, 0) + number
        for reason, number in sorted(reasons.items()):
            print(f'  skipped ({number}): {reason}')


if __name__ == '__main__':
    main()
