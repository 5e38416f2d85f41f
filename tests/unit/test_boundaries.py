"""Import boundaries: the method package stays free of the engine, the web framework and
torch; the server and the trainer never import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("vllm", "fastapi", "torch")


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level module, line, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        top_level = node in tree.body
        found += [(n.split(".")[0], node.lineno, top_level) for n in names]
    return found


def _py_files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return files


def test_method_package_imports_no_engine_framework_or_torch():
    bad = []
    for path in _py_files("stepzip"):
        for module, line, top in _imports(path):
            # The default-model converter (stepzip/modelcache.py) needs torch and
            # transformers for its one-off conversion; it imports them inside that function.
            if module in ("vllm", "fastapi") or (module == "torch" and top):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "\n".join(bad)


def test_importing_the_method_package_loads_none_of_them():
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in _py_files("stepzip")]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + f"print(','.join(m for m in {HEAVY!r} + ('transformers',) if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "", f"importing stepzip.* loaded: {out}"


@pytest.mark.parametrize("package,forbidden", [("server", "trainer"), ("trainer", "server"),
                                               ("stepzip", "server"), ("stepzip", "trainer"),
                                               ("stepzip", "clients")])
def test_package_does_not_import(package, forbidden):
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in _py_files(package)
           for module, line, _ in _imports(p) if module == forbidden]
    assert not bad, f"{package} imports {forbidden} at " + ", ".join(bad)
