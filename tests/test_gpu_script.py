"""benchmarks/gpu_all.sh cannot rot between GPU sessions: its dry run executes every part on the CPU at tiny sizes,
and the render script turns the JSON into the RESULTS.md section."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["gpu_tests", "kernels", "loaders", "input_pipeline", "trainer", "strategies"]


@pytest.mark.slow
def test_gpu_all_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_all.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = {name: json.loads((out / f"{name}.json").read_text()) for name in PARTS}
    for name, report in reports.items():
        assert report["status"] == "ok", (name, report)
        assert report["seconds"] <= report["budget_s"]
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


def test_a_part_that_fails_still_leaves_its_json(tmp_path):
    """The wrapper writes a JSON with the exit status and log tail when a part crashes or runs out of time."""
    script = (ROOT / "benchmarks" / "gpu_all.sh").read_text()
    body = script[script.index("status=0\npart()"):script.index("if [ $dry = 1 ]; then\n    part gpu_tests")]
    test = tmp_path / "t.sh"
    test.write_text(f"set -uo pipefail\nPY={sys.executable}\nout={tmp_path}\n{body}\n"
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
