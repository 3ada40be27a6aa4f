"""vidtok's house rules: every op declared once (its record in vidtok._backend), layers that import
only downward, and a repository root from which any Python can import vidtok and its integrations."""

import ast
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vidtok
from vidtok import _backend, info

ROOT = Path(__file__).resolve().parents[1]

# Where each installed package's files live in the source tree.
PACKAGE_DIRS = {"vidtok": ROOT / "vidtok", "vidtok.kernels": ROOT / "kernels", "vidtok.csrc": ROOT / "csrc"}

# The layers, bottom first. A module may import its own layer or those below; the backend layers
# (rank 2) do not import one another.
LAYERS = [
    ("vidtok._numerics", "vidtok._validation"),
    ("vidtok.reference",),
    ("vidtok.kernels", "vidtok.csrc", "vidtok.cpu"),
    ("vidtok._backend",),
    ("vidtok.masks", "vidtok.merge", "vidtok.motion", "vidtok.select", "vidtok.sparse"),
    ("vidtok",),  # the package, its tools and integrations: nn, io, viz, testing, info, aot, demo, ...
]


def _modules():
    """(module name, path) of every Python file vidtok installs."""
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "vidtok" and parts and parts[0] in ("kernels", "csrc"):
                continue
            yield ".".join([package, *parts]), path


def _rank(module: str) -> tuple[int, str]:
    """(layer, the layer entry the module falls under)."""
    if module == "vidtok._C":  # the compiled kernels behind vidtok.csrc's launchers
        return 2, "vidtok.csrc"
    for rank in range(len(LAYERS) - 1, -1, -1):
        for prefix in LAYERS[rank]:
            if prefix != "vidtok" and (module == prefix or module.startswith(prefix + ".")):
                return rank, prefix
    return len(LAYERS) - 1, "vidtok"


def _imports(module: str, path: Path):
    """The vidtok modules that ``module`` imports, anywhere in its file (inside functions too)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module]
            names = [f"{names[0]}.{a.name}" if _is_module(f"{names[0]}.{a.name}") else names[0] for a in node.names]
        else:
            continue
        yield from (n for n in names if n == "vidtok" or n.startswith("vidtok."))


@functools.lru_cache(maxsize=None)
def _module_names() -> frozenset:
    return frozenset(m for m, _ in _modules()) | {"vidtok._C"}  # the compiled module: a .so, not a .py


def _is_module(name: str) -> bool:
    return name in _module_names()


def test_layers_only_import_downward():
    wrong = []
    for module, path in _modules():
        rank, own = _rank(module)
        for imported in _imports(module, path):
            their_rank, theirs = _rank(imported)
            if their_rank > rank or (rank == 2 and their_rank == 2 and theirs != own):
                wrong.append(f"{module} (layer {rank}) imports {imported} (layer {their_rank})")
    assert not wrong, "\n".join(wrong)


def test_every_declared_backend_defines_every_entry():
    for op, record in _backend.OPS.items():
        for backend in record.backends:
            module = __import__(record.module(backend), fromlist=["_"])
            for entry in record.entries:
                assert callable(getattr(module, entry, None)), f"{record.module(backend)} lacks {entry} for vidtok.{op}"


def _declared():
    """{(layer package, hot path, function name)} that the records allow a backend module to define."""
    allowed = set()
    for op, record in _backend.OPS.items():
        for backend in record.backends:
            for name in (*record.entries, f"{op}_reasons"):
                allowed.add((_backend.LAYERS[backend], record.path, name))
    return allowed


def test_no_backend_is_declared_outside_its_record():
    """A backend module that defines an op's entry point (or its reasons) for an op whose record does
    not list that backend would be a kernel the dispatch never runs: the record is the one place."""
    entries = {name for record in _backend.OPS.values() for name in record.entries}
    reasons = {f"{op}_reasons" for op in _backend.OPS}
    allowed = _declared()
    stray = []
    for module, path in _modules():
        layer = next((pkg for pkg in _backend.LAYERS.values() if module.startswith(pkg + ".")), None)
        if layer is None:
            continue
        hot_path = module[len(layer) + 1:]
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and (node.name in entries or node.name in reasons):
                if (layer, hot_path, node.name) not in allowed:
                    stray.append(f"{module}.{node.name}")
    assert not stray, f"backend functions no record declares: {stray}"


def test_backends_are_named_nowhere_else():
    """No dispatch table keyed by backend names and no hand-written "has no ... kernel" outside the
    records: both come from vidtok._backend."""
    found = []
    for module, path in _modules():
        if module == "vidtok._backend":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                if len(keys & set(_backend.BACKENDS)) >= 2:
                    found.append(f"{module}:{node.lineno}: a dict keyed by backend names")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(r"has no \w+ (C\+\+ )?kernel", node.value):
                found.append(f"{module}:{node.lineno}: {node.value!r}")
            if isinstance(node, ast.Name) and node.id == "AUTO_ORDER":
                found.append(f"{module}:{node.lineno}: AUTO_ORDER")
    assert not found, "\n".join(found)


def test_readme_ops_table_is_the_records():
    """The README's table of ops and backends is exactly what ``vidtok.info.ops_table`` writes."""
    assert info.ops_table() in (ROOT / "README.md").read_text()


PUBLIC_MODULES = [
    "vidtok", "vidtok.merge", "vidtok.motion", "vidtok.select", "vidtok.sparse", "vidtok.masks", "vidtok.nn",
    "vidtok.io", "vidtok.viz", "vidtok.testing", "vidtok.info", "vidtok.demo", "vidtok.reference", "vidtok.cpu",
    "vidtok.csrc", "vidtok.kernels", "vidtok.integrations", "vidtok.integrations.policies",
    "vidtok.integrations.timm", "vidtok.integrations.transformers", "vidtok.curate",
]


@pytest.mark.parametrize("where", ["repository root", "home"])
def test_public_modules_import_from_the_repository_root(where):
    """Python started in the repository root has the root on sys.path, where kernels/ would shadow the
    PyPI package ``kernels`` that transformers imports: every public module and integration imports."""
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in PUBLIC_MODULES)
    code += "import kernels, sys\nprint(getattr(kernels, '__file__', None))\n"
    cwd = ROOT if where == "repository root" else os.path.expanduser("~")
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "No module named 'kernels'" in result.stderr:
        pytest.skip("Hugging Face's kernels package is not installed (everything else imported)")
    assert result.returncode == 0, result.stderr
    assert str(ROOT / "kernels") not in result.stdout, f"the repository's kernels/ was imported as `kernels`: {result.stdout}"
