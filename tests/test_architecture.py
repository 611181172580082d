"""The library's shape (issue 17): small modules and functions, no import cycle, no private name across modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "leafkd"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(LIB.rglob("*.py")):
        parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


MODULES = _modules()


def test_modules_and_functions_are_small():
    big = []
    for name, tree in MODULES.items():
        lines = max((getattr(n, "end_lineno", 0) or 0) for n in ast.walk(tree))
        if lines > MAX_MODULE_LINES:
            big.append(f"module {name}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    big.append(f"function {name}.{node.name} (line {node.lineno}): {size} lines")
    assert not big, "\n".join(big)


def _imported(tree: ast.Module, name: str, top_level_only: bool) -> set[str]:
    """leafkd modules that `name` imports (at module level, or anywhere)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks do not run
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leafkd"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("leafkd"))
    return {m for m in out if m in MODULES and m != name}


def test_no_import_cycle_between_modules():
    graph = {name: _imported(tree, name, top_level_only=True) for name, tree in MODULES.items()}
    # A package's __init__ re-exports its modules: importing it means importing them.
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state[nxt] == 1 and not nxt.startswith(node) and not node.startswith(nxt):
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif state[nxt] == 0:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in graph:
        if state[name] == 0:
            visit(name)
    assert not cycles, "\n".join(cycles)


def test_no_private_name_is_imported_across_modules():
    bad = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leafkd"):
                bad += [f"{name} imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "\n".join(bad)


def test_public_api_is_exported():
    import leafkd

    for name in ("capture", "VectorStore", "build_student", "TrainConfig", "train", "build_index", "load_index",
                 "Retriever", "run_evaluation", "LeafkdError"):
        assert getattr(leafkd, name) is not None, name
        assert name in leafkd.__all__
    assert not hasattr(leafkd, "no_such_name")  # the lazy names are the listed ones, nothing else


def test_import_leafkd_stays_light():
    """`import leafkd` loads no torch: the public API is imported on first use."""
    code = "import leafkd, sys; assert 'torch' not in sys.modules, 'import leafkd loaded torch'; print(dir(leafkd))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "build_index" in r.stdout  # the lazy names are listed too


def test_cli_parser_and_usage_errors_stay_light():
    """Building `leafkd`'s parser (every subcommand's options) loads no torch or sentence-transformers, so `--help`
    and a usage error answer at once instead of after the ~10 s those imports take on a small machine."""
    code = ("import sys, leafkd.cli as cli\n"
            "cli.build_parser()\n"
            "heavy = [m for m in ('torch', 'sentence_transformers', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "leafkd", "capture", "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_lazy_subpackages_resolve_every_listed_name():
    """The lazily importing subpackages list their names in __all__; each one resolves to its defining module's."""
    import importlib

    for package in ("leafkd.student", "leafkd.training", "leafkd.evaluation", "leafkd.capture"):
        module = importlib.import_module(package)
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{package}.{name}"


def test_capture_is_the_function_whatever_was_imported_first():
    """The subpackage `leafkd.capture` shares its name with the public function: importing the subpackage's
    modules first (as the training code does) must not turn `from leafkd import capture` into the module."""
    code = ("import inspect, leafkd.capture.store, leafkd.capture.teacher\n"
            "from leafkd import capture\n"
            "assert inspect.isfunction(capture), type(capture)\n"
            "from leafkd.capture import VectorStore, capture_blackbox\n"
            "assert inspect.isclass(VectorStore) and inspect.isfunction(capture_blackbox)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
