"""`tltrain train`: one run = data (shards) + model (timm) + transfer schedule + trainer, from one Hydra config.

The Hydra app (configs/config.yaml) is what sweeps and the SLURM launcher call; `train_from_overrides` is the
same run as a plain function (used by the demo, the launcher and tests). A run resumes by itself from the
checkpoints in its run_dir, so a requeued job simply calls it again.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

# The run's schema and its one check live in tltrain.config; re-exported here, where tests and scripts import them.
from tltrain.config import (  # noqa: F401
    CONFIG_DIR, DEVICES, MULTIRUN_RUN_DIR, DataConfig, ModelConfig, RunConfig, absolute_paths, compose,
    load_run_config, refuse_multirun_run_dir, register_schemas)
from tltrain.errors import ConfigError, TltrainError, os_error
from tltrain.safe_io import printable


def run(cfg: RunConfig) -> dict:
    """Train (or resume) one run and evaluate it; returns the trainer's result with test metrics added."""
    import contextlib

    from tltrain.engine.distributed import leave_process_group, read_env
    from tltrain.engine.rundir import RunDirBusy, claim_run_dir
    from tltrain.runner import run_transfer

    if not cfg.run_dir:
        raise ConfigError("run_dir is empty: pass run_dir=... (the Hydra app sets it to its output folder)")
    started = time.time()
    # one run per run_dir: rank 0 holds its lock until the run ends (a second run there stops with exit 2)
    lock = claim_run_dir(cfg.run_dir) if read_env().is_main else contextlib.nullcontext()
    try:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        with lock:
            result = run_transfer(cfg)
    except RunDirBusy:
        raise  # the folder of another, live run: its status is not ours to change
    except TltrainError as exc:
        mark_failed(cfg.run_dir, str(exc))
        raise
    except OSError as exc:  # full disk, quota, read-only folder, files deleted under a running job
        error = os_error(exc, folder=cfg.run_dir)
        mark_failed(cfg.run_dir, str(error))
        raise error from exc
    except Exception as exc:  # a bug or a library failure: the traceback follows, status.json says why
        mark_failed(cfg.run_dir, f"{type(exc).__name__}: {exc}")
        raise
    leave_process_group()
    result.setdefault("wall_time_s", time.time() - started)
    return result


def mark_failed(run_dir: str | Path, reason: str) -> None:
    """status.json = failed with the reason (rank 0 only; best effort: on a full disk even this may not land)."""
    from tltrain.run_folder import RunFolder

    if os.environ.get("RANK", "0") == "0" and run_dir:
        RunFolder(run_dir).mark_failed(reason)


def train_from_overrides(overrides: list[str]) -> dict:
    """The whole run from Hydra-style overrides, without Hydra's app machinery (no output-dir change)."""
    cfg = load_run_config(compose("config", overrides))
    return run(cfg)


def _exit_code(result: dict) -> int:
    return int(result.get("exit_code", 0))


def hydra_main() -> None:
    """Entry of `tltrain train ...`: Hydra parses the command line (sweeps with -m, launchers, overrides)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from tltrain.engine.rundir import RunDirBusy

    register_schemas()

    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
    def _app(dict_cfg: DictConfig) -> Any:
        multirun = HydraConfig.get().mode.name == "MULTIRUN"
        run_dir = ""
        try:
            cfg = load_run_config(dict_cfg, multirun=multirun)  # a sweep's job must not set run_dir
            if not cfg.run_dir:
                if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "SUBMITIT_EXECUTOR" not in os.environ:
                    # each rank's Hydra would pick its own timestamped folder: they must share one
                    raise ConfigError("multi-process runs (torchrun/srun) need an explicit run_dir=... shared by "
                                      "all ranks")
                cfg.run_dir = HydraConfig.get().runtime.output_dir
            run_dir = cfg.run_dir
            result = run(cfg)
        except TltrainError as exc:
            print(f"error: {printable(exc, None, keep_newlines=True)}", file=sys.stderr, flush=True)
            if not multirun:
                raise SystemExit(getattr(exc, "exit_code", 2)) from None
            # a sweep goes on past a failed run; the sweep's summary lists it (tltrain.launch.summary)
            if not isinstance(exc, RunDirBusy):  # a busy run_dir's status belongs to the live run there
                mark_failed(run_dir or HydraConfig.get().runtime.output_dir, str(exc))
            result = {"status": "failed", "exit_code": 2, "error": str(exc), "run_dir": run_dir}
        except Exception as exc:
            if not multirun:
                raise
            traceback.print_exc()
            reason = f"{type(exc).__name__}: {exc}"
            mark_failed(run_dir or HydraConfig.get().runtime.output_dir, reason)
            result = {"status": "failed", "exit_code": 1, "error": reason, "run_dir": run_dir}
        if multirun:
            record_sweep_run(result, run_dir or HydraConfig.get().runtime.output_dir)
        code = _exit_code(result)
        if code and not multirun:
            raise SystemExit(code)
        return {k: v for k, v in result.items()
                if k in ("status", "step", "epoch", "run_dir", "final", "test", "error")}

    refuse_unsafe_hydra_argv(sys.argv[1:])
    with _logging_restored(), _log_files_follow_no_link():
        _app()


#: Hydra's command-line flags that unpickle a file (Hydra's --experimental-rerun loads config.pickle).
PICKLE_FLAGS = ("--experimental-rerun",)


def refuse_unsafe_hydra_argv(argv: list[str]) -> None:
    """ConfigError for a flag that would make Hydra unpickle a file (which can run any code). argparse also takes
    an unambiguous prefix of a flag (--experimental) and --flag=value, so those count too."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--e") and any(name.startswith(flag) for name in PICKLE_FLAGS):
            raise ConfigError(f"{printable(flag, 100)}: Hydra's --experimental-rerun loads a pickle file, which can "
                              "run any code; refused. Re-run with the same overrides instead (a run resumes from "
                              "its run_dir)")


class NoFollowFileHandler(logging.FileHandler):
    """logging.FileHandler that opens its file without following a symbolic link and never waits on a FIFO.

    Hydra logs each job to <run_dir>/train_app.log; in a shared run folder a link planted there would otherwise
    have every log line appended to the file it points at. A link is removed (the log starts anew); a FIFO or
    device is refused with the run folder's one-line error."""

    def _open(self):
        path = Path(self.baseFilename)
        if path.is_symlink():
            path.unlink()
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        flags |= os.O_TRUNC if "w" in self.mode else os.O_APPEND
        fd = os.open(path, flags, 0o666)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file (a FIFO or device?); refused as the log file", str(path))
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


@contextlib.contextmanager
def _log_files_follow_no_link():
    """Hydra's job logging config names logging.FileHandler; while the app runs that name means NoFollowFileHandler
    (dictConfig looks the class up by name when it configures each job's log)."""
    original = logging.FileHandler
    logging.FileHandler = NoFollowFileHandler
    try:
        yield
    finally:
        logging.FileHandler = original


@contextlib.contextmanager
def _logging_restored():
    """Hydra points the root logger at <run_dir>/train_app.log and leaves it so: called in-process (cli.main from
    Python or a test), the next run's log lines would go to this run's file, or fail once it is deleted. Close
    and drop the handlers Hydra added, put back the ones its logging config replaced, and restore the level."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        for handler in [h for h in handlers if h not in root.handlers]:
            root.addHandler(handler)
        root.setLevel(level)


def record_sweep_run(result: dict, run_dir: str) -> None:
    """One file per sweep job under <sweep dir>/.tltrain_runs/, read by the sweep summary at the end (the jobs may
    run in other processes or on other nodes, so the launching process learns their outcome from files)."""
    from hydra.core.hydra_config import HydraConfig

    from tltrain.engine.checkpoint import atomic_write_json

    hc = HydraConfig.get()
    folder = Path(hc.sweep.dir) / ".tltrain_runs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / f"{hc.job.num}.json", {
            "num": hc.job.num, "overrides": list(hc.overrides.task), "run_dir": str(Path(run_dir).resolve()),
            "status": result.get("status"), "error": result.get("error")})
    except OSError:
        pass


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    hydra_main()
