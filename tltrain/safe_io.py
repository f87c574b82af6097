"""Files other people made are data: bounded reads, names that stay in their folder, writes that follow no link.

Run folders, sweeps, packages, shards and manifests travel between users. Everything tltrain reads from such a
file goes through this module, which keeps four promises (docs/architecture.md, "What is trusted"):
- **bounded reads**: only regular files are read (a FIFO, a device such as /dev/zero or a folder is refused
  without blocking), each with a size cap, and JSON/YAML with a depth and node cap (a YAML alias bomb of a few KB
  expands to millions of nodes: it is counted on the composed node graph, before anything is built);
- **names stay inside their folder**: a name read from a file (a checkpoint name, a manifest's shard entry) is one
  relative path without `..`, and its resolved path (symlinks followed) stays inside the folder;
- **writes follow no link**: every output is a new temporary file in the target's folder, renamed over the
  target, so an existing symlink (or hard link) at the target is replaced, never written through;
- **text is escaped where it is shown**: terminal control characters are made visible before printing, Markdown
  table cells are escaped, CSV cells that a spreadsheet would run as a formula are quoted.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

from tltrain.errors import DataError

MiB = 1 << 20
#: Caps for the small files a run folder or package holds (status, metrics, index, metadata, configs).
JSON_LIMIT = 64 * MiB
YAML_LIMIT = 4 * MiB
TEXT_LIMIT = 64 * MiB
MAX_DEPTH = 64
MAX_YAML_NODES = 200_000


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


@contextlib.contextmanager
def open_regular(path: str | Path, what: str = "file", *, follow_links: bool = True) -> Iterator[Any]:
    """Open `path` for binary reading only if it is a regular file; never blocks (a FIFO is refused at once).

    follow_links=False also refuses a symlink at `path` itself (for files a run writes and later reopens)."""
    path = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not follow_links and exc.errno == 40:  # ELOOP: the path is a symlink
            raise DataError(f"{path}: {what} is a symbolic link; refused (written by someone else?)") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{path}: {what} is {_kind(info.st_mode)}, not a regular file; refused")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def read_bytes(path: str | Path, limit: int, what: str = "file", *, follow_links: bool = True) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; DataError naming the file otherwise."""
    with open_regular(path, what, follow_links=follow_links) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise DataError(f"{path}: {what} is {size:,} bytes, over the {limit:,}-byte limit for it; refused")
        data = handle.read(limit + 1)
    if len(data) > limit:  # grew while we read it
        raise DataError(f"{path}: {what} is over the {limit:,}-byte limit for it; refused")
    return data


def read_text(path: str | Path, limit: int = TEXT_LIMIT, what: str = "file") -> str:
    data = read_bytes(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def check_depth(value: Any, max_depth: int = MAX_DEPTH, where: str = "value") -> None:
    """Refuse containers nested deeper than max_depth (iteratively: no recursion limit to hit)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            if depth > max_depth:
                raise DataError(f"{where}: nested deeper than {max_depth} levels; refused")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def parse_json(text: str | bytes, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """json.loads with a depth cap; malformed, too deep, or numbers beyond Python's digit limit are one DataError."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply; refused") from None
    except ValueError as exc:  # JSONDecodeError, and ints over sys.get_int_max_str_digits
        raise DataError(f"{where}: not valid JSON ({str(exc).splitlines()[0][:200]})") from None
    check_depth(value, max_depth, where)
    return value


def load_json(path: str | Path, limit: int = JSON_LIMIT, what: str = "JSON file", max_depth: int = MAX_DEPTH) -> Any:
    """A JSON file someone else may have written: regular, at most `limit` bytes, at most `max_depth` deep."""
    return parse_json(read_bytes(path, limit, what), str(path), max_depth)


def load_json_or_empty(path: str | Path, limit: int = JSON_LIMIT, what: str = "JSON file") -> dict:
    """A JSON object, or {} when the file is missing, unreadable, oversized, not a regular file or not an object.

    For readers that list many run folders (report, jobs): one bad file must not abort the listing."""
    try:
        value = load_json(path, limit, what)
    except (OSError, DataError):
        return {}
    return value if isinstance(value, dict) else {}


def load_json_object(path: str | Path, limit: int = JSON_LIMIT, what: str = "JSON file") -> dict:
    """A JSON object (a run's status/metrics, a package's metadata): {} when nothing is at `path`; DataError
    naming the file when it cannot be read, is over its cap, or holds something other than an object."""
    path = Path(path)
    if not os.path.lexists(path):
        return {}
    try:
        value = load_json(path, limit, what)
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, not {type(value).__name__}")
    return value


def sha256_file(path: str | Path, what: str = "file", block: int = 1 << 20) -> str:
    """sha256 of a regular file, read in blocks (a FIFO or device is refused, never read): the one file hash of
    shards, manifests, checksums and packages."""
    import hashlib

    digest = hashlib.sha256()
    with open_regular(path, what) as handle:
        raw = handle.raw if hasattr(handle, "raw") else handle
        while chunk := raw.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _count_yaml_nodes(root, where: str, max_nodes: int, max_depth: int) -> None:
    """Count the nodes the YAML document expands to (aliases counted every time they are used)."""
    import yaml

    count = 0
    stack = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise DataError(f"{where}: YAML expands to more than {max_nodes:,} nodes (an alias bomb?); refused")
        if depth > max_depth:
            raise DataError(f"{where}: YAML nested deeper than {max_depth} levels; refused")
        if isinstance(node, yaml.MappingNode):
            stack.extend((part, depth + 1) for pair in node.value for part in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((part, depth + 1) for part in node.value)


def parse_yaml(text: str, where: str, max_nodes: int = MAX_YAML_NODES, max_depth: int = MAX_DEPTH) -> dict:
    """A YAML mapping as plain containers, interpolations (`${...}`) kept as text, never resolved.

    Node count and depth are checked on the composed graph before anything is constructed; Python tags are
    refused by OmegaConf's safe loader. An empty document is {}."""
    import yaml
    from omegaconf import OmegaConf

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise DataError(f"{where}: not valid YAML ({_first_line(exc)})") from None
    if root is None:
        return {}
    _count_yaml_nodes(root, where, max_nodes, max_depth)
    try:
        config = OmegaConf.create(text)
        value = OmegaConf.to_container(config, resolve=False)
    except Exception as exc:  # yaml errors, OmegaConf's own (unsupported key types, a list at the top)
        raise DataError(f"{where}: not a YAML mapping tltrain can read ({_first_line(exc)})") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a YAML mapping at the top")
    return value


def load_yaml(path: str | Path, limit: int = YAML_LIMIT, what: str = "YAML file") -> dict:
    """A YAML config someone else may have written: bounded in bytes, nodes and depth, not resolved."""
    return parse_yaml(read_text(path, limit, what), str(path))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return printable(text[0] if text else type(exc).__name__, 200)


def inside(folder: str | Path, name: str, what: str = "entry") -> Path:
    """folder/name for a name read from a file, refused unless it stays inside `folder`.

    The name must be a non-empty relative path without `..`, NUL or backslash, and its resolved path (symlinks
    followed) must lie inside the resolved folder."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise DataError(f"{folder}: {what} {printable(repr(name), 200)} is not a file name; refused")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or name.startswith("~"):
        raise DataError(f"{folder}: {what} {printable(repr(name), 200)} points outside the folder; refused")
    target = folder / relative
    base = folder.resolve()
    resolved = target.resolve()
    if resolved != base and base not in resolved.parents:
        raise DataError(f"{folder}: {what} {printable(repr(name), 200)} leads outside the folder (to {resolved}) "
                        "through a symbolic link; refused")
    return target


def plain_name(name, pattern: re.Pattern | None = None, where: str = "", what: str = "name") -> str:
    """A single file name (no folder part) read from a file, optionally matching `pattern` in full."""
    ok = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\x00" not in name
    if ok and pattern is not None:
        ok = pattern.fullmatch(name) is not None
    if not ok:
        prefix = f"{where}: " if where else ""
        raise DataError(f"{prefix}{what} {printable(repr(name), 200)} is not a valid name; refused")
    return name


def fsync_folder(folder: str | Path) -> None:
    with contextlib.suppress(OSError):  # some file systems refuse fsync on folders; the rename is still atomic
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", durable: bool = True, **kwargs) -> Iterator[Any]:
    """Write `path` as a new file: a temporary beside it, flushed (+ fsync when durable), renamed over the target.

    The rename replaces whatever is at `path` (a symlink is replaced, not followed); on any error the target is
    untouched and the temporary removed. Temporaries are named `.NAME.XXXX.tmp` (a run's clean-up removes them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    with atomic_open(path, "wb", durable) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def json_default(value):
    """JSON for the numpy arrays/scalars and tensors results hold; anything else (paths) as its text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def atomic_write_json(path: str | Path, obj, durable: bool = True) -> None:
    text = json.dumps(obj, indent=2, default=json_default, allow_nan=True) + "\n"
    atomic_write_bytes(path, text.encode(), durable)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text, limit: int | None = 2000, *, keep_newlines: bool = False) -> str:
    """Text from a file, safe to print on a terminal: control characters (escape sequences, carriage returns,
    bidi overrides) shown as \\xNN / \\uNNNN, newlines as \\n unless kept, and cut to `limit` characters."""
    text = str(text)
    if not keep_newlines:
        text = text.replace("\r\n", "\n").replace("\n", "\\n")
    text = text.replace("\t", " ")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|~])")


def markdown_text(text, limit: int | None = 2000) -> str:
    """Text from a file as one line of Markdown that renders as that text: no links, HTML, tables or headings."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", printable(text, limit))


def csv_cell(value):
    """A CSV value a spreadsheet shows as text: a string starting with = + - @ (or a tab/CR) gets a leading '.
    Numbers are returned as they are."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def is_number(value, integer: bool = False) -> bool:
    """A finite int or float (an int when integer); bools are not numbers here. The one test behind every range
    check of config values and of values read from files."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)


def finite_number(value, where: str, low: float | None = None, high: float | None = None,
                  integer: bool = False):
    """A number read from a file, checked: finite, of the right kind, within [low, high]."""
    kind = "a whole number" if integer else "a number"
    ok = is_number(value, integer)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        bounds = f" in [{low}, {high}]" if low is not None or high is not None else ""
        raise DataError(f"{where} must be {kind}{bounds}, not {printable(repr(value), 100)}")
    return value


_ESCAPED_INTRAWORD_UNDERSCORE = re.compile(r"(?<=[A-Za-z0-9])\\_(?=[A-Za-z0-9])")


def markdown_cell(text, limit: int | None = 2000) -> str:
    """markdown_text, except that an underscore between two letters or digits stays as it is.

    For names shown in reports (finetune_all, run:step1_fundus): CommonMark never reads an intraword underscore
    as emphasis, so the name renders the same and stays greppable in the Markdown source; everything else
    (links, HTML, table bars, newlines, control characters) is escaped as markdown_text does."""
    return _ESCAPED_INTRAWORD_UNDERSCORE.sub("_", markdown_text(text, limit))
