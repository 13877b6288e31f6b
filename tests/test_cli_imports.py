"""The command-line layer sits on top of the library: a walk over every import statement (module level and
inside functions) finds no cycle through fkv_jax.cli, no library module importing the CLI, and no import
cycle at all between the application's modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fkv_jax", "checkpoints_convert")
# entry points: the `python -m` aliases and the commands that are CLIs themselves (they may use fkv_jax.cli)
ENTRY_POINTS = {
    "fkv_jax.generate",
    "fkv_jax.profile",
    "fkv_jax.decode",
    "fkv_jax.eval.__main__",
    "checkpoints_convert.__main__",
    "fkv_jax.aot",
    "fkv_jax.serve.__main__",
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Application modules that ``name`` imports (the longest known prefix of each imported name)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found = set()

    def add(target: str):
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule
                full = f"{mod}.{a.name}"
                add(full if full in known else mod)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports(m, p, known) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    sys.setrecursionlimit(10_000)
    for v in list(g):
        if v not in index:
            visit(v)
    return out


def is_cli(m: str) -> bool:
    return m == "fkv_jax.cli" or m.startswith("fkv_jax.cli.")


def test_the_walk_sees_the_cli_and_the_library():
    g = graph()
    assert "fkv_jax.cli.generate" in g and "fkv_jax.sampling.rollout" in g["fkv_jax.cli.generate"] | set().union(
        *(g[m] for m in g["fkv_jax.cli.generate"])
    )
    assert "fkv_jax.cli.generate" in g["fkv_jax.generate"]  # the alias delegates


def test_library_modules_import_nothing_from_the_cli():
    g = graph()
    bad = {m: sorted(d for d in deps if is_cli(d)) for m, deps in g.items() if not is_cli(m) and m not in ENTRY_POINTS}
    assert not {m: d for m, d in bad.items() if d}, bad


# Cycles inside library packages tolerated for now (none left: the triton and recache cycles were removed)
KNOWN_LIBRARY_CYCLES: list[list[str]] = []


def test_no_import_cycle_through_the_cli():
    found = [c for c in cycles(graph()) if any(is_cli(m) or m in ENTRY_POINTS for m in c)]
    assert not found, found


def test_no_new_import_cycle_in_the_application():
    found = cycles(graph())
    assert [c for c in found if c not in KNOWN_LIBRARY_CYCLES] == [], found


def test_generate_and_pipeline_no_longer_import_each_other():
    g = graph()
    assert "fkv_jax.pipeline" not in g["fkv_jax.generate"] and "fkv_jax.generate" not in g["fkv_jax.pipeline"]
