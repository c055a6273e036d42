"""The README and the docs pages link only to files and headings that exist, and the README
stays short enough to read (issue 23: at most 400 lines, the rest in docs/)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md')), *[p for p in [ROOT / 'examples' / 'README.md'] if p.exists()]]

FENCE = re.compile(r'^(```|~~~).*?^\1', flags = re.DOTALL | re.MULTILINE)
LINK = re.compile(r'(?<!!)\[[^\]]*\]\(([^)\s]+)\)')                 # [text](target), not images
IMAGE = re.compile(r'!\[[^\]]*\]\(([^)\s]+)\)')
EXTERNAL = ('http://', 'https://', 'mailto:')


def prose(text):
    """The page without its fenced code blocks, where brackets are code, not links."""
    return FENCE.sub('', text)


def slug(heading):
    """GitHub's anchor for a heading: lowercase, punctuation other than hyphens and spaces
    dropped (markup such as backticks included), spaces to hyphens."""
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip().lower())
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def anchors(page):
    """Every heading's anchor on a page; a repeated one gets -1, -2, ... as on GitHub."""
    seen, result = {}, set()
    for line in prose(page.read_text()).splitlines():
        match = re.match(r'#{1,6} (.+)', line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f'{base}-{count}')
    return result


def links(page):
    """(target, anchor) of every relative link and image on a page."""
    text = prose(page.read_text())
    for target in LINK.findall(text) + IMAGE.findall(text):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition('#')
        yield path, anchor


def test_slug_follows_github():
    assert slug('Differences from the public package') == 'differences-from-the-public-package'
    assert slug('What `prepare` writes') == 'what-prepare-writes'
    assert slug('`model.sample(prompt, ...)`') == 'modelsampleprompt-'
    assert slug('Walk-through: coloured shapes') == 'walk-through-coloured-shapes'


def test_repeated_headings_are_numbered(tmp_path):
    page = tmp_path / 'page.md'
    page.write_text('# A\n\n## Notes\n\n```\n# Notes\n```\n\n## Notes\n\n## Notes\n')
    assert anchors(page) == {'a', 'notes', 'notes-1', 'notes-2'}


def test_pages_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {'README.md', 'docs/usage.md', 'docs/errors.md', 'docs/design.md'} <= names


@pytest.mark.parametrize('page', PAGES, ids = lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for path, anchor in links(page):
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f'{path}: no such file')
        elif anchor and target.suffix == '.md' and anchor not in anchors(target):
            broken.append(f'{path}#{anchor}: no such heading in {target.relative_to(ROOT)}')
    assert not broken, f'{page.relative_to(ROOT)}: ' + '; '.join(broken)


def test_readme_at_most_400_lines():
    lines = len((ROOT / 'README.md').read_text().splitlines())
    assert lines <= 400, f'README.md has {lines} lines; move a subject to docs/'
