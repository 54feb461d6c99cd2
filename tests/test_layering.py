"""Package boundaries of ``memtron/`` (DESIGN §1), read from the AST of every module.

Levels, bottom to top; a package may import its own modules and any package of a LOWER level,
never one of its own level or above::

    config < storage < data < model < {parallel, slurm} < train < infer
           < {eval, export, plan} < bench < cli

* ``slurm.py`` is launch tooling beside ``parallel/launch.py``: it needs only the config, and
  the trainer requeues a pre-empted job through it.
* ``infer`` (a checkpoint loaded into one process, generation, the memory server) is the base
  of the user jobs: ``eval`` scores loaded models and ``export`` encodes references with one, so
  ``infer`` sits one level below them. ``eval``, ``export`` and ``plan`` are independent of
  each other. ``bench`` measures every job below it (its report reuses eval's tables), and the
  CLI is the only module above everything.
* The root ``memtron/__init__.py`` (the version) imports nothing and is importable from all.

Checked, naming file:line:
(a) no import of a package at the importer's level or above, function-level (lazy) imports
    included: a lazy import is still a dependency;
(b) no cycle between modules (lazy imports included: they hide a cycle, they do not remove it);
(c) no private name (``_x``) of one package imported into, or read as ``module._x`` by,
    another (a package is a top-level one, ``memtron.model`` with its subpackages: private
    helpers are shared inside it, never across a boundary of the table above).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "memtron"

LEVELS: list[tuple[str, ...]] = [
    ("config",),
    ("device",),  # the one device policy: torch and config only
    ("storage",),
    ("data",),
    ("model",),
    ("parallel", "slurm"),
    ("train",),
    ("infer",),
    ("eval", "export", "plan"),
    ("bench",),
    ("cli",),
]
LEVEL = {package: i for i, packages in enumerate(LEVELS) for package in packages}

def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _package(module: str) -> str | None:
    """The top-level package (layer unit) of a memtron module; None for the root package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


Import = tuple[int, str, "str | None", "str | None"]


def _imports(path: Path, module: str, modules: dict[str, Path]) -> list[Import]:
    """(line, imported module, imported name or None, local name bound to the module or None)
    of every memtron import in the file, at any depth; ``from pkg import sub`` names the
    submodule when there is one."""
    is_package = path.name == "__init__.py"
    out: list[Import] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None, a.asname) for a in node.names
                    if a.name.split(".")[0] == "memtron"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "memtron":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub, None, alias.asname or alias.name)
                           if sub in modules else (node.lineno, target, alias.name, None))
    return out


def _graph(root: Path = ROOT
           ) -> tuple[dict[str, Path], dict[str, dict[str, int]], list[str]]:
    """Modules, module -> {imported module: first line}, level violations."""
    modules = _modules(root)
    edges: dict[str, dict[str, int]] = defaultdict(dict)
    violations: list[str] = []
    for module, path in modules.items():
        rel = path.relative_to(root.parent)
        mine = _package(module)
        for line, target, name, _ in _imports(path, module, modules):
            if target in modules and target != module:
                edges[module].setdefault(target, line)
            theirs = _package(target)
            if theirs is None or theirs == mine:
                continue
            if mine is None:
                violations.append(f"{rel}:{line}: the root package imports {target}")
                continue
            missing = [p for p in (mine, theirs) if p not in LEVEL]
            if missing:
                violations.append(f"{rel}:{line}: package(s) {missing} have no level in "
                                  "tests/test_layering.py LEVELS")
            elif LEVEL[theirs] >= LEVEL[mine]:
                what = "its own level" if LEVEL[theirs] == LEVEL[mine] else "a higher level"
                violations.append(f"{rel}:{line}: {mine} imports {target}"
                                  f"{'.' + name if name else ''} ({theirs}: {what})")
    return modules, edges, violations


def test_imports_only_go_down():
    _, _, violations = _graph()
    assert not violations, "upward or sideways imports:\n" + "\n".join(violations)


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    modules, edges, _ = _graph()
    report = []
    for component in _cycles(edges):
        members = set(component)
        report.append(" <-> ".join(component) + ":\n" + "\n".join(
            f"    {modules[a].relative_to(ROOT.parent)}:{line}: imports {b}"
            for a in component for b, line in sorted(edges[a].items()) if b in members))
    assert not report, "import cycles:\n" + "\n".join(report)


def test_cycle_finder_finds_a_cycle():
    """The check above is not vacuous: a planted two-module loop and a self-contained chain."""
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [
        ["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def _private_uses(root: Path = ROOT) -> list[str]:
    """file:line of every private name of one package imported or read by another."""
    modules = _modules(root)
    violations = []
    for module, path in modules.items():
        rel = path.relative_to(root.parent)
        mine = _package(module)
        module_aliases: dict[str, str] = {}  # local name -> the memtron module it binds
        for line, target, name, bound in _imports(path, module, modules):
            if bound is not None:
                module_aliases[bound] = target
            private = name if name is not None else target.rsplit(".", 1)[-1]
            if private.startswith("_") and not private.startswith("__") \
                    and _package(target) != mine:
                violations.append(f"{rel}:{line}: imports private {target}"
                                  f"{'.' + name if name else ''}")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and node.value.id in module_aliases
                    and _package(module_aliases[node.value.id]) != mine):
                violations.append(f"{rel}:{node.lineno}: reads private "
                                  f"{module_aliases[node.value.id]}.{node.attr}")
    return violations


def test_no_private_names_across_packages():
    violations = _private_uses()
    assert not violations, "private names used across packages:\n" + "\n".join(violations)


def test_checks_catch_planted_violations(tmp_path):
    """The checks are not vacuous: a fake package with one violation of each kind."""
    files = {
        "__init__.py": "",
        "config.py": "",
        "data/__init__.py": "",
        "data/a.py": "def f():\n    from memtron.model import b  # lazy, upward\n",
        "data/c.py": "import memtron.data.d\n",
        "data/d.py": "from memtron.data import c\n",
        "model/__init__.py": "",
        "model/b.py": "from memtron.config import _secret\nfrom memtron import config as cf\n"
                      "x = cf._hidden\n",
        "eval/__init__.py": "",
        "eval/e.py": "from memtron.export import f\n",  # sideways on one level
        "export/__init__.py": "",
        "export/f.py": "",
    }
    root = tmp_path / "memtron"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    modules, edges, violations = _graph(root)
    assert [v.split(": ", 1)[0] for v in violations] == ["memtron/data/a.py:2",
                                                        "memtron/eval/e.py:1"], violations
    assert _cycles(edges) == [["memtron.data.c", "memtron.data.d"]]
    assert [v.split(": ", 1)[0] for v in _private_uses(root)] == ["memtron/model/b.py:1",
                                                                  "memtron/model/b.py:3"]
