"""benchmarks/gpu_all.sh cannot rot between GPU sessions: its dry run executes every part on the CPU at tiny sizes,
and the render script turns the JSON into the RESULTS.md section."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT

PARTS = ["gpu_tests", "kernels", "loaders", "input_pipeline", "trainer", "strategies"]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the subprocess's own limit; pyproject's 600 s default cut it on a loaded machine
def test_gpu_all_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_all.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = {name: json.loads((out / f"{name}.json").read_text()) for name in PARTS}
    for name, report in reports.items():
        assert report["status"] == "ok", (name, report)
        assert report["seconds"] <= report["budget_s"]
    # part a collects the whole suite as on the GPU; all 10 GPU tests are selected (and skip here)
    assert reports["gpu_tests"]["skipped"] + reports["gpu_tests"]["passed"] >= 10, reports["gpu_tests"]
    assert reports["loaders"]["results"][0]["dali_full_img_s"] > 0
    assert reports["input_pipeline"]["results"][0]["efficiency"] > 0
    assert {r["preset"] for r in reports["strategies"]["results"]} == {"ddp", "deepspeed"}
    assert all(r["images_per_s"] > 0 for r in reports["strategies"]["results"])
    assert reports["trainer"]["engine_over_bare"] > 0
    assert json.loads((out / "environment.json").read_text())["dry_run"] is True
    results = tmp_path / "RESULTS.md"
    results.write_text("# Measured results\n\nolder text\n")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render_gpu_results.py"), str(out), "--results",
                    str(results)], check=True)
    text = results.read_text()
    assert "older text" in text and "DRY RUN" in text
    for heading in ("a. GPU tests", "b. Kernels", "c. Loaders", "d. Input-pipeline efficiency", "e. Trainer overhead",
                    "f. Shipped presets"):
        assert heading in text, heading


def _wrapper(tmp_path, total_s: int | None = None) -> str:
    """gpu_all.sh's part() wrapper and run deadline, cut out of the script, as the start of a test script."""
    script = (ROOT / "benchmarks" / "gpu_all.sh").read_text()
    body = script[script.index("status=0\npart()"):script.index("if [ $dry = 1 ]; then\n    part gpu_tests")]
    total = f"GPU_ALL_TOTAL_S={total_s}\n" if total_s else ""
    return f"set -uo pipefail\nPY={sys.executable}\nout={tmp_path}\ndry=0\nstarted=$(date +%s)\n{total}{body}\n"


def test_a_part_that_fails_still_leaves_its_json(tmp_path):
    """The wrapper writes a JSON with the exit status and log tail when a part crashes or runs out of time."""
    test = tmp_path / "t.sh"
    test.write_text(_wrapper(tmp_path) +
                    "part crash 30 bash -c 'echo boom; exit 3'\npart slow 1 sleep 5\n"
                    "part fine 30 $PY -c 'import sys; open(sys.argv[1], \"w\").write(\"{}\")' $out/fine.json\n"
                    "echo status=$status\n")
    proc = subprocess.run(["bash", str(test)], capture_output=True, text=True, timeout=120)
    assert "status=1" in proc.stdout, proc.stdout + proc.stderr
    crash = json.loads((tmp_path / "crash.json").read_text())
    assert crash["status"] == "failed" and crash["exit_code"] == 3 and "boom" in crash["log_tail"]
    assert json.loads((tmp_path / "slow.json").read_text())["status"] == "timeout"
    fine = json.loads((tmp_path / "fine.json").read_text())
    assert fine["status"] == "ok" and fine["budget_s"] == 30


def test_the_run_deadline_trims_and_skips_parts_but_each_leaves_its_json(tmp_path):
    """The whole GPU run must fit one 9-minute device call: a part gets at most what is left before the deadline
    (less the kill grace), and a part with no time left is skipped with a JSON saying so."""
    test = tmp_path / "t.sh"
    test.write_text(_wrapper(tmp_path, total_s=22) +
                    "part first 60 sleep 30\npart second 60 sleep 30\necho status=$status\n")
    start = time.monotonic()
    proc = subprocess.run(["bash", str(test)], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert "status=1" in proc.stdout, proc.stdout + proc.stderr
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["status"] == "timeout" and 6 <= first["budget_s"] <= 7  # 22 s in all - 15 s reserve
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["status"] == "skipped" and second["planned_budget_s"] == 60
    assert took < 22, took


def test_rows_written_before_a_time_out_survive(tmp_path):
    """Parts c, d and f write their JSON (status "partial") after each row: a time-out keeps the rows measured."""
    test = tmp_path / "t.sh"
    test.write_text(_wrapper(tmp_path) + "part rows 3 $PY -c 'import json, sys, time; json.dump({\"results\": "
                    "[{\"source\": \"512x384\"}], \"status\": \"partial\"}, open(sys.argv[1], \"w\")); time.sleep(30)' "
                    "$out/rows.json\n")
    subprocess.run(["bash", str(test)], capture_output=True, text=True, timeout=120)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows["status"] == "timeout" and rows["results"] == [{"source": "512x384"}]
