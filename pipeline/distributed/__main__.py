"""`python -m pipeline.distributed` (what `./dev.sh repro --jobs N` and `--cluster ADDRESS` run): the pipeline's
stale stages as Ray tasks, then a `dvc repro --pull` here that restores them all and runs nothing."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.distributed.runner import LOCAL_REMOTE, Options, reproduce
from pipeline.runtime.cli import cli, setup_logging


def parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--jobs", "-j", type=int, help="stages at a time on this machine")
    where.add_argument("--cluster", help="address of a running Ray cluster (HOST:6379, or ray://HOST:10001)")
    parser.add_argument("--remote", default="", help="shared DVC remote (a folder, s3://..., ssh://...); default: "
                        f"the project's default remote, else {LOCAL_REMOTE}")
    parser.add_argument("--cpus-per-task", type=int, default=0,
                        help="CPU cores per stage, and its torch threads (default: cores / jobs, and all of them "
                        "for a stage that runs alone; 2 on a cluster); given, every task keeps exactly this many")
    parser.add_argument("--gpus-per-task", type=float, default=-1.0,
                        help="GPU share of a training stage, e.g. 0.25 puts four on one GPU (default: GPUs / jobs, "
                        "at most 1; 0.25 on a cluster with GPUs)")
    parser.add_argument("--retries", type=int, default=1, help="runs again a failed stage this many times (1)")
    parser.add_argument("--source", default="", help="git URL workers fetch the commit from (a cluster without "
                        "this folder: push HEAD there first); default: this repository's folder")
    parser.add_argument("--warm-idle", type=float, default=60.0,
                        help="each machine runs stages from one warm process that has imported torch once; it stops "
                        "after this many idle seconds (60; 0: every stage starts its own Python)")
    parser.add_argument("targets", nargs="*", help="stages or dvc.yaml files (default: the whole pipeline)")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    return Options(jobs=args.jobs or 0, cluster=args.cluster or "", remote=args.remote,
                   cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task, retries=args.retries,
                   source=args.source, targets=tuple(args.targets), warm_idle=args.warm_idle)


def main(argv: list[str] | None) -> None:
    options = parse(argv)
    setup_logging()
    outcome = reproduce(Path.cwd(), options)
    ran = sum(result.ran for result in outcome.finished)
    logging.getLogger(__name__).info(
        "%d stage(s) ran on Ray, %d were restored from the run-cache; the final dvc repro here:\n%s", ran,
        len(outcome.finished) - ran, outcome.final_log.strip())


if __name__ == "__main__":
    cli(main)
