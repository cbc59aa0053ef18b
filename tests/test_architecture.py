"""The layers, one direction (README "Architecture"): import-linter's layers contract in pyproject.toml holds, the
file-level import graph (every import, inside functions and TYPE_CHECKING blocks too) has no cycle, and no module
imports fedsim's own code inside a function (a lazy import only for an optional heavy dependency, with a comment)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from fedsim import CHECKOUT_FOLDERS

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def layout() -> dict[str, Path]:
    """Import name of each source folder as installed -> the folder: `fedsim.CHECKOUT_FOLDERS` maps root folders
    into fedsim's namespace, unless import-linter's contract still lists them as root packages of their own."""
    roots = PYPROJECT["tool"]["importlinter"]["root_packages"]
    out = {"fedsim": ROOT / "fedsim", "hydra_plugins": ROOT / "hydra_plugins"}
    for name, folder in CHECKOUT_FOLDERS.items():
        short = name.rpartition(".")[2]
        out[short if short in roots else name] = ROOT / folder
    return out


def source_files() -> dict[str, Path]:
    """Module name -> file, for every Python file fedsim installs."""
    files = {}
    for name, folder in layout().items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([name, *parts])] = path
    return files


def _imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, ast.stmt, bool]]:
    """(imported module of ours, the statement, whether it sits inside a function) for every import of `path`."""
    tree = ast.parse(path.read_text())
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                out.append((target, node, id(node) in inside))
    return out


def test_the_file_level_import_graph_has_no_cycle():
    files = source_files()
    graph = {m: {t for t, _, _ in _imports(m, p, files)} for m, p in files.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_fedsim_code_inside_a_function():
    files = source_files()
    inner = [f"{files[m].relative_to(ROOT)}:{node.lineno} imports {t}"
             for m in files for t, node, inside in _imports(m, files[m], files) if inside]
    assert not inner, "imports inside functions (the layer is wrong, or the import belongs at the top):\n" + \
        "\n".join(inner)


def test_a_lazy_import_of_a_dependency_says_why():
    unexplained = []
    for module, path in source_files().items():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    line, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                    if "#" not in line and not above.startswith("#"):
                        unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {line.strip()}")
    assert not unexplained, "lazy imports without a reason:\n" + "\n".join(unexplained)


def test_the_layers_contract_holds(tmp_path):
    """import-linter on the layout the wheel installs (the checkout keeps some packages at its root)."""
    for name, folder in layout().items():
        target = tmp_path.joinpath(*name.split("."))
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.yaml", "*.md"),
                        dirs_exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    script = ("import sys; from importlinter.cli import lint_imports; "
              f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
