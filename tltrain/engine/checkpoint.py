"""Checkpoints: atomic, pruned (last N + best), resumable, and consolidated to a plain state dict for export.

Layout under <run_dir>/checkpoints/:
  step-00000420.pt           single/DDP: one file {model, optimizer, scaler, ema, trainer}, written by rank 0
  step-00000420/             DeepSpeed: the engine's own tag folder (every rank writes its ZeRO partition)
     tltrain_trainer.pt      ... plus our trainer state (epoch, step, RNG, phase, config), written by rank 0
  step-00000360.weights.pt   after a completed run with trainer.keep_after_run=best: only the best checkpoint's
                             evaluated weights ({"model": fp32 state dict}), everything else removed
  index.json                 the list of complete checkpoints, latest and best; rewritten atomically LAST,
                             so a checkpoint killed half-written is never referenced and resume skips it.
                             "after_run" (best | none) marks a completed run whose checkpoints were pruned.

Our files hold only tensors and plain containers (numpy arrays such as numpy's RNG state are stored as tagged
byte tensors, see `to_plain`), so they load with torch.load(weights_only=True): resuming from, or starting from,
a checkpoint folder someone else wrote never runs code. DeepSpeed's own files load under
tltrain.safe_load.deepspeed_weights_only.
"""
from __future__ import annotations

import io
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tltrain.engine.config import KEEP_AFTER_RUN
from tltrain.engine.distributed import barrier
from tltrain.errors import DataError, os_error
from tltrain.run_folder import RunFolder
from tltrain.safe_io import MiB, atomic_write_bytes, atomic_write_json  # noqa: F401 (re-exported)
from tltrain.safe_io import finite_number, load_json, plain_name, printable
from tltrain.safe_load import deepspeed_weights_only, torch_load

INDEX = "index.json"
INDEX_LIMIT = 16 * MiB  # ~150 bytes an entry; a run lists keep_last + 1 of them
TRAINER_STATE = "tltrain_trainer.pt"
CHECKPOINT_NAME = re.compile(r"step-\d{8}(\.weights)?(\.pt)?$")
#: The name an index entry may have (the file or tag folder adds a suffix by kind, see entry_filename).
ENTRY_NAME = re.compile(r"step-\d{8}")
AFTER_RUN_MARKS = (None, "best", "none")
#: What DeepSpeed writes beside its tag folders (removed with them after a run).
DEEPSPEED_EXTRAS = ("latest", "zero_to_fp32.py", "zero_to_torch.py")


@dataclass(frozen=True)
class EntryKind:
    """How one kind of index entry lies on disk: the one place the kinds differ (no `if kind == ...` elsewhere)."""

    suffix: str  # step-NNNNNNNN + suffix: the entry's file or folder
    state_file: str | None = None  # a folder entry: the file in it holding our part (None: the entry is that file)
    zero_partitions: bool = False  # its weights are ZeRO partitions (merged by deepspeed.utils.zero_to_fp32)
    extras: tuple[str, ...] = ()  # what its writer keeps beside the entries (removed with them after a run)


#: Index entry kinds: a single-file checkpoint, a DeepSpeed tag folder, the best weights kept after a run.
ENTRY_KINDS = {"file": EntryKind(".pt"),
               "deepspeed": EntryKind("", state_file=TRAINER_STATE, zero_partitions=True, extras=DEEPSPEED_EXTRAS),
               "weights": EntryKind(".weights.pt")}


def entry_filename(entry: dict, where: str = "checkpoint index") -> str:
    """The file (or DeepSpeed tag folder) name of an index entry; DataError unless its name is step-NNNNNNNN and
    its kind a known one, so no name read from index.json can lead outside the checkpoints folder."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: checkpoint entry {str(entry)[:100]!r} is not an object; refused")
    name = plain_name(entry.get("name"), ENTRY_NAME, where, "checkpoint name")
    kind = entry.get("kind")
    if kind not in ENTRY_KINDS:
        raise DataError(f"{where}: checkpoint {name} has kind {str(kind)[:50]!r}, not one of "
                        f"{', '.join(ENTRY_KINDS)}; refused")
    return name + ENTRY_KINDS[kind].suffix


def _check_entry(entry, where: str) -> dict:
    """An index entry as resume and pruning use it: a valid name and kind, whole numbers where numbers go."""
    entry_filename(entry, where)
    finite_number(entry.get("step"), f"{where}: {entry['name']} step", low=0, integer=True)
    for key in ("epoch", "batch_in_epoch"):
        if key in entry:
            finite_number(entry[key], f"{where}: {entry['name']} {key}", low=0, integer=True)
    return entry


def check_index(index, where: str) -> dict:
    """index.json as written by CheckpointManager._record, checked before any path is built from it."""
    for entry in _index_entries(index, where):
        _check_entry(entry, where)
    names = {entry["name"] for entry in index["checkpoints"]}
    for key in ("latest", "best"):
        value = index.setdefault(key, None)
        if value is not None and value not in names:
            plain_name(value, ENTRY_NAME, where, f"{key} checkpoint")
    if index.setdefault("best_value", None) is not None:
        finite_number(index["best_value"], f"{where}: best_value")
    if index.get("after_run") not in AFTER_RUN_MARKS:
        raise DataError(f"{where}: after_run={str(index.get('after_run'))[:50]!r} is not one of best, none; refused")
    return index


def _index_entries(index, where: str) -> list:
    if not isinstance(index, dict) or not isinstance(index.get("checkpoints"), list):
        raise DataError(f"{where}: not a checkpoint index (expected an object with a \"checkpoints\" list)")
    return index["checkpoints"]


def _load_index(ckpt_dir: str | Path):
    """The parsed index.json (bounded: a regular file, INDEX_LIMIT bytes), or None when there is none."""
    path = Path(ckpt_dir) / INDEX
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return load_json(path, INDEX_LIMIT, "checkpoint index")
    except OSError as exc:
        raise os_error(exc, "reading the checkpoint index") from None


def read_index(ckpt_dir: str | Path) -> dict:
    """<ckpt_dir>/index.json, bounded and checked; an empty index when there is none."""
    index = _load_index(ckpt_dir)
    if index is None:
        return {"checkpoints": [], "latest": None, "best": None, "best_value": None}
    return check_index(index, str(Path(ckpt_dir) / INDEX))


def listed_files(ckpt_dir: str | Path) -> set[str]:
    """The file and tag folder names index.json lists (names checked; the other fields are resume's concern)."""
    index = _load_index(ckpt_dir)
    where = str(Path(ckpt_dir) / INDEX)
    return set() if index is None else {entry_filename(entry, where) for entry in _index_entries(index, where)}


def remove_path(path: Path) -> None:
    """Delete a checkpoint file or tag folder; a symbolic link is removed itself, never what it points to."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def checkpoints_folder(run_dir: str | Path) -> Path:
    """<run_dir>/checkpoints; refused when it is a symbolic link (pruning would delete files where it points)."""
    folder = RunFolder(run_dir).checkpoints
    if folder.is_symlink():
        raise DataError(f"{folder}: the checkpoints folder is a symbolic link (to {printable(os.readlink(folder), 200)}"
                        "); refused: a run reads, writes and deletes checkpoints only inside its own folder")
    return folder


def atomic_torch_save(obj, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


NDARRAY_TAG = "__tltrain_ndarray__"


def to_plain(obj):
    """`obj` with numpy arrays as tagged byte tensors and numpy scalars as Python numbers (exact round trip).

    What torch.save then writes needs no global beyond tensors and containers. Containers with nothing to convert
    are returned as they are (a module state dict keeps its OrderedDict and version _metadata).
    """
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"cannot store a numpy array of Python objects ({obj.dtype}) in a checkpoint")
        data = torch.from_numpy(np.ascontiguousarray(obj).reshape(-1).view(np.uint8).copy())
        return {NDARRAY_TAG: data, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return _map_children(obj, to_plain)


def _map_children(obj, fn):
    """fn applied to the values of a dict, list or tuple (the container itself kept when nothing changed)."""
    if isinstance(obj, dict):
        items = {key: fn(value) for key, value in obj.items()}
        return obj if all(items[k] is obj[k] for k in obj) else dict(items)
    if isinstance(obj, (list, tuple)):
        items = [fn(value) for value in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return list(items) if isinstance(obj, list) else tuple(items)
    return obj


def from_plain(obj):
    """Inverse of `to_plain`: tagged byte tensors back to numpy arrays of their dtype and shape."""
    if isinstance(obj, dict) and NDARRAY_TAG in obj:
        return _tagged_array(obj)
    return _map_children(obj, from_plain)


def _tagged_array(obj: dict) -> np.ndarray:
    """The numpy array of a tagged byte tensor, its dtype, shape and byte count checked before anything is built
    (a checkpoint someone else wrote may declare a shape its bytes do not hold)."""
    data, dtype, shape = obj[NDARRAY_TAG], obj.get("dtype"), obj.get("shape")
    problem = ""
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
        problem = "its data is not a 1-D uint8 tensor"
    elif not isinstance(shape, (list, tuple)) or len(shape) > 32 or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        problem = f"shape {shape!r} is not a list of whole numbers"
    else:
        try:
            dtype = np.dtype(dtype) if isinstance(dtype, str) else None
        except TypeError:
            dtype = None
        if dtype is None or dtype.hasobject:
            problem = f"dtype {obj.get('dtype')!r} is not a plain numpy dtype"
        elif math.prod(shape) * dtype.itemsize != data.numel():
            problem = f"shape {list(shape)} of {dtype} needs {math.prod(shape) * dtype.itemsize} bytes, it holds " \
                      f"{data.numel()}"
    if problem:
        raise DataError(f"checkpoint holds a malformed numpy array: {problem}; refused")
    return np.frombuffer(data.numpy().tobytes(), dtype=dtype).reshape(shape).copy()


def remove_stale_writes(run_dir: str | Path) -> list[Path]:
    """Delete what a killed run left half-written: atomic_write_bytes' temporaries (.NAME.XXXX.tmp) in the run
    folder and its checkpoint folders, and checkpoints that never reached index.json (killed between the file
    and the index). Call only while holding the run_dir (rundir.claim_run_dir): a live writer's files look the
    same. Returns the removed paths."""
    run_dir = Path(run_dir)
    ckpt_dir = RunFolder(run_dir).checkpoints
    own_ckpt_dir = ckpt_dir.is_dir() and not ckpt_dir.is_symlink()  # a link: resume refuses it, clean nothing there
    tag_dirs = [p for p in ckpt_dir.glob("step-*") if p.is_dir() and not p.is_symlink()] if own_ckpt_dir else []
    folders = [run_dir, *([ckpt_dir] if own_ckpt_dir else []), *tag_dirs]
    removed = [p for folder in folders for p in folder.glob(".*.tmp") if p.is_file() and not p.is_symlink()]
    if own_ckpt_dir:
        try:
            listed = listed_files(ckpt_dir)
        except (OSError, DataError):
            listed = None  # a damaged index: resume reports it; delete nothing it might still name
        if listed is not None:
            removed += [p for p in ckpt_dir.iterdir() if CHECKPOINT_NAME.match(p.name) and p.name not in listed]
    for path in removed:
        remove_path(path)
    return removed


def _own_file(path: Path, ckpt_dir: Path) -> None:
    """DataError unless path, and each folder between it and ckpt_dir, is itself a regular file/folder of the
    checkpoints folder: a link (to /dev/zero, to a file elsewhere) or a FIFO is never read."""
    part = path
    while part != ckpt_dir:
        try:
            mode = part.lstat().st_mode
        except FileNotFoundError:
            raise DataError(f"{path}: checkpoint listed in {ckpt_dir / INDEX} is missing") from None
        expected = stat.S_ISREG if part == path else stat.S_ISDIR
        if not expected(mode):
            raise DataError(f"{part}: a checkpoint {'file' if part == path else 'folder'} that is a symbolic link or "
                            "not a regular file; refused")
        part = part.parent


class CheckpointManager:
    """Saves, lists, prunes and finds checkpoints of one run; collective calls must be made on every rank."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2, best_metric: str = "kappa", best_mode: str = "max",
                 is_main: bool = True, trust_pickle: bool = False, every_steps: int = 0):
        self.run_dir, self.dir = Path(run_dir), checkpoints_folder(run_dir)
        self.keep_last, self.best_metric, self.best_mode, self.is_main = keep_last, best_metric, best_mode, is_main
        self.trust_pickle = trust_pickle  # True only for legacy checkpoints the user wrote (plain pickle)
        self.every_steps = every_steps  # trainer.checkpoint_every_steps (0: at epoch ends only)
        self.saved_step: int | None = None  # optimizer step of the latest checkpoint written or resumed from
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)

    # -- when to save ---------------------------------------------------------------------------------------
    def due(self, step: int, mid_epoch: bool) -> bool:
        """Whether optimizer step `step` gets a checkpoint of its own: every `every_steps` steps inside an epoch
        (an epoch's last step is saved by the epoch end, with its validation metrics)."""
        return bool(self.every_steps) and step % self.every_steps == 0 and mid_epoch

    def has(self, step: int) -> bool:
        """Whether the latest checkpoint written or resumed from already is the state after `step`."""
        return self.saved_step == step

    # -- index ----------------------------------------------------------------------------------------------
    def index(self) -> dict:
        """index.json, read bounded and checked: every entry a step-NNNNNNNN name of a known kind."""
        return read_index(self.dir)

    def latest(self) -> dict | None:
        index = self.index()
        return next((c for c in index["checkpoints"] if c["name"] == index["latest"]), None)

    def best(self) -> dict | None:
        index = self.index()
        return next((c for c in index["checkpoints"] if c["name"] == index["best"]), None)

    def _is_better(self, value: float | None, best: float | None) -> bool:
        if value is None or value != value:  # None or NaN never wins
            return False
        if best is None:
            return True
        return value > best if self.best_mode == "max" else value < best

    # -- save -----------------------------------------------------------------------------------------------
    def save(self, strategy, trainer_state: dict, metrics: dict | None = None, extra: dict | None = None) -> str:
        """Write a checkpoint for trainer_state["step"]; call on every rank. Returns its name."""
        name = f"step-{trainer_state['step']:08d}"
        if self.is_main:  # a link planted at a name we write would be written through (DeepSpeed writes itself)
            for planted in (self.dir / name, self.dir / f"{name}.pt", *(self.dir / n for n in DEEPSPEED_EXTRAS)):
                if planted.is_symlink():
                    planted.unlink()
        if strategy.saves_with_engine:
            barrier()  # every rank writes its partition into the tag folder: only after a planted link is gone
            strategy.save(self.dir, name, client_state={"tltrain": True})
            barrier()
            if self.is_main:
                atomic_torch_save(to_plain(trainer_state), self.dir / name / TRAINER_STATE)
            kind = "deepspeed"
        else:
            if self.is_main:
                atomic_torch_save(to_plain({**strategy.state_dict(), **(extra or {}), "trainer": trainer_state}),
                                  self.dir / f"{name}.pt")
            kind = "file"
        if self.is_main:
            self._record(name, kind, trainer_state, metrics)
        barrier()
        self.saved_step = trainer_state["step"]
        return name

    def _record(self, name: str, kind: str, trainer_state: dict, metrics: dict | None) -> None:
        index = self.index()
        value = (metrics or {}).get(self.best_metric)
        entry = {"name": name, "kind": kind, "step": trainer_state["step"], "epoch": trainer_state["epoch"],
                 "batch_in_epoch": trainer_state.get("batch_in_epoch", 0), self.best_metric: value}
        index["checkpoints"] = [c for c in index["checkpoints"] if c["name"] != name] + [entry]
        index["latest"] = name
        if self._is_better(value, index.get("best_value")):
            index["best"], index["best_value"] = name, value
        keep = {c["name"] for c in sorted(index["checkpoints"], key=lambda c: c["step"])[-self.keep_last:]}
        keep.add(index["best"])
        removed = [c for c in index["checkpoints"] if c["name"] not in keep]
        index["checkpoints"] = [c for c in index["checkpoints"] if c["name"] in keep]
        atomic_write_json(self.dir / INDEX, index)  # the commit point: only now is the checkpoint "there"
        for entry in removed:
            self._delete(entry)

    def _delete(self, entry: dict) -> None:
        remove_path(self.path_of(entry))

    def path_of(self, entry: dict) -> Path:
        return self.dir / entry_filename(entry, str(self.dir / INDEX))

    # -- after a completed run ------------------------------------------------------------------------------
    def prune_after_run(self, keep: str) -> list[str]:
        """Shrink a completed run's checkpoints (main rank only): `all` keeps them (the run can still be extended
        with more epochs), `best` keeps only the best checkpoint's evaluated weights (EMA when enabled) as one fp32
        file (no optimizer state, ZeRO partitions merged), `none` removes them all (metrics, predictions and
        TensorBoard stay). A sweep of many runs otherwise keeps up to keep_last + 1 full checkpoints per run.
        Crash-safe: the weights file is written first, index.json (marked "after_run") commits, then the rest
        goes. Returns the removed names."""
        if keep not in KEEP_AFTER_RUN:
            raise DataError(f"trainer.keep_after_run={keep!r}: expected one of {', '.join(KEEP_AFTER_RUN)}")
        index = self.index()
        if keep == "all" or index.get("after_run"):
            return []
        kept = []
        which = "best" if index.get("best") else "latest"  # with no best (nothing validated), the last one
        chosen = next((c for c in index["checkpoints"] if c["name"] == index.get(which)), None)
        if keep == "best" and chosen is not None:
            state = consolidate_checkpoint(self.run_dir, which, trust_pickle=self.trust_pickle)
            slim = {**{k: chosen[k] for k in chosen if k != "kind"}, "kind": "weights"}
            atomic_torch_save({"model": state, "trainer": {"step": chosen["step"], "epoch": chosen["epoch"]}},
                              self.path_of(slim))
            kept = [slim]
        removed = index["checkpoints"]
        # "latest" is gone (the final training state); the kept weights are the best (or, with no best, the last)
        index.update(checkpoints=kept, latest=None, best=kept[0]["name"] if kept else None, after_run=keep)
        atomic_write_json(self.dir / INDEX, index)
        for entry in removed:
            self._delete(entry)
        for name in {extra for entry in removed for extra in ENTRY_KINDS[entry["kind"]].extras}:
            (self.dir / name).unlink(missing_ok=True)  # DeepSpeed's pointer to its last tag, its scripts
        return [entry["name"] for entry in removed]

    def pruned_message(self, what: str) -> str | None:
        """Why a completed run has no checkpoint for `what` (None when it was not pruned)."""
        after_run = self.index().get("after_run")
        if after_run == "none":
            return (f"{self.run_dir}: the run completed with trainer.keep_after_run=none, so its checkpoints were "
                    f"removed and there are no weights for {what}; its metrics and predictions are still there. "
                    f"Run it again with trainer.keep_after_run=best (or all) to keep weights")
        if after_run == "best":
            return (f"{self.run_dir}: the run completed with trainer.keep_after_run=best; only the best "
                    f"checkpoint's weights were kept, not the training state {what} needs")
        return None

    # -- load -----------------------------------------------------------------------------------------------
    def read(self, entry: dict) -> dict:
        """The checkpoint's content: for a file everything; for DeepSpeed only {"trainer": ...} (the engine loads
        the rest)."""
        path, state_file = self.path_of(entry), ENTRY_KINDS[entry["kind"]].state_file
        target = path / state_file if state_file else path
        _own_file(target, self.dir)
        obj = from_plain(torch_load(target, trust_pickle=self.trust_pickle, what="checkpoint",
                                    source=self.run_dir))  # a refused file: convert the run (its weights)
        if not isinstance(obj, dict):
            raise DataError(f"{target}: not a tltrain checkpoint (found {type(obj).__name__})")
        return {"trainer": obj} if state_file else obj

    def engine_loads(self, entry: dict):
        """Context for DeepSpeed reading `entry`'s tag folder itself: its torch.load calls run weights-only."""
        return deepspeed_weights_only(self.path_of(entry), self.run_dir, trust_pickle=self.trust_pickle)


def consolidate_checkpoint(run_dir: str | Path, which: str = "latest",
                           trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A plain fp32 state dict of the model from a run's latest (or best) checkpoint, for any strategy.

    These are the weights the run evaluated: the EMA average when trainer.ema_decay > 0 (validation and test use
    it), else the trained weights. DeepSpeed ZeRO partitions are merged with deepspeed.utils.zero_to_fp32 (works
    on CPU, no process group), its file reads made weights-only.
    """
    manager = CheckpointManager(run_dir, is_main=False, trust_pickle=trust_pickle)
    # a run pruned to its best weights (trainer.keep_after_run=best) offers those as its weights
    entry = manager.best() if which == "best" else (manager.latest() or manager.best())
    if entry is None:
        raise DataError(manager.pruned_message("its weights")
                        or f"{manager.dir}: no {which} checkpoint (is this a tltrain run directory?)")
    if ENTRY_KINDS[entry["kind"]].zero_partitions:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with manager.engine_loads(entry):
            state = get_fp32_state_dict_from_zero_checkpoint(str(manager.dir), tag=entry["name"])
    else:
        content = manager.read(entry)
        state = content.get("ema") or content["model"]  # ModelEmaV3's keys carry a "module." prefix, removed below
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v.float() if v.is_floating_point() else v
            for k, v in state.items()}
