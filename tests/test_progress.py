"""The progress bar's periodic log line: written through the caller's logger whether or not stderr is a terminal
(pytest's is not), never more often than asked, with counts, rate and ETA; the wrapped items pass through as they
are."""

from __future__ import annotations

import itertools
import logging

import pytest

from pipeline.runtime import progress
from pipeline.runtime.progress import Progress

log = logging.getLogger("tests.progress")


@pytest.fixture
def records(caplog):
    caplog.set_level(logging.INFO, logger=log.name)
    return lambda: [r.getMessage() for r in caplog.records if r.name == log.name]


@pytest.fixture
def clock(monkeypatch):
    """Each reading of the clock is 10 s after the one before."""
    ticks = itertools.count(step=10.0)
    monkeypatch.setattr(progress, "_clock", lambda: next(ticks))


def test_iterating_yields_exactly_the_items_and_logs_the_counts(records):
    items = [object() for _ in range(3)]
    assert list(Progress(items, desc="gan", unit="step", logger=log, every=0)) == items
    lines = records()
    assert [line.split(" step")[0] for line in lines] == ["gan: 1/3", "gan: 2/3", "gan: 3/3"]
    assert lines[-1].startswith("gan: 3/3 step (100%), ") and "step/s, ETA 00:00" in lines[-1]


def test_a_line_comes_at_most_every_interval_with_rate_and_eta(records, clock):
    bar = Progress(range(10), desc="finetune", unit="epoch", logger=log, every=25)  # started at t=0
    bar.set_postfix(loss="0.123")
    assert list(bar) == list(range(10))  # one reading per item: item k is done at t = 10 k
    assert records() == ["finetune: 3/10 epoch (30%), 0.10 epoch/s, ETA 01:10; loss=0.123",
                         "finetune: 6/10 epoch (60%), 0.10 epoch/s, ETA 00:40; loss=0.123",
                         "finetune: 9/10 epoch (90%), 0.10 epoch/s, ETA 00:10; loss=0.123"]


def test_updates_from_a_pool_are_counted_and_an_unknown_total_has_no_eta(records, clock):
    with Progress(total=100, desc="decode", unit="img", logger=log, every=10) as bar:
        bar.update(40)
        bar.update(60)
    assert records() == ["decode: 40/100 img (40%), 4.00 img/s, ETA 00:15",
                         "decode: 100/100 img (100%), 5.00 img/s, ETA 00:00"]
    with Progress(iter("abc"), desc="read", unit="file", logger=log, every=0) as bar:
        assert "".join(bar) == "abc"
    assert records()[-1].startswith("read: 3 file, ") and "ETA" not in records()[-1]


def test_a_disabled_bar_logs_nothing_unless_asked(records):
    assert list(Progress(range(3), desc="gan", unit="step", logger=log, disable=True, every=0)) == [0, 1, 2]
    assert records() == []  # e.g. a non-main rank
    list(Progress(range(2), desc="download", unit="url", logger=log, disable=True, log=True, every=0))
    assert len(records()) == 2


def test_early_exit_stops_counting(records):
    bar = Progress(range(100), desc="finetune", unit="epoch", logger=log, every=0)
    for epoch in bar:
        if epoch == 1:
            break  # early stopping
    bar.close()
    [line] = records()  # the item the loop broke on was never finished
    assert line.startswith("finetune: 1/100 epoch")
