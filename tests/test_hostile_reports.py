"""`tltrain report`, `tltrain jobs` and the launcher's records on run folders and registries someone else made.

Every hostile file is crafted here (tmp_path). The faults: outputs written through a planted symlink, error text
copied verbatim into Markdown/CSV/the terminal (newlines, escape sequences, links, formulas), unbounded reads
(/dev/zero, FIFOs, YAML alias bombs, huge logs), and one bad run folder or registry line aborting the listing with
a traceback. Each test proves the fix by a victim file's bytes, a marker file, a time or a memory bound.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from tltrain.cli import main
from tltrain.errors import DataError
from tltrain.launch.jobs import REGISTRY_NAME, cli_jobs, list_jobs, log_tail, record_job
from tltrain.launch.submit import job_run_dir
from tltrain.launch.summary import read_sweep_runs
from tltrain.report import write_report

ATTACKER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAttackerKeyAttackerKeyAttackerKeyAttacker attacker@evil"
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\r"


def _good_run(run_dir: Path, kappa: float = 0.5, seed: int = 0) -> Path:
    """A completed run folder as the trainer leaves it (config, metrics, status)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"data": {"name": "target", "fraction": 1.0, "shards": None}, "schedule": {"name": "finetune_all"},
              "model": {"arch": "resnet18", "weights": None}, "seed": seed}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.json").write_text(json.dumps({"test": {"kappa": kappa, "accuracy": 0.7, "auc": 0.8,
                                                               "confusion": [[3, 1], [1, 3]]}}))
    (run_dir / "status.json").write_text(json.dumps({"state": "completed", "step": 10}))
    return run_dir


def _alias_bomb(levels: int = 9) -> str:
    """A YAML alias bomb: 10**levels strings from ~500 bytes."""
    lines = ['l0: &l0 ["xxxxxxxx","xxxxxxxx","xxxxxxxx","xxxxxxxx","xxxxxxxx","xxxxxxxx","xxxxxxxx","xxxxxxxx",'
             '"xxxxxxxx","xxxxxxxx"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# -- 1. outputs are new files renamed into place --------------------------------------------------------------
@pytest.mark.parametrize("output", ["report.md", "report.csv", "summary.csv", "report.png"])
def test_report_replaces_a_planted_symlink_and_leaves_its_target_alone(tmp_path, output):
    sweep = tmp_path / "sweep"
    _good_run(sweep / "a")
    victim = tmp_path / "authorized_keys"
    victim.write_bytes(b"ssh-ed25519 AAAA the-owners-key\n")
    (sweep / output).symlink_to(victim)
    result = write_report(sweep)
    assert victim.read_bytes() == b"ssh-ed25519 AAAA the-owners-key\n"
    assert not (sweep / output).is_symlink() and (sweep / output).stat().st_size > 0
    assert result["plot"] and not list(sweep.glob(".*.tmp"))  # no temporaries left behind


# -- 2. text from files is escaped where it is written or printed ---------------------------------------------
def test_error_text_cannot_add_lines_links_or_escapes_to_the_report(tmp_path, capsys):
    """The authorized_keys attack: status.json's error with newlines became whole lines of report.md."""
    sweep = tmp_path / "sweep"
    _good_run(sweep / "a")
    bad = sweep / "=HYPERLINK(\"http:evil\")"
    bad.mkdir(parents=True)
    error = f"boom\n{ATTACKER_KEY}\n![x](http://evil/pixel.png) <script>x</script> | cell {ESCAPES}"
    (bad / "status.json").write_text(json.dumps({"state": "failed", "error": error}))
    assert main(["report", str(sweep)]) == 0
    printed = capsys.readouterr().out
    text = (sweep / "report.md").read_text()
    for output in (text, printed, (sweep / "report.csv").read_text()):
        assert "\x1b" not in output and "\x07" not in output and "\r" not in output
        assert not any(line.startswith("ssh-ed25519") for line in output.splitlines())
    assert "](http://evil" not in text and "<script>" not in text and "\\| cell" in text
    failed_line = next(line for line in text.splitlines() if line.startswith("- ") and "boom" in line)
    assert ATTACKER_KEY.split()[1] in failed_line  # still shown, on the run's own line
    import csv

    with open(sweep / "report.csv", newline="") as handle:
        runs = {row["run"]: row for row in csv.DictReader(handle)}
    assert "'=HYPERLINK(\"http:evil\")" in runs  # a spreadsheet shows it as text
    assert "\n" not in runs["'=HYPERLINK(\"http:evil\")"]["error"]


def test_names_from_configs_are_escaped_in_tables_finding_and_charts(tmp_path):
    """A config's model.weights names the intermediate model in the finding and the comparisons table; a `$`
    in a name used to be read as mathtext by matplotlib (and abort the chart)."""
    sweep = tmp_path / "sweep"
    weights = "/x/step1_[click](http:evil)$\\frac{$"
    for schedule in ("swft", "linear_probe"):
        for source in (weights, None):
            for seed, kappa in enumerate((0.5, 0.55)):
                run = _good_run(sweep / f"{schedule}_{bool(source)}_{seed}", kappa + (0.2 if source else 0), seed)
                config = yaml.safe_load((run / "config.yaml").read_text())
                config["schedule"]["name"], config["model"]["weights"] = schedule, source
                config["data"]["name"] = "<b>$x"
                (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = write_report(sweep)
    text = (sweep / "report.md").read_text()
    assert result["plot"] and result["finding"] and "](http:evil)" not in text and "<b>" not in text
    assert "run:step1\\_\\[click\\]\\(http:evil\\)$\\\\frac\\{$" in result["finding"]


# -- 3. bounded reads: time and memory --------------------------------------------------------------------------
MEASURE = textwrap.dedent("""
    import json, os, resource, sys, time
    from pathlib import Path
    from tltrain.report import write_report
    import pandas, matplotlib, scipy.stats, omegaconf  # the report's own imports: part of the baseline
    sweep = Path(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    result = write_report(sweep)
    print(json.dumps({"seconds": time.monotonic() - started, "unreadable": result["unreadable"],
                      "grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                      "errors": sorted(r.get("error") or "" for r in result["rows"])}))
""")


def test_dev_zero_fifos_and_an_alias_bomb_cost_neither_time_nor_memory(tmp_path):
    """Before: a 370-byte alias bomb took collect_runs 135 s and 896 MB (the issue's 2.4 KB one: 106 s, 916 MB);
    /dev/zero as metrics.json ran into MemoryError at a 3 GB address-space limit; a FIFO hung for ever.
    Now each is one unreadable row, and the report is written in seconds without growing."""
    sweep = tmp_path / "sweep"
    _good_run(sweep / "good")
    (_good_run(sweep / "bomb") / "config.yaml").write_text(_alias_bomb())
    for name in ("status.json", "metrics.json"):
        zero, fifo = _good_run(sweep / f"zero_{name}"), _good_run(sweep / f"fifo_{name}")
        (zero / name).unlink()
        (zero / name).symlink_to("/dev/zero")
        (fifo / name).unlink()
        os.mkfifo(fifo / name)
    fifo_config = _good_run(sweep / "fifo_config")
    (fifo_config / "config.yaml").unlink()
    os.mkfifo(fifo_config / "config.yaml")
    done = subprocess.run([sys.executable, "-c", MEASURE, str(sweep)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["unreadable"] == 6 and measured["seconds"] < 30 and measured["grew_mb"] < 150, measured
    reasons = " ".join(measured["errors"])
    assert "alias bomb" in reasons and reasons.count("character device") == 2 and reasons.count("FIFO") == 3


# -- 4 + 6. one bad run folder is one line, the others are still reported ----------------------------------------
def _write(name: str, content: str | bytes):
    def make(run: Path) -> None:
        path = run / name
        path.unlink(missing_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return make


def _link(name: str, target: str):
    def make(run: Path) -> None:
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(target)
    return make


def _fifo(name: str):
    def make(run: Path) -> None:
        (run / name).unlink(missing_ok=True)
        os.mkfifo(run / name)
    return make


def _folder(name: str):
    def make(run: Path) -> None:
        (run / name).unlink(missing_ok=True)
        (run / name).mkdir()
    return make


def _sparse(name: str, size: int):
    def make(run: Path) -> None:
        with open(run / name, "wb") as handle:
            handle.truncate(size)
    return make


def _bad_manifest(run: Path) -> None:
    shards = run / "shards"
    shards.mkdir()
    (shards / "manifest.json").symlink_to("/dev/zero")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["shards"] = str(shards)
    (run / "config.yaml").write_text(yaml.safe_dump(config))


MARKER = "/tmp/tltrain_h4_yaml_tag_marker"
CASES = {
    "deep json metrics": (_write("metrics.json", "[" * 100_000 + "]" * 100_000), "nested"),
    "deep json status": (_write("status.json", '{"a":' * 200 + "1" + "}" * 200), "nested deeper than"),
    "5000-digit int": (_write("metrics.json", '{"test": {"kappa": ' + "9" * 5000 + "}}"), "not valid JSON"),
    "4000-digit int": (_write("metrics.json", '{"test": {"kappa": ' + "9" * 4000 + "}}"), "too large a number"),
    "NaN fraction": (_write("config.yaml", "data: {name: t, fraction: .nan}\n"), "data.fraction must be"),
    "infinite accuracy": (_write("metrics.json", '{"test": {"accuracy": Infinity}}'), "must lie in [-1, 1]"),
    "python tag": (_write("config.yaml", f"seed: !!python/object/apply:os.system ['touch {MARKER}']\n"), "YAML"),
    "unknown tag": (_write("config.yaml", "data: !secret {name: x}\n"), "YAML"),
    "alias bomb": (_write("config.yaml", _alias_bomb()), "alias bomb"),
    "binary config": (_write("config.yaml", bytes(range(256)) * 4), "not UTF-8"),
    "binary metrics": (_write("metrics.json", b"\x00\xff\xfe\x80junk" * 50), "not valid JSON"),
    "empty status": (_write("status.json", ""), "not valid JSON"),
    "non-UTF-8 status": (_write("status.json", b'{"state": "failed", "error": "\xff\xfe"}'), "not valid JSON"),
    "folder as metrics": (_folder("metrics.json"), "is a folder"),
    "folder as config": (_folder("config.yaml"), "is a folder"),
    "list as metrics": (_write("metrics.json", "[1, 2, 3]"), "expected a JSON object"),
    "list as config": (_write("config.yaml", "- a\n- b\n"), "mapping"),
    "string for a mapping": (_write("config.yaml", "data: fundus\nseed: 1\n"), "data must be a mapping"),
    "string as test block": (_write("metrics.json", '{"test": "passed"}'), "test must be an object"),
    "text as kappa": (_write("metrics.json", '{"test": {"kappa": "high"}}'), "must be a number"),
    "list as perf": (_write("metrics.json", '{"test": {"kappa": 0.1}, "perf": [1]}'), "perf must be an object"),
    "dict as confusion": (_write("metrics.json", '{"test": {"kappa": 0.1, "confusion": {"a": 1}}}'),
                          "confusion must be a list"),
    "no readable sample": (_write("metrics.json", '{"test": {"count": 0}}'), "read no sample"),
    "list as state": (_write("status.json", '{"state": ["completed"]}'), "state must be text"),
    "huge pid": (_write("status.json", '{"state": "running", "pid": 1' + "0" * 30 + ', "host": "h"}'),
                 "pid must be"),
    "huge seed": (_write("config.yaml", "seed: 1" + "0" * 40 + "\n"), "seed must be"),
    "dev/zero status": (_link("status.json", "/dev/zero"), "character device"),
    "dev/zero config": (_link("config.yaml", "/dev/zero"), "character device"),
    "FIFO metrics": (_fifo("metrics.json"), "FIFO"),
    "symlink loop": (_link("metrics.json", "metrics.json"), "cannot read"),
    "dangling symlink": (_link("status.json", "/nonexistent/status.json"), "cannot read"),
    "100 MB metrics": (_sparse("metrics.json", 100 << 20), "over the"),
    "damaged manifest": (_bad_manifest, "data.shards"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_one_bad_run_folder_is_one_line_and_the_report_goes_on(case, tmp_path, capsys):
    make, reason = CASES[case]
    sweep = tmp_path / "sweep"
    _good_run(sweep / "good")
    make(_good_run(sweep / "bad"))
    started = time.monotonic()
    assert main(["report", str(sweep)]) == 1  # the report is written, and the exit status says a folder was unreadable
    out, err = capsys.readouterr()
    assert time.monotonic() - started < 60
    assert "Traceback" not in out + err and "error:" not in err
    rows = {r["run"]: r for r in write_report(sweep)["rows"]}
    assert rows["good"]["status"] == "completed" and rows["good"]["kappa"] == 0.5
    bad = rows["bad"]
    assert bad["status"] == "unreadable" and reason in bad["error"] and "\n" not in bad["error"], bad
    assert str(sweep / "bad") in bad["error"]  # names the file
    assert "2 runs, 1 completed, 1 unreadable." in out
    assert not os.path.exists(MARKER)


def test_interpolations_in_a_shared_config_are_shown_not_resolved(tmp_path, monkeypatch):
    monkeypatch.setenv("TLTRAIN_H4_SECRET", "hunter2")
    run = _good_run(tmp_path / "sweep" / "a")
    (run / "config.yaml").write_text("data: {name: '${oc.env:TLTRAIN_H4_SECRET}'}\nschedule: {name: ${data.name}}\n")
    write_report(tmp_path / "sweep")
    assert "hunter2" not in (tmp_path / "sweep" / "report.md").read_text()
    assert "hunter2" not in (tmp_path / "sweep" / "report.csv").read_text()


# -- jobs: the registry and what it points at -------------------------------------------------------------------
def _entry(root: Path, job_id: str, run_dir: Path, **extra) -> dict:
    folder = root / "submitit"
    folder.mkdir(exist_ok=True)
    return {"job_id": job_id, "run_dir": str(run_dir), "overrides": ["seed=0"], "executor": "local",
            "folder": str(folder), "stderr": str(folder / f"{job_id}_0_log.err"), "submitted": 1.0, **extra}


def _registry(root: Path, *lines) -> Path:
    path = root / REGISTRY_NAME
    with open(path, "a") as handle:
        for line in lines:
            handle.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def test_record_job_never_writes_through_a_planted_link(tmp_path):
    """Chosen: O_APPEND | O_NOFOLLOW (parallel array tasks append; a read-and-rename would lose lines)."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / REGISTRY_NAME).symlink_to(victim)
    with pytest.raises(DataError, match="symbolic link"):
        record_job(tmp_path / "a" / REGISTRY_NAME, {"job_id": "1", "run_dir": "x"})
    (tmp_path / "b").mkdir()
    os.link(victim, tmp_path / "b" / REGISTRY_NAME)
    with pytest.raises(DataError, match="hard links"):
        record_job(tmp_path / "b" / REGISTRY_NAME, {"job_id": "1", "run_dir": "x"})
    (tmp_path / "c").mkdir()
    os.mkfifo(tmp_path / "c" / REGISTRY_NAME)
    started = time.monotonic()
    with pytest.raises(DataError, match="FIFO"):
        record_job(tmp_path / "c" / REGISTRY_NAME, {"job_id": "1", "run_dir": "x"})
    assert time.monotonic() - started < 2 and victim.read_bytes() == b"precious\n"
    record_job(tmp_path / REGISTRY_NAME, {"job_id": "1", "run_dir": "x"})
    record_job(tmp_path / REGISTRY_NAME, {"job_id": "2", "run_dir": "y"})
    assert [json.loads(line)["job_id"] for line in (tmp_path / REGISTRY_NAME).read_text().splitlines()] == ["1", "2"]


def _outside(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir(exist_ok=True)
    return outside


REGISTRY_CASES = {
    "damaged line": (lambda root: "{not json", "not a JSON line"),
    "a list": (lambda root: "[1, 2]", "expected a JSON object"),
    "deep line": (lambda root: "[" * 50 + "]" * 50, "nested deeper"),
    "dict as job id": (lambda root: _entry(root, "1", root / "r") | {"job_id": {"a": 1}}, "is not a job id"),
    "relative run_dir outside": (lambda root: _entry(root, "1", root / "r") | {"run_dir": "../../etc"},
                                 "points outside"),
    "run_dir with ..": (lambda root: _entry(root, "1", root / "r") | {"run_dir": "/tmp/../etc"}, "contains '..'"),
    "stderr outside the folder": (lambda root: _entry(root, "1", root / "r") | {"stderr": "/home/x/.ssh/id_rsa"},
                                  "outside the job's folder"),
    "stderr linked out": (lambda root: (_link_stderr(root), _entry(root, "9", root / "r"))[1],
                          "leads outside the folder"),
    "overrides not a list": (lambda root: _entry(root, "1", root / "r") | {"overrides": "seed=0"},
                             "overrides must be a list"),
    "unknown executor": (lambda root: _entry(root, "1", root / "r") | {"executor": "ssh"}, "is not 'slurm'"),
    "slurm id with a shell": (lambda root: _entry(root, "1;rm -rf ~", root / "r") | {"executor": "slurm"},
                              "not a SLURM job id"),
    "NaN submitted": (lambda root: json.dumps(_entry(root, "1", root / "r")).replace('"submitted": 1.0',
                                                                                   '"submitted": NaN'),
                      "submitted must be"),
}


def _link_stderr(root: Path) -> None:
    (root / "submitit").mkdir(exist_ok=True)
    (root / "submitit" / "9_0_log.err").symlink_to("/etc/passwd")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(REGISTRY_CASES))
def test_a_damaged_registry_line_is_one_row_and_the_listing_goes_on(case, tmp_path, capsys):
    make, reason = REGISTRY_CASES[case]
    good = _good_run(tmp_path / "good")
    _registry(tmp_path, _entry(tmp_path, "[/]7", good), make(tmp_path))
    rows = list_jobs(tmp_path)
    assert len(rows) == 2 and rows[0]["run_state"] == "completed" and rows[1]["state"] == "UNREADABLE", rows
    assert reason in rows[1]["error"] and "\n" not in rows[1]["error"] and f"{REGISTRY_NAME}:2" in rows[1]["error"]
    assert cli_jobs([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "1 of 2 jobs could not be read" in out and "Traceback" not in out + err and "root:x:" not in out


def _local_job(tmp_path: Path, status, outcome: str = "error") -> tuple[Path, dict]:
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps(status) if isinstance(status, dict) else status)
    entry = _entry(tmp_path, "4242", run)
    with open(Path(entry["folder"]) / "4242_0_result.pkl", "wb") as handle:
        pickle.dump((outcome, "Traceback ..." if outcome == "error" else {"status": "completed"}), handle)
    return run, entry


def test_jobs_prints_error_text_and_log_tails_without_terminal_escapes(tmp_path, capsys):
    run, entry = _local_job(tmp_path, {"state": "failed", "error": f"bad [bold]{ESCAPES}\nline2"})
    Path(entry["stderr"]).write_text(f"starting\n{ESCAPES} crashed [red]x[/red]\n")
    _registry(tmp_path, entry)
    assert cli_jobs([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "\x1b]0;" not in out and "\x07" not in out and "\x1b[2J" not in out and "\r" not in out
    assert "\\x1b]0;pwned" in out and "[bold]" in out and "[red]x[/red]" in out  # shown, not run or parsed


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plant", ["zero status", "fifo status", "deep metrics", "zero result", "fifo result",
                                   "text kappa"])
def test_jobs_reads_only_bounded_regular_files(tmp_path, plant, capsys):
    run, entry = _local_job(tmp_path, {"state": "completed"}, "success")
    result = Path(entry["folder"]) / "4242_0_result.pkl"
    target = {"zero status": run / "status.json", "fifo status": run / "status.json", "zero result": result,
              "fifo result": result}.get(plant)
    if target is not None:
        target.unlink()
        target.symlink_to("/dev/zero") if plant.startswith("zero") else os.mkfifo(target)
    elif plant == "deep metrics":
        (run / "metrics.json").write_text("[" * 10_000 + "]" * 10_000)
    else:
        (run / "metrics.json").write_text('{"final": {"kappa": "0.9"}}')
    _registry(tmp_path, entry)
    started = time.monotonic()
    [row] = list_jobs(tmp_path)
    assert time.monotonic() - started < 60
    assert row["state"] == "UNREADABLE" and row["error"] and "\n" not in row["error"], row
    assert cli_jobs([str(tmp_path)]) == 1 and "Traceback" not in capsys.readouterr().out


def test_log_tail_reads_only_the_end_of_a_huge_or_device_log(tmp_path):
    log = tmp_path / "huge.err"
    with open(log, "wb") as handle:
        handle.seek(4 << 30)  # a sparse 4 GB log
        handle.write(b"\nsecond to last\nthe end\n")
    started = time.monotonic()
    assert log_tail(log, 2) == ["second to last", "the end"]
    assert time.monotonic() - started < 2
    (tmp_path / "zero.err").symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.err"
    os.mkfifo(fifo)
    assert log_tail(tmp_path / "zero.err") == [] and log_tail(fifo) == []


def test_sweep_summary_reads_records_bounded_and_counts_unreadable_ones_as_failed(tmp_path):
    records = tmp_path / ".tltrain_runs"
    records.mkdir()
    (records / "0.json").write_text(json.dumps({"num": 0, "status": "completed"}))
    (records / "1.json").symlink_to("/dev/zero")
    os.mkfifo(records / "2.json")
    (records / "notes.json").write_text("{}")  # not a job record: used to crash int("notes")
    started = time.monotonic()
    runs = read_sweep_runs(tmp_path)
    assert time.monotonic() - started < 5
    assert [(r["num"], r["status"]) for r in runs] == [(0, "completed"), (1, "unreadable"), (2, "unreadable")]
    assert "character device" in runs[1]["error"] and "FIFO" in runs[2]["error"]


def test_job_run_dir_does_not_unpickle_the_submission():
    class Job:
        tltrain_run_dir = "/runs/a"

        def submission(self):
            raise AssertionError("unpickled the submission file")

    assert job_run_dir(Job()) == "/runs/a"


@pytest.mark.timeout(60)
def test_a_fifo_as_the_run_lock_hangs_neither_report_nor_jobs(tmp_path):
    """The `.tltrain.lock` FIFO (opened without blocking by engine.rundir.lock_state): the run's pid decides."""
    import socket

    dead = subprocess.Popen(["true"])
    dead.wait()
    run = _good_run(tmp_path / "sweep" / "run")
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": dead.pid, "host": socket.gethostname()}))
    os.mkfifo(run / ".tltrain.lock")
    _registry(tmp_path, _entry(tmp_path, "77", run, executor="slurm"))  # (no SLURM here: the run decides)
    started = time.monotonic()
    [row] = write_report(tmp_path / "sweep")["rows"]
    [job] = list_jobs(tmp_path)
    assert time.monotonic() - started < 60  # a hang would be for ever; 18 s was seen once on 2 loaded cores
    assert row["status"] == "stale" and job["state"] == "STALE"


def test_an_output_that_cannot_be_written_is_one_line(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _good_run(sweep / "a")
    (sweep / "report.md").mkdir()  # a folder where the report goes
    assert main(["report", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "report.md: cannot write the report" in err and len(err.splitlines()) == 1
