"""Reading files that someone else may have written: data formats only, never code.

tltrain reads weights and checkpoints with safetensors, JSON, numpy without pickle, or
`torch.load(weights_only=True)`, whose unpickler only rebuilds tensors and plain containers (dict, list, tuple,
str, numbers) and refuses every other Python object. A file that holds other objects (a legacy pickle, or one
crafted to run a command when unpickled) is refused with one line naming the file; only an explicit opt-in
(`model.trust_pickle=true`, `tltrain convert-weights ... --trust-pickle`) reads it with plain pickle.

DeepSpeed reads its own checkpoint files with `torch.load(weights_only=False)`; `deepspeed_weights_only` makes
those loads weights-only too (see docs/architecture.md, "What is trusted").

TorchScript archives are refused before torch sees them: torch < 2.6 hands such a file to torch.jit.load even
with weights_only=True (CVE-2025-32434), which runs the archive's TorchScript code (e.g. a `__setstate__`).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from tltrain.errors import DataError

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch >= 2.4: forces weights_only=True even where False
FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # torch refuses both at once: unset during our loads


class PickleRefused(DataError):
    """A file holds pickled Python objects that could run code; it was not loaded."""


def refusal(path: str | Path, detail: str = "", source: str | Path | None = None) -> PickleRefused:
    """The one-line error for a refused pickle: the file, why, and how to convert `source` (default: the file)."""
    path, source = Path(path), Path(source or path)
    why = f" ({detail})" if detail else ""
    return PickleRefused(
        f"{path}: refused to load: it holds pickled Python objects{why} that could run code on this machine; "
        f"if you trust whoever wrote it, convert it once with `tltrain convert-weights {source} "
        f"{source.with_suffix('.safetensors').name} --trust-pickle` and use the .safetensors file")


def _refused_detail(message: str, path: Path | None = None) -> str | None:
    """What torch's weights-only unpickler refused, or None when the error is not such a refusal (e.g. junk)."""
    if "Weights only load failed" not in message:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", message) or re.search(r"Unsupported class ([\w.]+)", message)
    if found:
        return f"global {found.group(1)}"
    operand = re.search(r"Unsupported operand (\d+)", message)
    if operand:  # a pickle (protocol >= 2 opening, or torch's zip) using opcodes outside the weights-only subset
        return f"pickle opcode {operand.group(1)}, outside torch's weights-only subset" if _looks_pickled(path) \
            else None
    return "objects other than tensors and plain containers"


def _looks_pickled(path: Path | None) -> bool:
    """True for a torch zip file or a pickle stream with a protocol opcode; False for other bytes (junk)."""
    if path is None:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError:
        return False
    return head[:2] == b"PK" or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def is_torchscript_archive(path: str | Path) -> bool:
    """True when torch.load would hand `path` to torch.jit.load: a zip (by its first bytes) whose records, read
    with torch's own zip reader, include constants.pkl (the test torch.load itself makes, 2.4 to 2.14)."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"PK\x03\x04":
                return False
        records = torch._C.PyTorchFileReader(str(path)).get_all_records()
    except Exception:  # unreadable or not a torch zip: torch.load reports it itself
        return False
    return "constants.pkl" in records


def torchscript_refusal(path: str | Path, source: str | Path | None = None) -> PickleRefused:
    """The one-line refusal of a TorchScript archive (torch.load runs its code; torch < 2.6 even weights-only)."""
    return refusal(path, "a TorchScript archive, whose code torch runs while loading it, on torch < 2.6 even with "
                         "weights_only=True", source)


def torch_load(path: str | Path, *, trust_pickle: bool = False, what: str = "weights",
               source: str | Path | None = None):
    """torch.load on CPU with weights_only=True (plain pickle only with trust_pickle); errors name the file.

    source: what a refusal tells the user to convert (default: the file itself; a run dir for its checkpoints)."""
    path = Path(path)
    if not trust_pickle and is_torchscript_archive(path):
        raise torchscript_refusal(path, source)
    try:
        with _no_forced_pickle(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)  # refused anyway
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        detail = None if trust_pickle else _refused_detail(str(exc), path)
        if detail is not None:
            raise refusal(path, detail, source) from None
        why = "not a PyTorch or safetensors file" if "Weights only load failed" in str(exc) else _first_line(exc)
        raise DataError(f"{path}: cannot read {what} ({why})") from None
    except Exception as exc:  # corrupt, truncated or foreign file
        raise DataError(f"{path}: cannot read {what} ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


@contextlib.contextmanager
def _no_forced_pickle():
    """Our explicit weights_only=True must win over TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD in the environment.

    (torch only applies that variable where weights_only is not passed, but some versions raise when it and
    the forcing variable are both set; keep the environment out of the decision.)
    """
    saved = os.environ.pop(FORCE_NO_WEIGHTS_ONLY, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[FORCE_NO_WEIGHTS_ONLY] = saved


@contextlib.contextmanager
def allowed_globals(types: list):
    """Allow `types` in weights-only loads for the duration of the block only.

    torch >= 2.5 scopes this itself (torch.serialization.safe_globals); torch 2.4 has only the process-wide
    list (add/get/clear_safe_globals), which is restored afterwards.
    """
    ser = torch.serialization
    if hasattr(ser, "safe_globals"):
        with ser.safe_globals(list(types)):
            yield
        return
    before = ser.get_safe_globals() if hasattr(ser, "get_safe_globals") else None
    ser.add_safe_globals(list(types))
    try:
        yield
    finally:
        if before is not None and hasattr(ser, "clear_safe_globals"):
            ser.clear_safe_globals()
            ser.add_safe_globals(before)


def deepspeed_data_classes() -> list:
    """The DeepSpeed classes its ZeRO optimizer files hold besides tensors and containers.

    Found by listing the pickle globals of real checkpoints (ZeRO 0-3, fp32/bf16): an int enum (the ZeRO stage),
    a dataclass of two ints (a fragment's numel and start) and the loss-scaler records, whose unpickling only
    sets attributes. Allowing them lets DeepSpeed's files load weights-only, without allowing any callable.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def deepspeed_weights_only(where: str | Path, source: str | Path | None = None, *, trust_pickle: bool = False):
    """Every torch.load DeepSpeed makes inside the block (load_checkpoint, zero_to_fp32) runs weights-only.

    DeepSpeed passes weights_only=False explicitly; torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD (read at each call,
    torch 2.4 and later) overrides that, and `deepspeed_data_classes` are allowed for the block only. A refused
    file surfaces as our one-line error naming `where` (the tag folder) and how to convert `source` (the run).
    """
    if trust_pickle:
        yield
        return
    folder = Path(where)
    for candidate in sorted(folder.rglob("*") if folder.is_dir() else [folder]):  # what DeepSpeed may torch.load
        if candidate.is_file() and is_torchscript_archive(candidate):
            raise torchscript_refusal(candidate, source)
    with allowed_globals(deepspeed_data_classes()), _no_forced_pickle():
        saved = os.environ.get(FORCE_WEIGHTS_ONLY)
        os.environ[FORCE_WEIGHTS_ONLY] = "1"
        try:
            yield
        except pickle.UnpicklingError as exc:
            detail = _refused_detail(str(exc))
            if detail is None:
                raise
            raise refusal(where, detail, source) from None
        finally:
            if saved is None:
                os.environ.pop(FORCE_WEIGHTS_ONLY, None)
            else:
                os.environ[FORCE_WEIGHTS_ONLY] = saved
