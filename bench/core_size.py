"""Size of the memtron package of a tree, and the classes implementing the table contract.

For issue 23's before/after figures: lines of ``memtron/**/*.py`` (non-blank, and all lines),
the file count, and the classes implementing the value-table contract
``lookup(ids, weights) -> [T, d_v]``: those defining a ``lookup`` method or any method taking
exactly ``(ids, weights)`` (the contract under another name, e.g. the exported HF model's
``MemtronValueTable.forward``), or deriving, directly or through other classes of the package,
from one that does. Classes are found with ``ast`` over the package, never imported, so any tree
can be measured whatever its dependencies; bases are matched by name (``Name`` or the last part
of an ``a.b.Name`` attribute) within the package. ``--method NAME[:PARAM,PARAM]`` counts other
contracts the same way (issue 23 calls ``fetch`` the undeclared second one).

    python bench/core_size.py --tree /work/base
    python bench/core_size.py --tree . --method lookup:ids,weights --method fetch --out core.json
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ClassInfo:
    name: str
    file: str  # relative to the tree
    line: int
    bases: tuple[str, ...]
    methods: frozenset[str]
    signatures: frozenset[tuple[str, tuple[str, ...]]]  # (method, positional params after self)


def _base_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Subscript):  # Generic[T], Protocol[...]
        node = node.value
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def package_files(tree: Path) -> list[Path]:
    return sorted(p for p in (tree / "memtron").rglob("*.py") if "__pycache__" not in p.parts)


def classes(tree: Path, files: list[Path]) -> list[ClassInfo]:
    """Every class statement of the package (nested ones included)."""
    found = []
    for path in files:
        module = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(module):
            if isinstance(node, ast.ClassDef):
                defs = [n for n in node.body
                        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                signatures = frozenset(
                    (n.name, tuple(a.arg for a in [*n.args.posonlyargs, *n.args.args][1:]))
                    for n in defs)
                bases = tuple(b for b in map(_base_name, node.bases) if b)
                found.append(ClassInfo(node.name, str(path.relative_to(tree)), node.lineno,
                                       bases, frozenset(n.name for n in defs), signatures))
    return found


def own_match(c: ClassInfo, method: str, params: tuple[str, ...]) -> str | None:
    """How the class itself implements the contract, if it does."""
    if method in c.methods:
        return f"defines {method}"
    same = sorted(name for name, args in c.signatures if params and args == params)
    return f"defines {same[0]}({', '.join(params)})" if same else None


def implementers(found: list[ClassInfo], method: str,
                 params: tuple[str, ...] = ()) -> list[ClassInfo]:
    """Classes defining ``method`` (or a method taking exactly ``params``) or deriving from such
    a class (by name, to a fixpoint)."""
    hits = {c for c in found if own_match(c, method, params)}
    while True:
        names = {c.name for c in hits}
        more = {c for c in found if c not in hits and names.intersection(c.bases)}
        if not more:
            return sorted(hits, key=lambda c: (c.file, c.line))
        hits |= more


def line_counts(files: list[Path]) -> tuple[int, int]:
    """(non-blank lines, all lines) over the files."""
    non_blank = total = 0
    for path in files:
        lines = path.read_text().splitlines()
        total += len(lines)
        non_blank += sum(1 for line in lines if line.strip())
    return non_blank, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                        help="source tree holding memtron/ (default: this repository)")
    parser.add_argument("--method", action="append", default=None,
                        help="contract to count implementers of, NAME or NAME:PARAM,PARAM "
                             "(repeatable; default: lookup:ids,weights)")
    parser.add_argument("--out", "--json", dest="out", type=Path, default=None,
                        help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    tree = args.tree.resolve()
    if not (tree / "memtron" / "__init__.py").is_file():
        parser.error(f"{tree}: no memtron/__init__.py")
    files = package_files(tree)
    non_blank, total = line_counts(files)
    found = classes(tree, files)
    print(f"memtron package of {tree}: {len(files)} .py files, {non_blank:,} non-blank lines "
          f"({total:,} lines in all), {len(found)} classes")
    doc: dict = {"tree": str(tree), "files": len(files), "lines_non_blank": non_blank,
                 "lines_total": total, "classes": len(found), "contracts": {}}
    for spec in args.method or ["lookup:ids,weights"]:
        method, _, plist = spec.partition(":")
        params = tuple(p.strip() for p in plist.split(",") if p.strip())
        hits = implementers(found, method, params)
        what = f"{method}({', '.join(params)})" if params else method
        rule = "defining it" + (" or a method with its parameters" if params else "")
        print(f"classes implementing `{what}` ({rule}, or deriving from one that does): "
              f"{len(hits)} in {len({c.file for c in hits})} files")
        for c in hits:
            how = own_match(c, method, params) or f"via {', '.join(c.bases)}"
            print(f"  {c.name:<28} {c.file}:{c.line}  ({how})")
        doc["contracts"][spec] = [
            {"name": c.name, "file": c.file, "line": c.line, "bases": list(c.bases),
             "how": own_match(c, method, params) or "inherits"} for c in hits]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
