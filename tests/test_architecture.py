"""The import rules of `.importlinter` hold: agent -> tools -> imgrag, the agent's core never imports a front-end,
and no package's modules import each other in a cycle (the same check `make lint` runs, here so CI runs it too)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_import_contracts_hold() -> None:
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if command is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run([command, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "broken" not in done.stdout.split("Contracts:")[-1].replace("0 broken", "")


def test_the_cycle_contract_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The acyclic contract of `.importlinter` catches a cycle hidden behind a lazy import (the kind that was in
    imgrag before): a package whose two modules import each other, one of them inside a function."""
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if command is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    pkg = tmp_path / "cyclic"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyclic.b import two\n\n\ndef one():\n    return two()\n")
    (pkg / "b.py").write_text("def two():\n    from cyclic.a import one  # only at call time\n\n    return one\n")
    contract = (REPO / ".importlinter").read_text()
    section = contract[contract.index("[importlinter:contract:acyclic]"):]
    (tmp_path / ".importlinter").write_text(
        "[importlinter]\nroot_packages =\n    cyclic\n\n"
        + section.split("ancestors =")[0] + "ancestors =\n    cyclic\n")
    done = subprocess.run([command, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode != 0 and "BROKEN" in done.stdout, done.stdout[-2000:] + done.stderr[-1000:]
    assert "cyclic" in done.stdout.split("Broken contracts")[-1]


def test_the_frontends_contract_lists_every_module_of_the_core() -> None:
    """A new module of agent/ is covered by "the core never imports a front-end" only once it is listed there."""
    contract = (REPO / ".importlinter").read_text()
    section = contract[contract.index("[importlinter:contract:frontends]"):]
    listed = section[section.index("source_modules"):section.index("forbidden_modules")].split()[2:]
    core = {f"agent.{p.stem if p.is_file() else p.name}" for p in (REPO / "agent").iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert core - {"agent.frontends"} == set(listed)


def test_no_private_name_crosses_a_module() -> None:
    """A name with a leading underscore is its module's own: no other module of the project imports it (a piece two
    modules share goes into a module of its own, under a public name)."""
    own = ("agent", "tools", "imgrag", "prompts")
    crossings = []
    for path in REPO.glob("**/*.py"):
        if ".venv" in path.parts or path.parts[len(REPO.parts)] not in (*own, "benchmarks", "tests"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in own:
                crossings += [f"{path.relative_to(REPO)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")]
    assert crossings == []
