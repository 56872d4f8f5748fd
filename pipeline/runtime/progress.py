"""A tqdm bar that also writes a log line now and then.

tqdm draws only on a terminal (`disable=None`), and DVC under CI or on a cluster has none: there a GAN fold at
128 px (about 7 minutes on 2 cores) would print nothing until it ends. So beside the bar, one INFO line through the
caller's logger, at most every `every` seconds, says how far it got, how fast and how long is left, whether or not
stderr is a terminal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

LOG_EVERY_S = 30.0  # often enough to show a run is alive, rare enough not to flood a CI log
_clock = time.monotonic  # a module attribute, so tests can move time forward


class Progress:
    """Iterate over it like tqdm, or call `update(n)` as work finishes elsewhere (thread or process pools)."""

    def __init__(self, iterable: Iterable | None = None, *, desc: str, unit: str, logger: logging.Logger,
                 total: int | None = None, disable: bool | None = None, log: bool | None = None,
                 every: float = LOG_EVERY_S):
        # disable: tqdm's own; None draws the bar only on a terminal, True never (e.g. on non-main ranks).
        # log: the periodic line; by default on unless `disable` is True, so a rank with no bar stays quiet too.
        self.bar = tqdm(iterable, desc=desc, unit=unit, total=total, disable=disable)
        self.total = total if total is not None else len(iterable) if hasattr(iterable, "__len__") else None
        self.desc, self.unit, self.logger, self.every = desc, unit, logger, every
        self.logs = disable is not True if log is None else log
        self.done, self.postfix = 0, ""
        self.started = self.logged = _clock()

    def __iter__(self) -> Iterator:
        for item in self.bar:
            yield item
            self._count(1)  # counted once the caller is done with the item and asks for the next

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self._count(n)

    def set_postfix(self, **values: Any) -> None:
        """Shown after the bar and at the end of the log line (losses, accuracy)."""
        self.bar.set_postfix(**values)
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self, n: int) -> None:
        self.done += n
        now = _clock()
        if self.logs and now - self.logged >= self.every:
            self.logged = now
            self.logger.info("%s", self.line(now - self.started))

    def line(self, elapsed: float) -> str:
        """e.g. `gan: 120/2000 step (6%), 1.02 step/s, ETA 30:43; loss_d=0.693`"""
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total:
            text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({self.done / self.total:.0%}), "
            eta = tqdm.format_interval((self.total - self.done) / rate) if rate > 0 else "?"
            text += f"{tqdm.format_sizeof(rate)} {self.unit}/s, ETA {eta}"
        else:
            text = f"{self.desc}: {self.done} {self.unit}, {tqdm.format_sizeof(rate)} {self.unit}/s"
        return f"{text}; {self.postfix}" if self.postfix else text
