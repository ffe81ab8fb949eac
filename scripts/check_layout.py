#!/usr/bin/env python3
"""The layout check (docs/design.md, "Layout"): imports point one way, no circles, no big files.

Fails (exit 1) on
- an import that runs against the arrows: a package importing a project package it may not
  (``ALLOWED`` below; every import counts, also one inside a function);
- an import circle between modules (a strongly connected set of modules, with the edges that
  close it);
- a non-test Python file over ``MAX_LINES`` lines.
Imports under ``if TYPE_CHECKING:`` are annotations only and do not count. Prints the import
counts between packages, then what it found.

    python scripts/check_layout.py [--root DIR]
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter, defaultdict
from pathlib import Path

MAX_LINES = 600
GENERATED = "hisam_pb"  # protoc output (hisam codegen): every layer may import it, it imports nothing

# package -> the project packages (or single modules of them) it may import, besides itself
# and the generated protobuf code. "pkg" allows the whole package, "pkg.mod" one module.
ALLOWED: dict[str, frozenset[str]] = {
    "models": frozenset(),
    "infra": frozenset(),
    "data": frozenset({"models"}),
    "export": frozenset({"models"}),
    "features": frozenset(),
    "recipes": frozenset({"models", "data", "features.profiles"}),
    "stream": frozenset({"features", "models", "infra"}),
    "serving": frozenset({"features", "export", "models", "infra"}),
    # the trainer reads the stream's records (and the topic they travel on, and what an action
    # means), publishes into the serving repository
    "trainer": frozenset(
        {
            "serving.repository",
            "export",
            "recipes",
            "models",
            "stream.records",
            "stream.topics",
            "features.actions",
            "infra",
        }
    ),
    "hisam": frozenset({"*"}),
}
PACKAGES = frozenset(ALLOWED) | {GENERATED}
SKIP_DIRS = frozenset({".venv", ".git", ".triton", "tests", "__pycache__", GENERATED, "build", "dist"})


def source_files(root: Path) -> list[Path]:
    """Every project Python file (the packages of ``ALLOWED`` and ``scripts/``), not tests."""
    files = []
    for top in sorted(root.iterdir()):
        if top.is_dir() and (top.name in ALLOWED or top.name == "scripts"):
            files += [p for p in top.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, modules: set[str], this: str) -> list[tuple[str, int]]:
    """(imported project module, line) for every import in ``path``; ``from pkg import sub``
    resolves to the submodule when there is one, else to the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    found: list[tuple[str, int]] = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = this.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.append((sub if sub in modules else mod, node.lineno))
    return found


def allowed(importer: str, imported: str) -> bool:
    src, dst = importer.split(".")[0], imported.split(".")[0]
    if src == dst or dst == GENERATED:
        return True
    if src == "scripts":
        return True  # project scripts (this one, codegen helpers) sit beside the application
    rules = ALLOWED.get(src, frozenset())
    return "*" in rules or dst in rules or any(imported == r or imported.startswith(r + ".") for r in rules)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components with more than one module (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1 or node in graph[node]:
                    out.append(sorted(comp))
    return out


def check(root: Path) -> tuple[list[str], Counter]:
    """(problems, import counts between packages) for the tree at ``root``."""
    files = source_files(root)
    names = {module_name(root, p): p for p in files}
    modules = set(names)
    problems: list[str] = []
    graph: dict[str, set[str]] = defaultdict(set)
    between: Counter = Counter()
    for mod, path in sorted(names.items()):
        rel = path.relative_to(root)
        n_lines = len(path.read_text().splitlines())
        if n_lines > MAX_LINES:
            problems.append(f"{rel}: {n_lines} lines (at most {MAX_LINES}: split it by responsibility)")
        graph[mod]
        for imported, line in sorted(set(imports_of(path, modules, mod))):
            if imported != mod:
                graph[mod].add(imported)
            src, dst = mod.split(".")[0], imported.split(".")[0]
            if src != dst:
                between[(src, dst)] += 1
            if not allowed(mod, imported):
                problems.append(
                    f"{rel}:{line}: {mod} imports {imported}, against the arrows "
                    f"({src} may import: {', '.join(sorted(ALLOWED.get(src, ()))) or 'nothing of the project'})"
                )
    for comp in strongly_connected({m: {d for d in deps if d in modules} for m, deps in graph.items()}):
        members = set(comp)
        edges = sorted(f"{a} -> {b}" for a in comp for b in graph[a] if b in members)
        problems.append(f"import circle between {', '.join(comp)}: {'; '.join(edges)}")
    return problems, between


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    problems, between = check(args.root.resolve())
    print("imports between packages (importer -> imported: count):")
    for (src, dst), n in sorted(between.items()):
        print(f"  {src} -> {dst}: {n}")
    if problems:
        print(f"layout check FAILED: {len(problems)} problem(s)")
        for p in problems:
            print(f"  {p}")
        return 1
    print(
        f"layout check passed: {len(source_files(args.root.resolve()))} files, no upward import, no circle, "
        f"none over {MAX_LINES} lines"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
