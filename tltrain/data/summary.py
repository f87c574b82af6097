"""A human-readable summary of a shard manifest, printed by `tltrain prepare` and the demo."""
from __future__ import annotations


def manifest_summary(manifest: dict) -> str:
    names = manifest.get("class_names") or manifest["classes"]
    counts = manifest["counts"]
    lines = [
        f"shards: {len(manifest['shards'])} ({sum(s['bytes'] for s in manifest['shards']) / 1e6:.1f} MB), "
        f"samples found {counts['found']}, written {counts['written']}, skipped {counts['skipped']}",
        f"{'split':<8}{'samples':>9}{'patients':>10}  " + "  ".join(f"{n[:12]:>12}" for n in names),
    ]
    for split in ("train", "val", "test"):
        info = manifest["splits"].get(split)
        if info:
            lines.append(f"{split:<8}{info['count']:>9}{info['patients']:>10}  "
                         + "  ".join(f"{c:>12}" for c in info["class_counts"]))
    origin = (manifest.get("split_origin") or {}).get("origin") or {}
    if any(str(text).startswith("official") for text in origin.values()):
        lines += [f"  {split}: {origin[split]}" for split in ("train", "val", "test") if split in origin]
        moved = (manifest.get("split_origin") or {}).get("moved_patients")
        if moved:
            lines.append(f"  {moved} patient(s) found in two official splits moved wholly to the later one")
    ungradable = manifest.get("ungradable") or {}
    if ungradable.get("count"):
        lines.append(f"ungradable (left out, listed in manifest.json): {ungradable['count']}")
    fractions = ", ".join(f"{float(f) * 100:g}%: {v['count']}" for f, v in manifest["fractions"].items())
    lines.append(f"training fractions: {fractions}")
    if manifest.get("problems"):
        lines.append(f"problems ({len(manifest['problems'])}, see problems.csv):")
        lines += [f"  - {p['file']}: {p['reason']}" for p in manifest["problems"][:10]]
    return "\n".join(lines)
