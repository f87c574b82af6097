"""Small shared pieces of the GPU benchmarks: a prepared synthetic shard set and JSON output with provenance."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def synthetic_shards(work: Path, images: int, width: int, seed: int = 0, val_fraction: float = 0.0) -> Path:
    """Synthetic EyePACS-layout JPEGs of `width` px (4:3) prepared into shards (all in `train` unless val_fraction)."""
    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.sources import SourceConfig
    from tltrain.data.synth import generate_eyepacs

    raw, shards = work / f"raw{width}", work / f"shards{width}_{val_fraction:g}"
    if (shards / "manifest.json").is_file():
        return shards
    if not raw.is_dir():
        generate_eyepacs(raw, n_patients=max(2, images // 2), width=width, seed=seed, min_per_class=2,
                         progress=False)
    run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(raw)), out=str(shards),
                              val_fraction=val_fraction, test_fraction=0.0, progress=False))
    return shards


def provenance(device: str) -> dict:
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__, "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else None}
    for name in ("triton", "nvidia.dali", "deepspeed", "timm"):
        try:
            info[name.split(".")[-1]] = __import__(name, fromlist=["__version__"]).__version__
        except Exception:  # a part that needs it reports its own failure
            info[name.split(".")[-1]] = None
    return info


def write_json(path: str | None, report: dict, echo: bool = True) -> None:
    """Write the report; parts also call it (echo=False, status "partial") after each row, so that the rows
    measured before a time-out survive in the JSON that gpu_all.sh completes."""
    text = json.dumps(report, indent=1, default=str)
    if echo:
        print(text, flush=True)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
