"""The run summary prints the counters and the identity they satisfy."""

from __future__ import annotations

import io

from rich.console import Console

from meterflow.reports import print_run_summary
from meterflow.runner import RunResult


def summary(counters, interrupted=False):
    out = io.StringIO()
    print_run_summary(RunResult(counters, 2.0, interrupted), Console(file=out, width=160))
    return out.getvalue()


def test_the_summary_prints_the_identity_of_its_counters():
    text = summary({"read": 100, "accepted": 80, "duplicates": 5, "excluded": 3, "dead_lettered": 12,
                    "missing_property": 4, "unmetered": 2, "alerts": 1})
    assert "read 100 = accepted 80 + duplicates 5 + excluded 3 + dead-lettered 12 (+ 4 missing_property for " \
           "single metrics)" in text
    assert "missing_property dead letters" in text and "bug" not in text
    assert "entitlement changes" not in text  # optional rows only when non-zero


def test_a_summary_that_does_not_add_up_says_so():
    text = summary({"read": 100, "accepted": 80, "duplicates": 5, "excluded": 3, "dead_lettered": 11})
    assert "read 100 != accepted 80" in text and "a meterflow bug" in text
