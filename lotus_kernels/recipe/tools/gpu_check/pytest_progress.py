"""pytest plugin for gpu-check steps (``-p lotus_kernels.recipe.tools.gpu_check.pytest_progress``): named, resumable, on time.

- ``LOTUS_TEST_LOG=FILE``: every test's outcome is appended to FILE as one
  JSON line the moment it is known ({"step", "nodeid", "outcome", "seconds",
  "message"}), so a run killed at its deadline still names what passed and
  what failed (pytest -q under a time-out loses them). With pytest-xdist
  only the controller writes.
- ``LOTUS_TEST_RESUME=FILE``: tests that passed in FILE are deselected, so
  a second call continues the suite instead of starting it again.
- ``LOTUS_DEADLINE=EPOCH_SECONDS``: after it, tests are skipped instead of
  started ("deadline"), so the step ends in time and says what it did not run.

Without these variables the plugin does nothing.
"""

from __future__ import annotations

import os
import time

import pytest

from .runner import append_jsonl, read_jsonl

LOG_ENV = "LOTUS_TEST_LOG"
RESUME_ENV = "LOTUS_TEST_RESUME"
DEADLINE_ENV = "LOTUS_DEADLINE"
DEADLINE_REASON = "gpu-check: the step's deadline has passed"

_worker = False


def passed_nodeids(path) -> set[str]:
    """The tests a log records as passed (and not failed again later)."""
    state: dict[str, str] = {}
    for record in read_jsonl(path):
        if "nodeid" in record:
            state[record["nodeid"]] = record.get("outcome", "")
    return {nodeid for nodeid, outcome in state.items() if outcome == "passed"}


def pytest_configure(config):
    global _worker
    _worker = hasattr(config, "workerinput")  # a pytest-xdist worker: the controller logs


def pytest_collection_modifyitems(config, items):
    resume = os.environ.get(RESUME_ENV)
    if not resume:
        return
    done = passed_nodeids(resume)
    keep = [item for item in items if item.nodeid not in done]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = keep


def pytest_runtest_setup(item):
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() > float(deadline):
        pytest.skip(DEADLINE_REASON)


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    text = getattr(report, "longreprtext", "") or ""
    lines = [line for line in text.splitlines() if line.strip()]
    # The exception line (pytest prefixes it with "E ") says most; else the last line.
    errors = [line for line in lines if line.startswith("E ")]
    return (errors[0] if errors else lines[-1] if lines else "")[:500]


def pytest_runtest_logreport(report):
    path = os.environ.get(LOG_ENV)
    if not path or _worker:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed) or (report.when == "teardown" and report.failed):
        if report.passed:
            outcome = "passed"
        elif report.skipped:
            outcome = "skipped"
        else:
            outcome = "failed" if report.when == "call" else "error"
        append_jsonl(path, {
            "step": os.environ.get("LOTUS_STEP", ""), "nodeid": report.nodeid, "outcome": outcome,
            "seconds": round(report.duration, 3), "message": "" if report.passed else _message(report),
        })
