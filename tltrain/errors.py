"""Error types shared by every stage, so the CLI can print them without a traceback."""


#: Exit codes shared by the entry points, the launcher and the tests (one table; engine/signals re-exports).
USAGE_EXIT_CODE = 2  # bad config or input: one error line naming the key or file
NONFINITE_EXIT_CODE = 3  # the loss became NaN/inf
PREEMPTED_EXIT_CODE = 75  # stopped after checkpointing (EX_TEMPFAIL from sysexits.h: "try again later")


class TltrainError(Exception):
    """Base class: an error the user can act on (bad input, bad config), printed as a plain message."""


class ConfigError(TltrainError):
    """A config value is unknown or inconsistent; the message names the key and the valid choices."""


class DataError(TltrainError):
    """Input data is missing or malformed; the message names the file and the problem."""

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = problems or []


def choices_error(key: str, value, valid) -> ConfigError:
    """Build the standard 'unknown X; valid choices are ...' error."""
    valid = sorted(valid)
    return ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def os_error(exc: OSError, doing: str = "", folder: str = "") -> "DataError":
    """A user-fixable DataError for an OSError a run can meet (full disk, quota, read-only or missing files).
    folder names the place when the library that failed did not say which file (torch.save does not)."""
    import errno
    import os

    target = exc.filename or (f"{folder} (a file in it)" if folder else "a file")
    what = f" while {doing}" if doing else ""
    reasons = {
        errno.ENOSPC: f"{target}: no space left on the device{what}; free space or point run_dir elsewhere",
        errno.EDQUOT: f"{target}: disk quota exceeded{what}; free space or point run_dir elsewhere",
        errno.EROFS: f"{target}: read-only file system{what}; point run_dir at a writable folder",
        errno.EACCES: f"{target}: permission denied{what}",
        errno.ENOENT: f"{target}: no such file or folder{what} (moved or deleted while the run was starting?)",
        errno.EIO: f"{target}: input/output error{what} (damaged disk or network file system); "
                   "run `tltrain verify` on the shards",
        errno.EFBIG: f"{target}: file too large for this file system{what}",
    }
    message = reasons.get(exc.errno) or f"{target}: {exc.strerror or os.strerror(exc.errno or 0) or exc}{what}"
    return DataError(message)
