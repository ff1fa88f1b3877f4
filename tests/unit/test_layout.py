"""The package's layout: no import circle, desmoe imports at module top, desmoe.data's one-directional
layers and its face that defines nothing, shared constants in desmoe.constants."""

import ast
import importlib
import pathlib

import desmoe
import desmoe.constants
import desmoe.data
import desmoe.metrics

PACKAGE = pathlib.Path(desmoe.__file__).parent
ROOT = pathlib.Path(desmoe.data.__file__).parent
LAZY_IMPORTS_ALLOWED = {"desmoe.cli", "desmoe"}
"""The command line imports each verb's stack when it runs; the package's face imports nothing heavy."""
LAYERS = ["builtin", "sources", "tokenizers", "packing", "sampler"]
"""Each module may import only those before it (sampler needs only packing's DomainData)."""
NEVER = ("desmoe.config", "desmoe.train", "desmoe.evaluation", "desmoe.metrics", "desmoe.engine", "desmoe.cli")


def _desmoe_imports(path):
    """(module imported, at module top) for every import of a desmoe module in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("desmoe"):
            out.append((node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.startswith("desmoe")]
    return out


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_graph() -> dict[str, set[str]]:
    """desmoe module -> the desmoe modules it imports (anywhere in the file), by file."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}

    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("desmoe"):
                targets |= {resolve(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.startswith("desmoe")}
        graph[name] = targets - {name, ""}
    return graph


def test_no_import_circle_in_the_package():
    graph, done, path = _package_graph(), set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        path.pop()
        done.add(m)

    assert len(graph) > 20
    for m in sorted(graph):
        visit(m)


def test_desmoe_imports_are_at_module_top():
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name in LAZY_IMPORTS_ALLOWED:
            continue
        inside = [m for m, at_top in _desmoe_imports(path) if not at_top]
        assert not inside, f"{name} imports {inside} inside a function"


def test_data_modules_import_only_earlier_layers_at_module_top():
    for i, name in enumerate(LAYERS):
        later = {f"desmoe.data.{m}" for m in LAYERS[i + 1:]} | {"desmoe.data"}
        for module, at_top in _desmoe_imports(ROOT / f"{name}.py"):
            assert at_top, f"{name}.py imports {module} inside a function"
            assert module not in later, f"{name}.py imports {module}, a later layer"
            assert not module.startswith(NEVER), f"{name}.py reaches up into {module}"


def test_metrics_and_data_share_constants_without_a_circle():
    assert all(not m.startswith("desmoe.data") for m, _ in _desmoe_imports(pathlib.Path(desmoe.metrics.__file__)))
    assert desmoe.data.IGNORE_INDEX is desmoe.constants.IGNORE_INDEX
    assert not hasattr(desmoe.metrics, "METRICS") and not hasattr(desmoe.metrics, "GENERATION_METRICS")
    assert desmoe.metrics.IGNORE_INDEX is desmoe.constants.IGNORE_INDEX


def test_package_face_defines_nothing_and_exports_every_name():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    for node in tree.body:
        kind = type(node).__name__
        if isinstance(node, ast.Assign):
            assert [t.id for t in node.targets] == ["__all__"]
        else:
            assert isinstance(node, (ast.ImportFrom, ast.Expr)), kind
    assert len(set(desmoe.data.__all__)) == len(desmoe.data.__all__)
    public = set()
    for name in LAYERS[1:]:
        module = importlib.import_module(f"desmoe.data.{name}")
        public |= {n for n, v in vars(module).items() if not n.startswith("_") and getattr(v, "__module__", None)
                   == module.__name__}
    assert public <= set(desmoe.data.__all__), public - set(desmoe.data.__all__)
    for name in desmoe.data.__all__:
        assert getattr(desmoe.data, name) is not None
