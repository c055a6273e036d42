"""Every Python code block of the README runs as written, in order, in one namespace."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / 'README.md'
BLOCKS = re.findall(r'```python\n(.*?)```', README.read_text(), flags = re.DOTALL)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.fixture(scope = 'module')
def namespace(tmp_path_factory):
    """One namespace for all blocks, run from a temporary folder (blocks may write runs/)."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp('readme'))
    yield {}
    os.chdir(previous)


@pytest.mark.parametrize('index', range(len(BLOCKS)))
def test_readme_block_runs(index, namespace):
    exec(compile(BLOCKS[index], f'README.md python block {index}', 'exec'), namespace)
