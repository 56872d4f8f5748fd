"""The project modules a module runs, worked out from the code's own imports (with `ast`, not a list kept by hand),
and the params sections a stage declares. tests/test_dvc_yaml.py holds dvc.yaml to them."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"


def module_file(module: str) -> Path | None:
    """pipeline.a.b -> pipeline/a/b.py or pipeline/a/b/__init__.py (relative to the root); None if neither."""
    base = Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if (ROOT / candidate).is_file():
            return candidate
    return None


def _packages_of(module: str) -> list[str]:
    """Python runs every enclosing package's __init__ before the module: pipeline, pipeline.a, ..."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def direct_imports(path: Path) -> frozenset[str]:
    """Project modules one file imports anywhere in it (top level or inside functions), as dotted names."""
    tree = ast.parse((ROOT / path).read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == PACKAGE:
            found.add(node.module)
            # `from pipeline.runtime import atomic` imports the module pipeline.runtime.atomic
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}") is not None}
    return frozenset(found)


def closure(module: str) -> set[Path]:
    """Every project file that running `python -m <module>` can execute, by following imports."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        for dotted in [*_packages_of(name), name]:
            path = module_file(dotted)
            if path is None:
                raise AssertionError(f"{name} imports {dotted}, which is no file under {ROOT}")
            if path not in seen:
                seen.add(path)
                todo.extend(direct_imports(path))
    return seen


def declared_sections(path: Path) -> tuple[str, ...]:
    """The `PARAMS = (...)` tuple of a stage module: the params sections its main() may read."""
    tree = ast.parse((ROOT / path).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["PARAMS"]:
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"{path} declares no PARAMS")


def stage_module(stage: dict) -> str:
    """A dvc.yaml stage's entry module: `python -m pipeline.stages.finetune --fold ...` -> pipeline.stages.finetune"""
    words = stage["cmd"].split()
    assert words[:2] == ["python", "-m"], stage["cmd"]
    return words[2]


def covered(path: Path, deps: list[str]) -> bool:
    """A file is covered by a dependency on itself or on a folder above it."""
    return any(path == Path(dep) or Path(dep) in path.parents for dep in deps)
