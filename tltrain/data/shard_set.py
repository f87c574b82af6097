"""Training on several shard folders at once (`data.shards=[/shards/eyepacs,/shards/aptos]`, optional
`data.weights=[1,1]`): their manifests combined into one Manifest that every reader already understands.

Why combine instead of teaching each reader about folders: the loaders, the checksum check and the fraction and
split selection all read a manifest's shard entries. In the combined one each entry's `tar`/`index` is the file's
absolute path (so `folder / entry["tar"]` is that path whatever folder a reader joins it to), its `name` is
`<folder number>:<name>` (names stay unique), and `folder` says which folder it came from. The folders must share
their label set (classes and names), else one DataError names both; a split or fraction is offered when every
folder has it.

Weights (`folders[i]["weight"]`): the share of a training epoch drawn from folder i is weight_i / sum(weights);
without weights every sample is drawn once per epoch (the folders' natural shares). Evaluation never weights.
"""
from __future__ import annotations

from pathlib import Path

from tltrain.data.manifest import MANIFEST_FORMAT, Manifest, load_manifest
from tltrain.errors import DataError

MAX_FOLDERS = 64


def shard_folders(shards) -> list[str]:
    """data.shards as a list of folders (one folder may be given as a plain path)."""
    return [str(shards)] if isinstance(shards, (str, Path)) else [str(folder) for folder in shards]


def load_shard_set(shards, weights=None) -> Manifest:
    """One folder: its manifest, unchanged. Several: the combined manifest (module docstring)."""
    folders = shard_folders(shards)
    if len(folders) == 1 and not weights:
        return load_manifest(folders[0])
    manifests = [load_manifest(folder) for folder in folders]
    first = manifests[0]
    for folder, manifest in zip(folders[1:], manifests[1:]):
        if manifest["classes"] != first["classes"] or manifest.get("class_names") != first.get("class_names"):
            raise DataError(f"data.shards: {folder} has classes {_label_set(manifest)} but {folders[0]} has "
                            f"{_label_set(first)}; folders trained together must share one label set (prepare them "
                            "with the same classes, or as one dataset of several sources)")
    shards_out, splits = [], {}
    for number, (folder, manifest) in enumerate(zip(folders, manifests)):
        base = Path(folder).resolve()
        for entry in manifest["shards"]:
            shards_out.append({**entry, "name": f"{number}:{entry['name']}", "tar": str(base / entry["tar"]),
                               "index": str(base / entry["index"]), "folder": number})
        for split, info in manifest["splits"].items():
            total = splits.setdefault(split, {"count": 0, "class_counts": [0] * int(first["num_classes"]),
                                              "patients": 0, "folders": 0})
            total["count"] += info["count"]
            total["class_counts"] = [a + b for a, b in zip(total["class_counts"], info["class_counts"])]
            total["patients"] += info.get("patients", 0)
            total["folders"] += 1
    splits = {name: info for name, info in splits.items() if info.pop("folders") == len(folders)}
    return Manifest({
        "format": MANIFEST_FORMAT, "num_classes": first["num_classes"], "classes": first["classes"],
        "class_names": first.get("class_names", first["classes"]), "shards": shards_out, "splits": splits,
        "fractions": _common_fractions(manifests, int(first["num_classes"])),
        "source": {"kind": "folders", "folders": [m.get("source") for m in manifests]},
        "folders": [{"path": str(Path(folder).resolve()), "weight": None if not weights else float(weights[i]),
                     "sources": folder_sources(manifest, folder), "splits": {s: info["count"] for s, info in
                                                                             manifest["splits"].items()}}
                    for i, (folder, manifest) in enumerate(zip(folders, manifests))],
    })


def _label_set(manifest: dict) -> str:
    names = manifest.get("class_names") or manifest["classes"]
    return ", ".join(f"{c}" if c == n else f"{c} ({n})" for c, n in zip(manifest["classes"], names))


def _common_fractions(manifests: list[dict], num_classes: int) -> dict:
    """The fractions every folder prepared: their shard lists joined, counts summed."""
    common = set.intersection(*(set(m.get("fractions", {})) for m in manifests))
    fractions = {}
    for key in sorted(common, key=float):
        parts = [m["fractions"][key] for m in manifests]
        fractions[key] = {"count": sum(p.get("count", 0) for p in parts),
                          "class_counts": [sum(p.get("class_counts", [0] * num_classes)[c] for p in parts)
                                           for c in range(num_classes)],
                          "shards": [f"{number}:{name}" for number, p in enumerate(parts) for name in p["shards"]]}
    return fractions


def folder_sources(manifest: dict, folder) -> list[str]:
    """The source names of one shard folder: a dataset of several sources names each (its keys start with
    `<name>-`); a single source is named by its `sources` entry, its kind, else the folder's name."""
    sources = manifest.get("sources")
    if isinstance(sources, dict) and sources:
        return [str(name) for name in sources]
    kind = (manifest.get("source") or {}).get("kind") if isinstance(manifest.get("source"), dict) else None
    return [str(kind or Path(str(folder)).name)]


def source_names(manifest: dict, shard_dir) -> list[list[str]]:
    """Per folder of a (combined or plain) manifest, its source names."""
    if "folders" in manifest:
        return [list(folder["sources"]) for folder in manifest["folders"]]
    return [folder_sources(manifest, shard_dir)]


def sample_sources(manifest: dict, shard_dir, shards: list[dict], index) -> list[str] | None:
    """The source of each sample of a SampleIndex over `shards`, or None when all come from one source (nothing to
    break down). A sample of a several-source folder belongs to the source its key starts with (`<name>-`)."""
    per_folder = source_names(manifest, shard_dir)
    if len({name for names in per_folder for name in names}) < 2:
        return None
    folder_of_shard = [shard.get("folder", 0) for shard in shards]
    result = []
    for shard_number, key in zip(index.shard.tolist(), index.keys.tolist()):
        names = per_folder[folder_of_shard[shard_number]]
        if len(names) == 1:
            result.append(names[0])
        else:
            result.append(max((n for n in names if key.startswith(f"{n}-")), key=len, default="unknown"))
    return result
