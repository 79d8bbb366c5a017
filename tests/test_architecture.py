"""The architecture is checked, not just described: the import contracts in pyproject.toml hold
on the package and break on a seeded violation, the module graph has no cycle, and no function
runs over 80 lines (docs/architecture.md)."""

import ast
import graphlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PYPROJECT = ROOT / "pyproject.toml"
CONTRACTS = {
    c["id"]: c["name"]
    for c in tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
}
MAX_FUNCTION_LINES = 80


def lint_imports(src: Path, config: Path) -> tuple[int, str]:
    """Run `lint-imports` on the package under `src` with `config`; its exit code and output,
    whitespace normalised (the report wraps long contract names)."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
            "--no-cache",
            "--no-logo",
            str(config),
        ],
        cwd=config.parent,
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, " ".join((done.stdout + done.stderr).split())


def test_contracts_hold_on_the_package():
    code, out = lint_imports(SRC, PYPROJECT)
    assert code == 0, out
    for name in CONTRACTS.values():
        assert f"{name} KEPT" in out


# One seeded violation per contract: (file under src/stablemdm, line appended, contracts broken).
# An upward import also closes a cycle (training imports the layers below it), and models.hf
# reaches estimators.masking through estimators.losses, hence the larger sets; training.config
# reaches file I/O through models.hf.
VIOLATIONS = {
    "math imports training": (
        "estimators/masking.py",
        "from ..training import config",
        {"layers", "math-pure", "math-no-io", "acyclic", "models-data-no-training"},
    ),
    "study imports its independent sibling": (
        "study/stats.py",
        "from ..variance import decompose",
        {"layers"},
    ),
    "math reads a file": ("variance/decompose.py", "import json", {"math-no-io"}),
    "a model imports training": (
        "models/toy.py",
        "from ..training import config",
        {"layers", "acyclic", "models-data-no-training"},
    ),
    "a cycle inside a subpackage": ("estimators/rates.py", "from . import objective", {"acyclic"}),
    "an import of the top-level package": (
        "data/tokenizer.py",
        "from stablemdm import Objective",
        {"no-root-imports"},
    ),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_contracts_fail_on_a_seeded_violation(tmp_path, case):
    relpath, line, broken = VIOLATIONS[case]
    shutil.copytree(SRC / "stablemdm", tmp_path / "src" / "stablemdm")
    config = tmp_path / "pyproject.toml"
    shutil.copy(PYPROJECT, config)
    target = tmp_path / "src" / "stablemdm" / relpath
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")

    code, out = lint_imports(tmp_path / "src", config)

    assert code != 0, out
    for contract, name in CONTRACTS.items():
        assert f"{name} {'BROKEN' if contract in broken else 'KEPT'}" in out, (contract, out)


def test_no_import_cycle_between_any_two_modules():
    """Whole-graph check, parents and children included (the acyclic_siblings contract compares
    siblings only); graphlib raises CycleError on the first cycle."""
    sys.path.insert(0, str(SRC))
    try:
        graph = grimp.build_graph("stablemdm", cache_dir=None)
    finally:
        sys.path.remove(str(SRC))
    assert any(m.startswith("stablemdm.estimators.") for m in graph.modules)
    order = graphlib.TopologicalSorter(
        {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    )
    order.prepare()


def function_lengths(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines from `def` to its last line) of every function in a file."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = f"{prefix}{getattr(child, 'name', None) or ''}"
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((name, child.end_lineno - child.lineno + 1))
            visit(
                child, f"{name}." if isinstance(child, ast.ClassDef | ast.FunctionDef) else prefix
            )

    visit(ast.parse(path.read_text()), "")
    return found


def test_function_lengths_are_measured(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "def f():\n    x = 1\n\n    return x\n\n\nclass C:\n    def g(self):\n        pass\n"
    )
    assert function_lengths(path) == [("f", 4), ("C.g", 2)]


def test_no_function_over_80_lines():
    files = sorted((SRC / "stablemdm").rglob("*.py"))
    assert len(files) > 50
    long = [
        f"{path.relative_to(SRC)}:{name} ({n} lines)"
        for path in files
        for name, n in function_lengths(path)
        if n > MAX_FUNCTION_LINES
    ]
    assert not long, long
