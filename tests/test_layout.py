"""The package's layers (docs/architecture.md): imports run downward only, no module imports
itself back through others, the core never imports Ray, and MLflow only behind tracking.

The import graph is read from the source (every import, at any depth, also inside functions),
so that a lazy import cannot hide an upward edge; the sys.modules checks import the core for real.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "echomamba_dist"

# lowest first; a module may import its own layer (acyclically) and the layers below it
LAYERS = [
    ("echomamba_dist", "echomamba_dist.errors", "echomamba_dist.io"),
    ("echomamba_dist.ops",),
    ("echomamba_dist.models",),
    ("echomamba_dist.config",),
    ("echomamba_dist.data",),
    ("echomamba_dist.train",),
    ("echomamba_dist.serve",),
    ("echomamba_dist.distributed",),
    ("echomamba_dist.cli",),
]
CORE = ("echomamba_dist.ops", "echomamba_dist.models", "echomamba_dist.data", "echomamba_dist.train")
MLFLOW_IN_CORE = {"echomamba_dist.train.tracking"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports, at any depth (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    mods = modules()
    return {name: {m for m in imports_of(path, name) if m in mods and m != name} for name, path in mods.items()}


def layer(name: str) -> int:
    best = max((i for i, prefixes in enumerate(LAYERS) for p in prefixes if name == p or name.startswith(p + ".")),
               default=None)
    if best is None:
        raise AssertionError(f"{name} is in no layer of docs/architecture.md")
    return best


def test_every_module_has_a_layer_and_imports_run_downward():
    upward = [(m, dep) for m, deps in graph().items() for dep in deps if layer(dep) > layer(m)]
    assert upward == [], "upward imports: " + ", ".join(f"{m} -> {d}" for m, d in upward)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_core_never_names_ray_and_mlflow_only_in_tracking():
    mods = modules()
    for name, path in mods.items():
        if not name.startswith(CORE) and name not in ("echomamba_dist.config", "echomamba_dist.errors", "echomamba_dist.io"):
            continue
        outside = {m.split(".")[0] for m in imports_of(path, name)}
        assert "ray" not in outside, f"{name} imports ray"
        if name not in MLFLOW_IN_CORE:
            assert "mlflow" not in outside, f"{name} imports mlflow"


def test_the_detector_sees_lazy_and_relative_imports(tmp_path):
    """The graph reads imports inside functions and relative ones (else the tests above could
    pass on a package that breaks the rules)."""
    pkg = tmp_path / "echomamba_dist" / "train"
    pkg.mkdir(parents=True)
    probe = pkg / "probe.py"
    probe.write_text("def f():\n    from ..distributed import trainer\n    import ray.train\n")
    found = imports_of(probe, "echomamba_dist.train.probe")
    assert "echomamba_dist.distributed.trainer" in found and "ray.train" in found
    assert layer("echomamba_dist.distributed.trainer") > layer("echomamba_dist.train.probe")


CORE_IMPORT = """
import importlib, json, pkgutil, sys
import echomamba_dist
names = ["echomamba_dist.config", "echomamba_dist.errors", "echomamba_dist.io"]
for package in ("ops", "models", "data", "train"):
    mod = importlib.import_module(f"echomamba_dist.{package}")
    names += [m.name for m in pkgutil.walk_packages(mod.__path__, f"echomamba_dist.{package}.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow"))}))
"""


@pytest.mark.slow  # a fresh interpreter imports torch (about 10 s here)
def test_importing_every_core_module_loads_neither_ray_nor_mlflow():
    out = subprocess.run([sys.executable, "-c", CORE_IMPORT], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "echomamba_dist.train.loop" in report["imported"] and "echomamba_dist.train.tracking" in report["imported"]
    assert len(report["imported"]) >= 25
    assert report["loaded"] == []
