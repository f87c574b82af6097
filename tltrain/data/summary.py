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
    sources = manifest.get("sources") or {}
    if len(sources) > 1:
        lines += _source_lines(manifest)
    origin = (manifest.get("split_origin") or {}).get("origin") or {}
    if len(sources) <= 1 and any(str(text).startswith("official") for text in origin.values()):
        lines += [f"  {split}: {origin[split]}" for split in ("train", "val", "test") if split in origin]
        moved = (manifest.get("split_origin") or {}).get("moved_patients")
        if moved:
            lines.append(f"  {moved} patient(s) found in two official splits moved wholly to the later one")
    for key, what in (("ungradable", "ungradable (left out, listed in manifest.json)"),
                      ("left_out", "left out by a label_map (listed in manifest.json)")):
        if (manifest.get(key) or {}).get("count"):
            lines.append(f"{what}: {manifest[key]['count']}")
    duplicates = manifest.get("duplicates") or {}
    if duplicates.get("count"):
        lines.append(f"byte-identical copies: {duplicates['count']} ({duplicates.get('across_sources', 0)} across "
                     f"sources, {duplicates.get('disagreeing_labels', 0)} with another label), "
                     f"{duplicates.get('left_out', 0)} left out (manifest.json duplicates)")
    fractions = ", ".join(f"{float(f) * 100:g}%: {v['count']}" for f, v in manifest["fractions"].items())
    lines.append(f"training fractions: {fractions}")
    if manifest.get("problems"):
        lines.append(f"problems ({len(manifest['problems'])}, see problems.csv):")
        lines += [f"  - {p['file']}: {p['reason']}" for p in manifest["problems"][:10]]
    return "\n".join(lines)


def _source_lines(manifest: dict) -> list[str]:
    """Per source of a dataset of several: where each split came from and what was written or left out."""
    lines = [f"{'source':<14}{'written':>9}{'train':>7}{'val':>6}{'test':>6}{'ungradable':>12}{'copies':>8}"
             f"{'problems':>10}  splits from"]
    origins = (manifest.get("split_origin") or {}).get("sources") or {}
    for name, info in manifest["sources"].items():
        splits = info.get("splits") or {}
        origin = origins.get(name) or {}
        how = "official " + "+".join(s for s in ("train", "val", "test") if str(origin.get(s, "")).startswith(
            "official")) if any(str(v).startswith("official") for v in origin.values()) else "by patient"
        lines.append(f"{name[:13]:<14}{info.get('written', 0):>9}{splits.get('train', 0):>7}{splits.get('val', 0):>6}"
                     f"{splits.get('test', 0):>6}{info.get('ungradable', 0):>12}{info.get('duplicates_left_out', 0):>8}"
                     f"{info.get('problems', 0):>10}  {how}")
    return lines
