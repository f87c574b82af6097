"""Run pytest and write its outcome as one JSON file (counts and failing test ids), for gpu_all.sh part a.

  python benchmarks/pytest_json.py OUT.json [pytest args...]
"""
from __future__ import annotations

import json
import sys

import pytest


class Collector:
    def __init__(self):
        self.counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
        self.failed: list[str] = []
        self.skip_reasons: dict[str, int] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            outcome = report.outcome if report.when == "call" or report.outcome == "skipped" else "error"
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            if outcome in ("failed", "error"):
                self.failed.append(report.nodeid)
            if outcome == "skipped" and isinstance(report.longrepr, tuple):
                reason = str(report.longrepr[2])
                self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1


def main() -> int:
    out, args = sys.argv[1], sys.argv[2:]
    collector = Collector()
    code = int(pytest.main(["-q", "-p", "no:cacheprovider", *args], plugins=[collector]))
    ok = code in (0, 5)  # 5: nothing selected (no GPU test collected) is not a failure of the script
    report = {"benchmark": "gpu_tests", "args": args, "pytest_exit": code, **collector.counts,
              "failed_tests": collector.failed, "skip_reasons": collector.skip_reasons, "status": "ok" if ok and
              not collector.failed else "failed"}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
