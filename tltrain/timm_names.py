"""The names of timm's architectures without importing timm (which imports torch and every model module: seconds),
so a config can be checked quickly, e.g. by `tltrain submit`. The list is written once per timm version to
$XDG_CACHE_HOME/tltrain (default ~/.cache/tltrain) and read from there afterwards; any problem with the cache
falls back to asking timm itself."""
from __future__ import annotations

import os
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _cache_file() -> Path | None:
    try:
        timm_version = version("timm")
    except PackageNotFoundError:
        return None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "tltrain" / f"timm-{timm_version}-models.txt"


@lru_cache(maxsize=1)
def timm_model_names() -> frozenset[str]:
    path = _cache_file()
    if path is not None:
        try:
            names = path.read_text().split()
            if names:
                return frozenset(names)
        except OSError:
            pass
    import timm

    names = timm.list_models()
    if path is not None:
        try:
            from tltrain.safe_io import atomic_write_text

            atomic_write_text(path, "\n".join(names) + "\n", durable=False)  # parallel submitters never read half
        except OSError:
            pass
    return frozenset(names)
