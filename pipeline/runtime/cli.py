"""How every entry point starts: logging, the command line, the params, and user mistakes turned into messages."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from pipeline.runtime.errors import PipelineError


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def cli(main: Callable[[list[str] | None], None]) -> None:
    """Run a stage's main(); a PipelineError ends the run with its message and exit status 2, no traceback."""
    try:
        main(None)
    except PipelineError as err:
        logging.getLogger("pipeline").error("%s", err)
        sys.exit(2)


class StageParams:
    """The params sections one stage declared (its module's `PARAMS`, which dvc.yaml lists too); reading any other
    section is a bug that would let DVC's cache go stale, so it raises."""

    def __init__(self, params, sections: tuple[str, ...]):
        self._params, self._sections = params, sections

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in self._sections:
            raise AttributeError(f"this stage declared params sections {self._sections}, not {name!r}: add it to the "
                                 "stage's PARAMS and to its `params` in dvc.yaml")
        return getattr(self._params, name)


def stage_args(doc: str, argv: list[str] | None, sections: tuple[str, ...], *, fold: bool = False,
               variant: bool = False, images_per_class: bool = False):
    """Parse a stage's command line, set up logging and load the params: (args, the `sections` of Params). The
    whole file is checked, so a mistake anywhere in it stops the run before any work starts."""
    from pipeline.runtime.params import load_params

    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    if fold:
        parser.add_argument("--fold", type=int, required=True, help="cross-validation fold id")
        parser.add_argument("--repeat", type=int, default=0, help="repeat of the k-fold split (default 0)")
    if variant:
        parser.add_argument("--variant", required=True, help="a name from params `variants`")
    if images_per_class:
        parser.add_argument("--images-per-class", type=int, required=True,
                            help="a point of the label-scarcity curve (from params `scarcity.images_per_class`)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    setup_logging()
    return args, StageParams(load_params(args.params), sections)
