"""No import circles inside xlstm, checked two ways.

1. Statically: every ``import`` / ``from ... import`` in every module of the package, including
   the ones inside functions (a lazy import still closes a circle once its function runs), is
   an edge of the module graph; the graph must have no cycle. A cycle is reported as the chain
   of modules, e.g. ``xlstm.lstm -> xlstm.trace -> xlstm.interop -> xlstm.lstm``.
2. Dynamically: each module is imported first in a fresh interpreter (so no other xlstm module
   has been loaded before it), which catches a circle that only bites in one import order.
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import xlstm

PKG = pathlib.Path(xlstm.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = ["xlstm", *p.relative_to(PKG).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: pathlib.Path, known) -> set[str]:
    """The xlstm modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        deps.update(t for t in targets if t in known and t != name)
    return deps


def _find_cycle(graph: dict[str, set[str]]):
    """One cycle as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    # the check itself must be able to fail: the old lstm -> trace -> interop -> lstm circle
    graph = {"lstm": {"trace"}, "trace": {"interop"}, "interop": {"lstm"}, "errors": set()}
    assert _find_cycle(graph) == ["interop", "lstm", "trace", "interop"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_parser_sees_lazy_and_relative_imports():
    mods = _modules()
    lstm_deps = _imports("xlstm.lstm", mods["xlstm.lstm"], mods)
    assert "xlstm.trace" in lstm_deps          # imported inside LSTM.forward, not at the top
    assert {"xlstm.checks", "xlstm.errors", "xlstm.module"} <= lstm_deps
    assert "xlstm.backends.cupy_backend" in _imports("xlstm.backends", mods["xlstm.backends"], mods)


def test_module_graph_has_no_cycle():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_each_module_imports_first_in_a_fresh_interpreter():
    # one interpreter per module, all started at once (xlstm.__main__ is left out: importing
    # it runs the command line)
    names = sorted(n for n in _modules() if n != "xlstm.__main__")
    procs = {n: subprocess.Popen([sys.executable, "-c", f"import {n}"], cwd=PKG.parent, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in names}
    failed = {}
    for n, p in procs.items():
        _, err = p.communicate(timeout=300)
        if p.returncode != 0:
            failed[n] = err[-1500:]
    assert not failed, "modules that fail to import first in a fresh interpreter:\n" + \
        "\n".join(f"--- {n}\n{e}" for n, e in failed.items())


def test_sample_loads_a_run_without_the_training_module():
    mods = _modules()
    assert "xlstm.app.train" not in _imports("xlstm.app.sample", mods["xlstm.app.sample"], set(mods))
    assert "xlstm.app.train" not in _imports("xlstm", mods["xlstm"], set(mods))       # xlstm.load neither


def test_the_training_loop_does_not_know_the_device():
    # device reads and input checks go through backend.deferred(); nothing in train.py reads a
    # device array, synchronises, or touches the array module itself
    import re
    src = (PKG / "app" / "train.py").read_text()
    loop = [ast.get_source_segment(src, n) for n in ast.parse(src).body
            if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in ("Trainer", "train_step", "eval_sums")]
    assert len(loop) == 3
    found = re.findall(r"cupy|synchronize|to_numpy|\.xp\b|\bchecks\.", "\n".join(loop))
    assert not found, found
