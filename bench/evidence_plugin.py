"""pytest plugin of bench/gpu_evidence.py (loaded with `-p evidence_plugin`, bench/ on PYTHONPATH).

- EVIDENCE_RESULTS=<file>: every test's outcome is appended to this JSON-lines file the moment it is known,
  one line per report (setup/call/teardown that failed or skipped, and every call), flushed: a stage stopped
  at its time limit still says exactly what ran. EVIDENCE_STAGE names the stage in each line.
- EVIDENCE_DONE=<file>: the tests already recorded in that file (by an earlier stage) are deselected, so a
  later stage runs only what is left.

Failures carry the last lines of their traceback (capped), so the file stays small.
"""

from __future__ import annotations

import json
import os

import pytest

MESSAGE_LINES = 15
MESSAGE_CHARS = 1500
COLLECTED = "<collected>"  # the node id of a stage's line that counts what it collected


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])  # (file, line, reason) of a skip
    lines = (getattr(report, "longreprtext", "") or "").strip().splitlines()
    return "\n".join(lines[-MESSAGE_LINES:])[-MESSAGE_CHARS:]


def recorded_nodeids(path: str) -> set[str]:
    """The node ids a results file holds (a truncated last line, from a killed run, is ignored)."""
    nodeids = set()
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                try:
                    nodeids.add(json.loads(line)["nodeid"])
                except (ValueError, KeyError):
                    continue
    except FileNotFoundError:
        pass
    return nodeids


class _Recorder:
    def __init__(self, path: str, stage: str) -> None:
        self._file = open(path, "a", encoding="utf-8")  # open for the whole session
        self._stage = stage

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def pytest_runtest_logreport(self, report) -> None:
        if report.when != "call" and report.passed:
            return
        record = {"nodeid": report.nodeid, "stage": self._stage, "when": report.when, "outcome": report.outcome,
                  "duration": round(report.duration, 4)}
        if not report.passed:
            record["message"] = _message(report)
        self._write(record)

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self._write({"nodeid": report.nodeid or "<collection>", "stage": self._stage, "when": "collect",
                         "outcome": "failed", "duration": 0.0, "message": _message(report)})

    def pytest_collection_finish(self, session) -> None:
        # How many this stage will run (after deselection): what it did not reach is the difference.
        self._write({"nodeid": COLLECTED, "stage": self._stage, "when": "collection", "outcome": "collected",
                     "count": len(session.items), "duration": 0.0})

    def pytest_unconfigure(self, config) -> None:
        self._file.close()


def pytest_configure(config) -> None:
    path = os.environ.get("EVIDENCE_RESULTS")
    if path:
        config.pluginmanager.register(_Recorder(path, os.environ.get("EVIDENCE_STAGE", "")), "evidence-recorder")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    done_file = os.environ.get("EVIDENCE_DONE")
    if not done_file:
        return
    done = recorded_nodeids(done_file)
    kept = [item for item in items if item.nodeid not in done]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = kept
