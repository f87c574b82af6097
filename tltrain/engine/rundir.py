"""A run_dir belongs to one run: a lock held for the run's life, and a way for readers to tell a dead run.

The lock is a POSIX record lock (fcntl.lockf) on <run_dir>/.tltrain.lock, taken by the run's rank 0 before
anything is written and released by the OS when the process exits, however it exits (kill -9 included), so a
dead run can always be resumed. POSIX locks rather than flock(): forked DataLoader workers do not inherit them
(an orphaned worker cannot keep a killed run's folder locked), other processes can test them without taking
them (F_GETLK: `tltrain jobs` never makes a starting run fail), and NFS carries them between hosts.
The lock file also holds its owner's pid, host and start time, for the "in use" message.

status.json records the writer's pid and host as well; `is_stale` says a status of "running" is left over from
a process that died (its lock is free, or its pid is gone on this host).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import struct
import sys
import time
from pathlib import Path

from tltrain.errors import DataError, TltrainError
from tltrain.run_folder import RunFolder

LOCK_NAME = RunFolder.LOCK
OWNER_LIMIT = 64 * 1024  # the owner line is ~250 bytes; a lock file is never read beyond this
#: The lock is opened without following a symbolic link and without waiting on a FIFO (checked to be regular).
_LOCK_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

#: Locks this process holds: resolved lock path -> [file descriptor, nesting depth]. POSIX locks belong to the
#: process, and closing *any* descriptor of the file drops them, so the same process must never open it twice.
_HELD: dict[str, list] = {}


class RunDirBusy(TltrainError):
    """Another live process trains in this run_dir."""

    exit_code = 2


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / LOCK_NAME


def _owner_text() -> bytes:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv[:8]}
    return (json.dumps(owner) + "\n").encode()


def read_owner(run_dir: str | Path) -> dict:
    """What the lock file says about its (last) owner; {} when there is none or it is not a small regular file
    (a FIFO, a device or a link there is never waited on or read)."""
    from tltrain.safe_io import parse_json, read_bytes

    path = lock_path(run_dir)
    if str(path) in _HELD:
        return json.loads(_owner_text())
    try:
        owner = parse_json(read_bytes(path, OWNER_LIMIT, "lock file", follow_links=False) or b"{}", str(path))
    except (OSError, DataError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _open_lock_file(path: Path) -> int:
    """The lock file's descriptor, created if needed; DataError when what is there is not our kind of file.

    A link (to /dev/zero, to someone's file) is never followed, a FIFO never waited on, a file with other hard
    links never truncated: the owner line is written into the file, so it must be the run folder's own."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _LOCK_FLAGS, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            from tltrain.safe_io import printable

            raise DataError(f"{path}: the run folder's lock file is a symbolic link (to "
                            f"{printable(os.readlink(path), 200)}); refused: remove it (a run creates its own)"
                            ) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        what = "has other hard links" if stat.S_ISREG(info.st_mode) else "is not a regular file"
        raise DataError(f"{path}: the run folder's lock file {what}; refused: remove it (a run creates its own)")
    return fd


@contextlib.contextmanager
def claim_run_dir(run_dir: str | Path):
    """Hold run_dir for this process while the block runs; RunDirBusy (exit 2) when a live run holds it.

    Nested claims of the same folder by the same process are no-ops (train_app.run claims it, then the trainer).
    Once the folder is ours, half-written files left by a killed run are removed (checkpoint.remove_stale_writes).
    """
    path = lock_path(run_dir)
    key = str(path)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock_file(path)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        owner = read_owner(run_dir)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])) if "started" in owner else "?"
        raise RunDirBusy(f"run_dir={str(run_dir)!r} is in use by a live run (pid {owner.get('pid', '?')} on "
                         f"{owner.get('host', '?')}, started {since}); wait for it to end, stop it, or choose "
                         "another run_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, _owner_text(), 0)
    _HELD[key] = [fd, 1]
    try:
        from tltrain.engine.checkpoint import remove_stale_writes

        removed = remove_stale_writes(path.parent)
        if removed:
            print(f"removed {len(removed)} file(s) left half-written by a stopped run: "
                  f"{', '.join(p.name for p in removed[:5])}", flush=True)
        yield path
    finally:
        del _HELD[key]
        os.close(fd)  # releases the lock


_FLOCK = "hhqqi4x"  # struct flock on Linux (64-bit off_t): l_type, l_whence, l_start, l_len, l_pid


def lock_state(run_dir: str | Path) -> str:
    """"held" (a live process holds the run_dir), "free" (a lock file nobody holds) or "absent" (no lock file)."""
    path = lock_path(run_dir)
    if str(path) in _HELD:
        return "held"
    try:
        fd = os.open(path, os.O_RDONLY | _LOCK_FLAGS)
    except OSError:
        return "absent"
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "absent"  # a FIFO or device is no lock a run took: the pid decides
        probe = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0]
    except OSError:
        return "absent"  # a file system without POSIX locks: fall back to the pid
    finally:
        os.close(fd)
    return "free" if l_type == fcntl.F_UNLCK else "held"


PID_MAX = 1 << 22  # Linux's largest pid_max


def pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_stale(run_dir: str | Path, status: dict) -> bool:
    """A status.json that says "running" but whose process is gone (killed, node lost)."""
    if status.get("state") != "running":
        return False
    state = lock_state(run_dir)
    if state != "absent":
        return state == "free"
    pid = status.get("pid")  # from a file: a whole number in Linux's pid range, or it says nothing
    if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= PID_MAX \
            and status.get("host") == socket.gethostname():
        return not pid_alive(pid)
    return False
