"""The package's imports run one way: no module imports, directly or through others, a module
that imports it back, and nothing imports the command line's top (`cli.py`). Read from the
source with `ast`, so an import inside a function (a lazy one) counts as much as one at the top."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'transfusion_pytorch'


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__)."""
    found = {}
    for path in PACKAGE.rglob('*.py'):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
        is_package = parts[-1] == '__init__'
        found['.'.join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imported(name: str, is_package: bool, node, known) -> list[str]:
    """The package's modules an import statement of module `name` loads (a name imported from a
    package counts as its submodule when there is one, else as the package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if node.level:
        base = name.split('.') if is_package else name.split('.')[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = '.'.join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ''
    targets = [f'{target}.{alias.name}' if f'{target}.{alias.name}' in known else target for alias in node.names]
    return [t for t in targets if t in known and t != name]


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, (path, is_package) in known.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(imported(name, is_package, node, known))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle or a knot of them."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert 'transfusion_pytorch.jobs.run_commands' in graph['transfusion_pytorch.cli']
    assert 'transfusion_pytorch.cli_options' in graph['transfusion_pytorch.jobs.sampling'] or \
        'transfusion_pytorch.cli_options' in graph['transfusion_pytorch.jobs.run_commands']


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_a_cycle_is_found():
    """The check itself: the cycle this test was written against (cli -> jobs.sampling -> cli) is caught."""
    graph = {'cli': {'jobs.sampling'}, 'jobs.sampling': {'cli', 'data'}, 'data': set()}
    assert cycles(graph) == [['cli', 'jobs.sampling']]


def test_nothing_imports_the_command_line():
    graph = import_graph()
    assert [name for name, targets in graph.items() if 'transfusion_pytorch.cli' in targets] == []
