"""Every Python code block of the README and of each docs page runs as written: a page's blocks
in order, in one namespace of their own, from a temporary folder of their own (blocks may write
runs/ and data/). So each page is self-contained: its first block sets up what it needs."""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
BLOCKS = {page: re.findall(r'```python\n(.*?)```', page.read_text(), flags = re.DOTALL) for page in PAGES}
CASES = [(page, index) for page in PAGES for index in range(len(BLOCKS[page]))]


def test_pages_have_python_blocks():
    assert len(BLOCKS[ROOT / 'README.md']) >= 3
    assert {'usage.md', 'generation.md', 'training.md', 'own-data.md', 'language-models.md'} <= \
        {page.name for page in PAGES if BLOCKS[page]}


@pytest.fixture(scope = 'module')
def sessions(tmp_path_factory):
    """Per page, its namespace and its folder, made when its first block runs."""
    made = {}

    def session(page):
        if page not in made:
            made[page] = ({}, tmp_path_factory.mktemp(page.stem))
        return made[page]

    return session


@pytest.mark.parametrize('page, index', CASES, ids = [f'{page.relative_to(ROOT)}:{index}' for page, index in CASES])
def test_block_runs(page, index, sessions):
    namespace, folder = sessions(page)
    previous = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(BLOCKS[page][index], f'{page.relative_to(ROOT)} python block {index}', 'exec'), namespace)
    finally:
        os.chdir(previous)
