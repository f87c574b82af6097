"""Patient-level stratified splits and nested stratified training fractions, deterministic by seed.

Written by hand rather than with scikit-learn's splitters because two guarantees matter here and are easy to
state exactly: both eyes of a patient land in the same split (no validation leak), and every training fraction
contains every smaller one and matches the class mix within one sample per class.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from tltrain.data.sources import Record


def split_by_patient(records: list[Record], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """key -> 'train' | 'val' | 'test'. Patients are stratified by their highest label (their worst eye)."""
    patients: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        patients[record.patient].append(record)
    by_class: dict[int, list[str]] = defaultdict(list)
    for patient, recs in sorted(patients.items()):
        by_class[max(r.label for r in recs)].append(patient)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5B1]))
    assignment: dict[str, str] = {}
    for label in sorted(by_class):
        group = by_class[label]
        order = rng.permutation(len(group))
        n = len(group)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:  # every split sees every class when the class is big enough to share
            n_test = max(n_test, 1) if test_fraction > 0 else 0
            n_val = max(n_val, 1) if val_fraction > 0 else 0
        for rank, index in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            for record in patients[group[index]]:
                assignment[record.key] = split
    return assignment


def tier_name(fraction: float) -> str:
    """0.1 -> 'f010', 1.0 -> 'f100': the shard-name tag of a training fraction."""
    return f"f{int(round(fraction * 100)):03d}"


def nested_fractions(train: list[Record], fractions: list[float], seed: int, stratum=None) -> dict[str, float]:
    """key -> the smallest fraction that contains it. Fraction f = every key whose tier <= f.

    Per class, samples are shuffled once and fraction f takes the first max(1, round(f * n_c)): nested by
    construction, stratified within one sample per class, and no class vanishes from a small fraction.
    stratum(record): what "class" means here (default its label; a dataset of several sources: (source, label),
    so no source vanishes from a small fraction either).
    """
    fractions = sorted(set(float(f) for f in fractions))
    if not fractions or fractions[-1] != 1.0:
        fractions.append(1.0)
    stratum = stratum or (lambda record: record.label)
    by_class: dict = defaultdict(list)
    for record in sorted(train, key=lambda r: r.key):
        by_class[stratum(record)].append(record)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF4AC]))
    tier: dict[str, float] = {}
    for label in sorted(by_class):
        group = by_class[label]
        order = rng.permutation(len(group))
        limits = [max(1, int(round(f * len(group)))) for f in fractions]
        for rank, index in enumerate(order):
            tier[group[index].key] = next(f for f, limit in zip(fractions, limits) if rank < limit)
    return tier


SPLIT_ORDER = ("train", "val", "test")


def assign_splits(records: list[Record], val_fraction: float, test_fraction: float, seed: int,
                  official_origin: dict[str, str] | None = None) -> tuple[dict[str, str], dict]:
    """(key -> split, how each split was made). Without official splits (no record has `split`): patient-level
    stratified val_fraction/test_fraction of the patients, as split_by_patient. With them: every record keeps its
    source's split; a split the source lacks is carved from its training patients (val: val_fraction of them;
    test: test_fraction, only when the source has no test split either). A patient found in two official splits
    (both eyes should be together) goes wholly to the later of them (train < val < test): no patient crosses
    splits, and the official test set never loses a patient; the count of moved images is reported."""
    official = {r.split for r in records if r.split}
    if not official:
        assignment = split_by_patient(records, val_fraction, test_fraction, seed)
        how = f"patient-level stratified ({val_fraction:g} val, {test_fraction:g} test, seed {seed})"
        return assignment, {"origin": {"train": how, "val": how, "test": how}, "moved_patients": 0,
                            "moved_images": 0}
    unknown = sorted(official - set(SPLIT_ORDER))
    if unknown:
        raise ValueError(f"official split {unknown[0]!r} is not one of {', '.join(SPLIT_ORDER)}")
    latest: dict[str, int] = {}
    for record in records:
        rank = SPLIT_ORDER.index(record.split or "train")
        latest[record.patient] = max(latest.get(record.patient, rank), rank)
    assignment = {r.key: SPLIT_ORDER[latest[r.patient]] for r in records}
    moved = [r for r in records if assignment[r.key] != (r.split or "train")]
    origin = {name: f"official: {text}" for name, text in (official_origin or {}).items() if name in official}
    for name in official - set(origin):
        origin[name] = "official"
    carve_val = "val" not in official and val_fraction > 0
    carve_test = "test" not in official and test_fraction > 0
    if carve_val or carve_test:
        train = [r for r in records if assignment[r.key] == "train"]
        # fractions of the training patients: the source's train split is what gets divided
        carved = split_by_patient(train, val_fraction if carve_val else 0.0, test_fraction if carve_test else 0.0,
                                  seed)
        assignment.update(carved)
        for name, carving in (("val", carve_val), ("test", carve_test)):
            if carving:
                share = val_fraction if name == "val" else test_fraction
                origin[name] = f"carved from the training patients by patient ({share:g}, stratified, seed {seed})"
    return assignment, {"origin": origin, "moved_patients": len({r.patient for r in moved}),
                        "moved_images": len(moved)}
