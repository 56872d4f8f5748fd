"""Params presets: settings made for a kind of data, applied to params.yaml in one command.

    python -m pipeline.presets photos [--params params.yaml]      (or ./dev.sh preset photos)

A preset is presets/NAME.yaml: `set` holds the settings, merged key by key into params.yaml, except the keys
listed in `replace`, whose whole value is replaced (a preset's variants replace the digits' variants rather than
joining them). The result is validated like any params.yaml before it is written, and params.yaml's comments
stay. What changed is printed; `git diff params.yaml` shows it too, and `dvc exp show` records it as an
experiment's params once `dvc exp run` (or `./dev.sh repro`) runs with it.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from pipeline.runtime.errors import PipelineError
from pipeline.runtime.params import parse_params

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def available() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_preset(name: str) -> dict:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise PipelineError(f"no preset {name!r}; the presets are: {', '.join(available())}")
    preset = yaml.safe_load(path.read_text())
    if not isinstance(preset, dict) or set(preset) - {"set", "replace"} or not isinstance(preset.get("set"), dict):
        raise PipelineError(f"{path}: a preset is a mapping with `set` (the settings) and optionally `replace`")
    return preset


def merge(target: Any, settings: dict, replace: set[str], prefix: str = "") -> list[str]:
    """Merge `settings` into the mapping `target` in place; return the dotted keys whose value changed."""
    changed = []
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in replace and isinstance(target.get(key), dict):
            changed += merge(target[key], value, replace, dotted + ".")
        elif target.get(key) != value:
            target[key] = _styled(value)
            changed.append(dotted)
    return changed


def _styled(value: Any) -> Any:
    """Mappings and lists of plain values written on one line, as params.yaml writes a variant or a transform."""
    if isinstance(value, dict):
        node = CommentedMap((k, _styled(v)) for k, v in value.items())
        if not any(isinstance(v, dict) for v in value.values()):
            node.fa.set_flow_style()
        return node
    if isinstance(value, list):
        node = CommentedSeq(_styled(v) for v in value)
        node.fa.set_flow_style()
        return node
    return value


def merged(raw: dict, name: str) -> dict:
    """A plain copy of the params mapping `raw` with preset `name` applied, for code that reads params without
    writing params.yaml (the tests, the benchmarks)."""
    preset = load_preset(name)
    result = copy.deepcopy(raw)
    merge(result, preset["set"], set(preset.get("replace", [])))
    return json.loads(json.dumps(result))  # plain dicts and lists, not ruamel's styled nodes


def apply(name: str, params_path: Path) -> list[str]:
    """Apply preset `name` to the params file; return the keys it changed. Nothing is written when the result
    would not be valid params."""
    preset = load_preset(name)
    ruamel = YAML()  # round-trip: keeps params.yaml's comments and order
    ruamel.width = 4096
    document = ruamel.load(params_path.read_text())
    changed = merge(document, preset["set"], set(preset.get("replace", [])))
    buffer = io.StringIO()
    ruamel.dump(document, buffer)
    parse_params(yaml.safe_load(buffer.getvalue()))  # refuses, naming the key, before anything is written
    params_path.write_text(buffer.getvalue())
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"one of: {', '.join(available())}")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        changed = apply(args.name, args.params)
    except PipelineError as err:
        sys.exit(f"preset: {err}")
    print(f"{args.params}: preset {args.name} changed {len(changed)} setting(s): {', '.join(changed) or 'none'}")


if __name__ == "__main__":
    main()
