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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from tltrain.config import CONFIG_DIR, compose, to_typed
from tltrain.data.loaders.config import LoaderConfig
from tltrain.engine.config import MAX_SEED, TrainerConfig, check_number
from tltrain.errors import ConfigError, DataError, TltrainError, choices_error, os_error
from tltrain.safe_io import printable
from tltrain.transfer.schedule_config import ScheduleConfig


DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DataConfig:
    """Which shards to train on (a folder written by `tltrain prepare`) and which part of them."""

    name: str = "fundus"  # a label for reports (e.g. eyepacs, aptos, synthetic_fundus, target)
    shards: str = MISSING  # folder holding manifest.json and the shards
    fraction: float = 1.0  # nested training fraction recorded by prepare (0.1, 0.2, 0.25, 0.4, 0.6, 0.8, 1.0 by default)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"  # "" skips the final test evaluation
    verify_checksums: bool = True  # before training: each shard's size + sha256 against manifest.json (~0.7 CPU-s per GB)

    def validate(self) -> None:
        check_number("data.fraction", self.fraction, 0, 1, above=True)
        manifest = Path(self.shards) / "manifest.json"
        if not manifest.is_file():
            raise DataError(f"data.shards={self.shards!r}: no manifest.json there (run `tltrain prepare` first)")
        from tltrain.data.manifest import load_manifest  # bounded and validated before anything is built

        fractions = sorted(float(f) for f in load_manifest(self.shards).get("fractions", {}))
        if fractions and not any(abs(self.fraction - f) < 1e-9 for f in fractions):
            raise ConfigError(f"data.fraction={self.fraction!r} was not prepared in {manifest}; "
                              f"choose one of: {', '.join(f'{f:g}' for f in fractions)}")


@dataclass
class ModelConfig:
    """A timm architecture and, optionally, local weights to start from (file, tltrain run or export)."""

    arch: str = "resnet18"
    weights: str | None = None  # None = random init (from-scratch reference)
    trust_pickle: bool = False  # read a legacy pickled weights file with plain pickle (it could run code)
    drop_rate: float = 0.0

    def validate(self) -> None:
        from tltrain.timm_names import timm_model_names

        check_number("model.drop_rate", self.drop_rate, 0, 1, below=True)  # timm's dropout needs p < 1 to learn
        if not self.arch:
            raise ConfigError("model.arch is empty: name a timm architecture (e.g. model=resnet18 or "
                              "model.arch=resnet50; see timm.list_models())")
        if self.arch not in timm_model_names():
            import timm

            close = timm.list_models(f"*{self.arch}*")[:10]
            hint = f"; similar names: {', '.join(close)}" if close else "; see timm.list_models()"
            raise ConfigError(f"model.arch={self.arch!r} is not a timm model{hint}")
        if self.weights and not Path(self.weights).exists():
            raise DataError(f"model.weights={self.weights!r}: no such file or folder")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    run_dir: str = ""  # empty: Hydra's output folder (outputs/... or multirun/...)
    device: str = "auto"  # auto | cpu | cuda (cuda:<local rank> of each process)

    def validate(self) -> None:
        check_number("seed", self.seed, 0, MAX_SEED, integer=True)
        if self.device not in DEVICES:
            raise choices_error("device", self.device, DEVICES)
        for part in (self.data, self.model, self.loader, self.schedule, self.trainer):
            part.validate()
        if self.trainer.epochs is not None:
            raise ConfigError(f"trainer.epochs={self.trainer.epochs!r} is not used by tltrain train: the transfer "
                              "schedule sets the run's length; use schedule.epochs_per_phase (the whole run for "
                              "finetune_all/scratch/linear_probe/layer_decay), schedule.step_epochs (swft) or "
                              "schedule.phases (custom)")
        if self.schedule.name == "scratch" and self.model.weights:
            raise ConfigError("schedule=scratch is the random-init reference: set model.weights=null "
                              f"(got {self.model.weights!r}) or choose finetune_all")


def load_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Typed, validated run config; Hydra's own `hydra` node is not part of it. Paths become absolute."""
    node = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else cfg
    if isinstance(node, DictConfig) and "hydra" in node:
        node.pop("hydra")
    return absolute_paths(to_typed(node, RunConfig))


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """data.shards, model.weights and run_dir resolved against the folder the run was launched from, so the
    config.yaml a run writes means the same from any working directory (export, report, resume)."""
    base = Path.cwd()
    try:  # inside a Hydra app with hydra.job.chdir=true the cwd moved; Hydra remembers the launch folder
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            base = Path(HydraConfig.get().runtime.cwd)
    except (ImportError, ValueError):
        pass

    def absolute(path: str | None) -> str | None:
        return str((base / Path(path).expanduser()).resolve()) if path else path

    cfg.data.shards, cfg.model.weights, cfg.run_dir = (absolute(cfg.data.shards), absolute(cfg.model.weights),
                                                       absolute(cfg.run_dir))
    return cfg


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

    from tltrain.config import register_schemas
    from tltrain.engine.rundir import RunDirBusy

    register_schemas()
    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
    def _app(dict_cfg: DictConfig) -> Any:
        multirun = HydraConfig.get().mode.name == "MULTIRUN"
        run_dir = ""
        try:
            cfg = load_run_config(dict_cfg)
            if multirun:  # several runs in one run_dir would each resume the one before
                refuse_multirun_run_dir(cfg)
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
            # a sweep goes on past a failed run; the sweep's summary lists it (tltrain.launch.sweep)
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


#: Why a multirun refuses run_dir: one folder for several runs, each would resume the one before.
MULTIRUN_RUN_DIR = ("run_dir={run_dir!r} names one run's folder, but a multirun (-m) runs several: each would "
                    "resume the previous one's run there; refused. Use hydra.sweep.dir=FOLDER instead (one folder "
                    "per run, FOLDER/<num>_<overrides>), or `tltrain submit` for one run on SLURM")
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


def refuse_multirun_run_dir(config) -> None:
    """ConfigError when a multirun's config sets run_dir (from the command line or a config file).

    Called in each job before anything is written; a Hydra callback's on_multirun_start may call it too, to stop
    the sweep before any job starts."""
    run_dir = config.get("run_dir") if hasattr(config, "get") else getattr(config, "run_dir", "")
    if run_dir:
        raise ConfigError(MULTIRUN_RUN_DIR.format(run_dir=str(run_dir)))


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
