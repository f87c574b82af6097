"""Publishing a package folder: written into a temporary folder beside the target and renamed into place.

An existing package is replaced only with force (never a folder that is not a package); a reader sees the old
package or the new one, never a mix; what a killed export leaves beside the target is removed by the next export of
that target once the process that made it is gone.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from pathlib import Path

from tltrain import safe_io
from tltrain.errors import DataError
from tltrain.export.package_format import METADATA


def check_target(target: Path, force: bool) -> None:
    """Refuse a target that holds something: without force anything but an empty folder; with force anything but
    a tltrain package (a folder with tltrain.json) or an empty folder, so --force never deletes a user's folder."""
    if not os.path.lexists(target):
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    is_package = target.is_dir() and os.path.lexists(target / METADATA)
    if not force:
        what = "a package" if is_package else "files"
        raise DataError(f"{target}: already holds {what}; pass --force (export_run(force=True)) to replace it")
    if not is_package:
        raise DataError(f"{target}: exists and is not a tltrain package (no {METADATA}); refused to replace it")


def _temp_names(target: Path) -> tuple[str, str]:
    return f".{target.name}.export-{os.getpid()}-", f".{target.name}.old-{os.getpid()}-"


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete what a killed export of `target` left beside it: its temporary and moved-aside folders, once the
    process that made them (its pid is in the name) is gone; a live export's folders are left alone."""
    removed = []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(export|old)-(\d+)-[^/]*")
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*"):
        found = pattern.fullmatch(path.name)
        if not found or _process_alive(int(found.group(2))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not exporting that target yet: anything of its own there is stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def write_new_file(path: Path, data: bytes) -> None:
    """One file of publish's fresh temporary folder (created here: O_EXCL, so nothing there is followed or
    overwritten), flushed to disk."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def copy_new_file(source: Path, path: Path, what: str = "file") -> None:
    """Copy a regular file (read with safe_io.open_regular: no FIFO, device or link at its name is followed) into
    publish's fresh temporary folder, streamed (weights can be large)."""
    with safe_io.open_regular(source, what, follow_links=False) as reader, open(path, "xb") as handle:
        shutil.copyfileobj(reader, handle, 1 << 20)
        handle.flush()
        os.fsync(handle.fileno())


def publish(target: Path, force: bool, write) -> str:
    """Run write(folder) on a new temporary folder beside `target`, then rename it into place; returns the digest.

    An existing package (force) is renamed aside, the new one renamed in, the old one removed: a reader sees the
    old package or the new one, never a mix; a kill leaves the old package (or none, between the two renames) and
    temporary folders, which the next export of the target removes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    export_prefix, old_prefix = _temp_names(target)
    folder = Path(tempfile.mkdtemp(prefix=export_prefix, dir=target.parent))
    try:
        digest = write(folder)
        os.chmod(folder, 0o777 & ~safe_io._umask())
        safe_io.fsync_folder(folder)
        check_target(target, force)  # again: another export may have finished meanwhile
        aside = None
        if os.path.lexists(target) and not (target.is_dir() and not target.is_symlink()
                                            and not any(target.iterdir())):
            aside = target.parent / f"{old_prefix}{os.urandom(4).hex()}"
            os.rename(target, aside)
        os.replace(folder, target)  # replaces an empty folder too
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    safe_io.fsync_folder(target.parent)
    if aside is not None:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)
    return digest
