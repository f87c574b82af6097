"""Reading files that someone else may have written: data formats only, never code.

tltrain reads weights and checkpoints with safetensors, JSON, numpy without pickle, or
`torch.load(weights_only=True)`, whose unpickler only rebuilds tensors and plain containers (dict, list, tuple,
str, numbers) and refuses every other Python object. A file that holds other objects (a legacy pickle, or one
crafted to run a command when unpickled) is refused with one line naming the file; only an explicit opt-in
(`model.trust_pickle=true`, `tltrain convert-weights ... --trust-pickle`) reads it with plain pickle.

DeepSpeed reads its own checkpoint files with `torch.load(weights_only=False)`; `deepspeed_weights_only` makes
those loads weights-only too (see docs/architecture.md, "What is trusted").

Bounded work: every object torch_load returns (and every torch.load inside `deepspeed_weights_only`) is walked
before a caller copies a tensor: a tensor whose view needs more elements than its storage holds (stride 0 on a
dimension > 1, as `expand` makes; overlapping strides) is refused, as is a file declaring more than
MAX_TENSOR_BYTES of tensors. A .safetensors file's header is checked by `check_safetensors_header` before
safetensors parses it (length, entry count, each entry's bytes).

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
            loaded = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        detail = None if trust_pickle else _refused_detail(str(exc), path)
        if detail is not None:
            raise refusal(path, detail, source) from None
        why = "not a PyTorch or safetensors file" if "Weights only load failed" in str(exc) else _first_line(exc)
        raise DataError(f"{path}: cannot read {what} ({why})") from None
    except Exception as exc:  # corrupt, truncated or foreign file
        raise DataError(f"{path}: cannot read {what} ({type(exc).__name__}: {_first_line(exc)})") from None
    check_loaded_tensors(loaded, path, what)  # before any caller copies, reshapes or converts a tensor
    return loaded


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
def _checked_torch_load():
    """Inside the block, every torch.load (DeepSpeed's own, looked up as torch.load at each call) has its result
    checked by check_loaded_tensors before DeepSpeed copies or merges a tensor."""
    original = torch.load

    def checked_load(f, *args, **kwargs):
        loaded = original(f, *args, **kwargs)
        check_loaded_tensors(loaded, f if isinstance(f, (str, os.PathLike)) else "DeepSpeed file", "checkpoint")
        return loaded

    torch.load = checked_load
    try:
        yield
    finally:
        torch.load = original


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
    with allowed_globals(deepspeed_data_classes()), _no_forced_pickle(), _checked_torch_load():
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


# -- bounded work for any weight file ---------------------------------------------------------------------------
#: Largest total of tensor bytes one weights/checkpoint file may declare (ViT-L with optimizer state is ~5 GB).
MAX_TENSOR_BYTES = 32 << 30
#: A safetensors header is JSON of one small entry per tensor: 16 MiB holds ~150 000 of them.
MAX_SAFETENSORS_HEADER = 16 << 20
MAX_SAFETENSORS_ENTRIES = 100_000
#: Containers and tensors walked in a loaded object before it is refused (a real checkpoint holds a few thousand).
MAX_LOADED_NODES = 5_000_000
_SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _storage_problem(tensor: torch.Tensor) -> str | None:
    """Why a loaded tensor's view does not fit its storage one element per index (None when it does).

    Counted from sizes and strides only: nothing is materialised. Stride 0 on a dimension > 1 (an expanded tensor)
    and overlapping strides make a tiny storage look like a huge tensor, which .contiguous()/.numpy() would then
    allocate in full."""
    dims = [(int(stride), int(size)) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1]
    if any(stride <= 0 for stride, _ in dims):
        return "an expanded tensor (stride 0 or negative on a dimension > 1)"
    span = 1
    for stride, size in sorted(dims):
        if stride < span:
            return "overlapping strides (several indices share one element)"
        span += (size - 1) * stride
    if tensor.numel() == 0:
        return None
    storage_elements = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
    if tensor.storage_offset() + span > storage_elements:
        return "a view larger than its storage"
    return None


def check_loaded_tensors(obj, path: str | Path, what: str = "weights", limit: int | None = None) -> None:
    """Refuse a loaded object whose tensors claim more than they hold, or more than `limit` bytes in all.

    Walks containers iteratively (no recursion limit), counting nodes, before anything is copied or reshaped."""
    limit = MAX_TENSOR_BYTES if limit is None else limit
    total, seen, stack, visited = 0, 0, [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in visited:  # tied weights and shared records: counted once, cycles walked once
            continue
        visited.add(id(item))
        seen += 1
        if seen > MAX_LOADED_NODES:
            raise DataError(f"{path}: {what} hold more than {MAX_LOADED_NODES:,} objects; refused")
        if isinstance(item, torch.Tensor):
            problem = _storage_problem(item) if item.layout == torch.strided else f"a {item.layout} tensor"
            if problem:
                raise DataError(f"{path}: {what} hold {problem}: shape {list(item.shape)}, stride "
                                f"{list(item.stride())}; refused before materialising it")
            total += item.numel() * item.element_size()
            if total > limit:
                raise DataError(f"{path}: {what} declare more than {limit:,} bytes of tensors; refused")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type):  # allowed records (DeepSpeed's loss scaler)
            stack.extend(vars(item).values())


def check_safetensors_header(path: str | Path, limit: int | None = None) -> None:
    """Refuse a .safetensors file before safetensors parses it: the 8-byte header length must be under
    MAX_SAFETENSORS_HEADER, the header a JSON object of at most MAX_SAFETENSORS_ENTRIES entries, each entry's
    shape x dtype size equal to its byte span, and the total within MAX_TENSOR_BYTES (or `limit`)."""
    from tltrain import safe_io

    limit = MAX_TENSOR_BYTES if limit is None else limit
    path = Path(path)
    with safe_io.open_regular(path, "weights file") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(8)
        if len(head) < 8:
            raise DataError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        length = int.from_bytes(head, "little")
        if length > MAX_SAFETENSORS_HEADER:
            raise DataError(f"{path}: safetensors header of {length:,} bytes, over the {MAX_SAFETENSORS_HEADER:,}-"
                            "byte limit; refused")
        if 8 + length > size:
            raise DataError(f"{path}: safetensors header length {length:,} runs past the end of the file")
        header = safe_io.parse_json(handle.read(length), str(path), max_depth=4)
    if not isinstance(header, dict):
        raise DataError(f"{path}: safetensors header is not a JSON object")
    if len(header) > MAX_SAFETENSORS_ENTRIES + 1:
        raise DataError(f"{path}: safetensors header lists {len(header):,} entries, over the "
                        f"{MAX_SAFETENSORS_ENTRIES:,} limit; refused")
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        total += _safetensors_entry_bytes(path, name, entry)
        if total > limit or total > size:
            raise DataError(f"{path}: safetensors header declares more tensor bytes than "
                            f"{'the file holds' if total > size else f'the {limit:,}-byte limit'}; refused")


def _safetensors_entry_bytes(path: Path, name: str, entry) -> int:
    """The byte count one header entry declares, checked against its data_offsets."""
    from tltrain.safe_io import printable

    where = f"{path}: safetensors entry {printable(repr(name), 100)}"
    if not isinstance(entry, dict):
        raise DataError(f"{where} is not an object")
    itemsize = _SAFETENSORS_DTYPE_BYTES.get(entry.get("dtype"))
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if itemsize is None or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2 \
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in [*shape, *offsets]):
        raise DataError(f"{where}: dtype, shape or data_offsets missing or invalid")
    count = itemsize
    for dim in shape:
        count *= dim
        if count > MAX_TENSOR_BYTES:
            raise DataError(f"{where}: shape {shape} declares more than {MAX_TENSOR_BYTES:,} bytes; refused")
    if offsets[1] - offsets[0] != count:
        raise DataError(f"{where}: shape {shape} x {entry['dtype']} needs {count:,} bytes, data_offsets span "
                        f"{offsets[1] - offsets[0]:,}")
    return count
