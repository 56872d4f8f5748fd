"""Time the default `./dev.sh repro` from scratch, stage by stage, then a `dvc repro` with nothing changed.

Machines here are noisy, so every figure is printed beside a baseline measured in the same run:
- the full run against a fixed CPU workload (ratio = how many "reference units" the pipeline costs);
- the no-op run against `dvc --version` (ratio = the no-op's cost over DVC's own start-up).

    python benchmarks/pipeline_time.py [--keep DIR] [--plain] [--preset NAME] [--set key=value ...]

Like `./dev.sh repro`, the run is a `dvc repro` beside a warm stage server (pipeline/runtime/warm.py); `--plain`
times a plain `dvc repro` instead (`WARM=0 ./dev.sh repro`). The default's budget is 15 minutes on a 2-core CPU.

It copies the repository's tracked files into a temporary git repository, so your workspace is untouched.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` importable
from benchmarks import workspace  # noqa: E402

STAGE = re.compile(r"Running stage '([^']+)'")


def reference_seconds() -> float:
    """A fixed CPU workload (float32 matrix products with torch, on all threads): the machine's current speed."""
    import torch

    a = torch.randn(768, 768, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(300):
        a = torch.tanh(a @ a)
    return time.perf_counter() - start


def preset_params(name: str) -> str:
    """params.yaml's settings with presets/NAME.yaml applied, as YAML text."""
    import yaml

    from pipeline import presets

    raw = yaml.safe_load((workspace.ROOT / "params.yaml").read_text())
    return yaml.safe_dump(presets.merged(raw, name), sort_keys=False)


def apply_overrides(path: Path, settings: list[str]) -> None:
    """`key.sub=value` pairs (value in YAML) written into params.yaml, then committed like the rest."""
    import yaml

    params = workspace.override(yaml.safe_load(path.read_text()), settings)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    workspace.run("git", "commit", "-qam", "overrides", cwd=path.parent)


BUDGET_MINUTES = 15  # the default run's limit on a 2-core CPU (README, Measured figures)


def timed_repro(repo: Path, warm: bool = True) -> tuple[float, list[tuple[str, float]]]:
    """Run `dvc repro` (beside a warm stage server unless `warm` is false), streaming its output; a stage lasts
    from its 'Running stage' line to the next one."""
    command = [sys.executable, "-m", "dvc", "repro"]
    if warm:
        command = [sys.executable, "-m", "pipeline.runtime.warm", "run", "--", *command]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=repo, env=workspace.ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marks, log = [], []
    for line in proc.stdout:
        log.append(line)
        match = STAGE.search(line)
        if match:
            marks.append((match.group(1), time.perf_counter()))
    if proc.wait() != 0:
        sys.exit("dvc repro failed:\n" + "".join(log[-40:]))
    end = time.perf_counter()
    ends = [t for _, t in marks[1:]] + [end]
    return end - start, [(name, stop - t) for (name, t), stop in zip(marks, ends)]


def seconds_of(cmd: list[str], repo: Path, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=repo, env=workspace.ENV, check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def print_results(ev: dict) -> None:
    """The evaluation's headline numbers: each variant, each comparison, each point of the scarcity curve."""
    nan = {"fold_mean": float("nan"), "fold_std": float("nan"), "ensemble": float("nan")}
    for name, v in sorted(ev["variants"].items(), key=lambda kv: -kv[1]["oof"]["accuracy"]["value"]):
        oof, cv = v["oof"]["accuracy"], v["cv"]["accuracy"]
        dev, test = ((v.get(part) or {}).get("accuracy", nan) for part in ("dev", "test"))
        print(f"{name:<14} out-of-fold accuracy {oof['value']:.3f} [{oof['low']:.3f}, {oof['high']:.3f}], folds "
              f"{cv['mean']:.3f} [{cv['low']:.3f}, {cv['high']:.3f}], ROC AUC {v['oof']['roc_auc']['value']:.3f}, "
              f"ECE {v['oof']['ece']['value']:.3f}; development part: folds {dev['fold_mean']:.3f} ± "
              f"{dev['fold_std']:.3f}, ensemble {dev['ensemble']:.3f}; final test: folds {test['fold_mean']:.3f} ± "
              f"{test['fold_std']:.3f}, ensemble {test['ensemble']:.3f}, inside CV interval: "
              f"{v.get('test_inside_cv_interval')}")
    for c in ev["comparisons"]:
        parts = "".join(f"; {part} {x['difference']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}] p {x['p_value']:.3f}"
                        for part, x in c.get("external", {}).items())
        print(f"{c['what']:<40} {c['a']:>13} -> {c['b']:<13} {c['difference']:+.3f} [{c['low']:+.3f}, "
              f"{c['high']:+.3f}] p(t) {c['corrected_t']['p_value']:.4f} p(boot) {c['bootstrap']['p_value']:.4f} "
              f"Holm {c['p_holm']:.4f} {'significant' if c['significant'] else 'not significant'}{parts}")
    for name, points in ev["scarcity"].items():
        for p in points:
            text = p.get("not_run") or (f"{p['oof_accuracy']:.3f} [{p['oof_accuracy_low']:.3f}, "
                                        f"{p['oof_accuracy_high']:.3f}], test {p.get('test_accuracy_fold_mean', 0):.3f}")
            print(f"scarcity {name:<10} n={p['images_per_class']:<4} {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param before the run, as `dvc exp run -S` would")
    parser.add_argument("--plain", action="store_true", help="a plain `dvc repro`, without the warm stage server")
    parser.add_argument("--preset", help="time params.yaml with presets/NAME.yaml applied (e.g. study)")
    args = parser.parse_args()
    repo = args.keep or Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    repo.mkdir(parents=True, exist_ok=True)
    workspace.make_repo(repo, preset_params(args.preset) if args.preset else None)
    if args.set:
        apply_overrides(repo / "params.yaml", args.set)

    ref_before = reference_seconds()
    total, stages = timed_repro(repo, warm=not args.plain)
    ref_after = reference_seconds()
    reference = (ref_before + ref_after) / 2
    noop = seconds_of([sys.executable, "-m", "dvc", "repro"], repo)
    dvc_start = seconds_of([sys.executable, "-m", "dvc", "--version"], repo)

    groups: dict[str, list[float]] = {}
    for name, seconds in stages:  # finetune@R-K-variant counts per variant, scarcity@N-variant per variant and N
        stage, _, item = name.partition("@")
        key = {"finetune": lambda: f"{stage} {item.split('-', 2)[2]}",
               "scarcity": lambda: f"{stage} {item.split('-', 1)[1]} n={item.split('-', 1)[0]}"}.get(
            stage, lambda: stage)()
        groups.setdefault(key, []).append(seconds)
    print(f"{'stage':<24} {'runs':>4} {'seconds':>9} {'each':>7}")
    for name, times in groups.items():
        print(f"{name:<24} {len(times):>4} {sum(times):>9.1f} {sum(times) / len(times):>7.1f}")
    what = "dvc repro" if args.plain else "dvc repro with a warm stage server (./dev.sh repro)"
    print(f"full {what}: {total:.1f} s = {total / 60:.1f} min, {len(stages)} stages "
          f"({'within' if total <= BUDGET_MINUTES * 60 else 'over'} the {BUDGET_MINUTES}-minute budget); reference "
          f"workload {reference:.2f} s (before {ref_before:.2f}, after {ref_after:.2f}); ratio {total / reference:.0f}")
    print(f"no-op dvc repro: {noop:.2f} s; dvc --version: {dvc_start:.2f} s; ratio {noop / dvc_start:.2f}")
    print_results(json.loads((repo / "reports" / "evaluation.json").read_text()))
    if not args.keep:
        shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
