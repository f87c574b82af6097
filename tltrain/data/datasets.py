"""What `tltrain prepare` reads: one source (`source=eyepacs`), or several in one dataset
(`'sources=[eyepacs,aptos2019,messidor2]'`), as one SourceData with one label set.

Why one module: an intermediate-domain set is several public datasets at once, each with its own file names,
grade scale and patients. Combining them must not let two of them meet where they should not:
- labels: every source's label set is mapped onto the dataset's (prepare.classes; default: the first source's).
  A source whose classes and class names are those of the dataset joins as it is (EyePACS, APTOS 2019, DDR,
  IDRiD and Messidor-2 with label_set=dr all grade DR 0-4, ICDR). Any other needs `label_map` (its class value ->
  a dataset class value, or null to leave the class out, counted and listed): a DME label is never read as a
  DR grade because both happen to be written "1".
- keys: `<source>-<key>` (keys stay unique however the sources name their files; tltrain.data.keys' rules, a
  hash where the result would be too long); patients: `<source>:<patient>`, so no two sources share a patient.
- every sample's `.json` names its source (`dataset`); the manifest counts per source (prepare._manifest).
Duplicates across sources are found later, by content hash, once every image is read (prepare._drop_duplicates).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from tltrain.data.keys import HASH_LEN, MAX_KEY_LEN, key_collisions, path_hash, slug
from tltrain.data.sources import (DR_GRADE_NAMES, DR_GRADES, KIND_ALIASES, Problem, SourceConfig, SourceData,
                                  read_source)
from tltrain.errors import ConfigError

SOURCE_NAME = re.compile(r"[A-Za-z0-9_]{1,24}")  # a source name starts every key of it: no `-`, no dot
MAX_SOURCES = 64
SPLIT_RANK = {"train": 0, "val": 1, "test": 2}  # which of two identical images is kept: the later official split


@dataclass
class Dataset(SourceData):
    """A SourceData with what only several sources have: per-source descriptions, classes left out by a label
    map, and each record's source (Record.extra["dataset"])."""

    names: list[str] = field(default_factory=list)  # the sources, in the order given
    left_out: list[Problem] = field(default_factory=list)  # images of classes a label_map maps to null
    source_of_problem: list[str] = field(default_factory=list)  # the source of each problem (counts per source)
    split_origins: dict[str, dict[str, str]] = field(default_factory=dict)  # source -> its official splits
    outcomes: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> {"ungradable": n, "left_out": n}


def dataset_name(cfg: SourceConfig) -> str:
    """The name a single source's samples carry in their `.json` (`dataset`): its layout's kind."""
    return KIND_ALIASES.get(cfg.kind, cfg.kind)


def common_label_set(classes, first: SourceData) -> tuple[list[str], list[str]]:
    """(class values, class names) of the dataset: prepare.classes (DR names when they are the DR grades 0-4),
    else the first source's."""
    if classes is None:
        return list(first.classes), list(first.class_names)
    values = [str(c) for c in classes]
    return values, list(DR_GRADE_NAMES) if values == list(DR_GRADES) else values


def read_dataset(single: SourceConfig | None, several: dict[str, SourceConfig], classes=None,
                 follow_links_outside: bool = False) -> Dataset:
    """The records of `single`, or of every source of `several` combined (module docstring)."""
    if not several:
        name = dataset_name(single)
        data = read_source(single, follow_links_outside)
        values, names = common_label_set(classes, data)
        records, left_out = map_labels(data, values, names, single.label_map, "source")
        for record in records:
            record.extra = {**(record.extra or {}), "dataset": name}
        return Dataset(records, data.problems, values, names, description=data.description,
                       candidates=data.candidates, ungradable=data.ungradable,
                       names=[name], left_out=left_out, source_of_problem=[name] * len(data.problems),
                       split_origins={name: data.split_origin},
                       outcomes={name: {"ungradable": len(data.ungradable), "left_out": len(left_out)}})
    check_source_names(several)
    parts = {name: read_source(cfg, follow_links_outside) for name, cfg in several.items()}
    values, class_names = common_label_set(classes, next(iter(parts.values())))
    dataset = Dataset([], [], values, class_names, names=list(parts),
                      description={"kind": "multi", "root": _common_root(parts), "sources": {}})
    for name, data in parts.items():
        records, left_out = map_labels(data, values, class_names, several[name].label_map, f"sources.{name}")
        for record in records:
            record.key, record.patient = f"{name}-{record.key}", f"{name}:{record.patient}"
            record.extra = {**(record.extra or {}), "dataset": name}
        dataset.records += records
        dataset.problems += data.problems
        dataset.source_of_problem += [name] * len(data.problems)
        dataset.ungradable += data.ungradable
        dataset.left_out += left_out
        dataset.candidates |= {f"{name}:{key}" for key in data.candidates}
        dataset.split_origins[name] = data.split_origin
        dataset.outcomes[name] = {"ungradable": len(data.ungradable), "left_out": len(left_out)}
        dataset.description["sources"][name] = {**data.description, "classes": data.classes,
                                                "label_map": _plain(several[name].label_map)}
    _shorten_keys(dataset)
    return dataset


def check_source_names(several: dict[str, SourceConfig]) -> None:
    if len(several) > MAX_SOURCES:
        raise ConfigError(f"prepare.sources names {len(several)} sources; at most {MAX_SOURCES}")
    for name in several:
        if not SOURCE_NAME.fullmatch(str(name)):
            raise ConfigError(f"prepare.sources.{name}: a source name is 1-24 letters, digits or `_` (it starts "
                              "every sample key of the source)")


def map_labels(data: SourceData, values: list[str], names: list[str], label_map, where: str):
    """(records with labels indexing the dataset's classes, the images left out by a null mapping). Without a
    label_map the source's classes and names must be the dataset's; ConfigError naming the key otherwise."""
    if not label_map:
        if list(data.classes) != values or list(data.class_names) != names:
            raise ConfigError(
                f"{where}: its classes {_listing(data.classes, data.class_names)} are not the dataset's "
                f"{_listing(values, names)}; give {where}.label_map (its class -> a dataset class, or null to "
                "leave the class out), or prepare.classes")
        return data.records, []
    mapping = {str(key): None if value is None else str(value) for key, value in label_map.items()}
    unmapped = [c for c in data.classes if c not in mapping]
    unknown = sorted({v for v in mapping.values() if v is not None and v not in values})
    stray = sorted(set(mapping) - set(data.classes))
    if unmapped or unknown or stray:
        what = (f"no mapping for its class(es) {', '.join(unmapped)}" if unmapped else
                f"maps to {', '.join(unknown)}, not in the dataset's classes {', '.join(values)}" if unknown else
                f"maps class(es) {', '.join(stray)} that it does not have (its classes: {', '.join(data.classes)})")
        raise ConfigError(f"{where}.label_map: {what}")
    kept, left_out = [], []
    for record in data.records:
        source_class = data.classes[record.label]
        target = mapping[source_class]
        if target is None:
            left_out.append(Problem(record.path, f"class {source_class!r} is mapped to null by {where}.label_map"))
        else:
            kept.append(replace(record, label=values.index(target)))
    return kept, left_out


def _listing(values, names) -> str:
    return ", ".join(v if v == n else f"{v} ({n})" for v, n in zip(values, names))


def _plain(label_map):
    return None if not label_map else {str(k): None if v is None else str(v) for k, v in label_map.items()}


def _common_root(parts: dict[str, SourceData]) -> str:
    roots = [str(data.description.get("root")) for data in parts.values()]
    try:
        return os.path.commonpath(roots)
    except ValueError:
        return roots[0]


def _shorten_keys(dataset: Dataset) -> None:
    """`<source>-<key>` longer than a key may be: a slug plus the hash of `<source>/<file>` (tltrain.data.keys).
    Keys equal ignoring case after that are a problem naming both files, the later one dropped."""
    for record in dataset.records:
        if len(record.key) > MAX_KEY_LEN:
            source = record.extra["dataset"]
            record.key = f"{slug(record.key)[:MAX_KEY_LEN - HASH_LEN - 1]}-{path_hash(f'{source}/{record.file}')}"
    dropped = set()
    for first, later in key_collisions([r.key for r in dataset.records]):
        dataset.problems.append(Problem(dataset.records[later].path, f"sample key {dataset.records[later].key!r} "
                                        f"collides with that of {dataset.records[first].path}"))
        dataset.source_of_problem.append(dataset.records[later].extra["dataset"])
        dropped.add(later)
    dataset.records = [r for i, r in enumerate(dataset.records) if i not in dropped]


def find_duplicates(good: list, classes: list[str], keep: bool = False) -> tuple[list, list[dict]]:
    """(the (record, inspection) pairs to write, one entry per byte-identical copy). Of identical files one is
    kept: the one in the latest official split (test before val before train: an official test set stays whole,
    as with a patient found in two splits), else the first (sources in the order given, then each source's
    order). With keep=False every other copy is left out, so one photograph never lands in two splits under two
    names (a leak no patient id can catch across sources). Each entry names both files, their sources and labels
    (`agree`: whether the grades are the same)."""
    groups: dict[str, list[int]] = {}
    for index, (_, info) in enumerate(good):
        if getattr(info, "sha256", ""):
            groups.setdefault(info.sha256, []).append(index)
    copy_of: dict[int, int] = {}  # index of a copy -> index of the one kept
    for members in groups.values():
        if len(members) > 1:
            keeper = min(members, key=lambda i: (-SPLIT_RANK.get(good[i][0].split or "train", 0), i))
            copy_of.update((i, keeper) for i in members if i != keeper)
    copies = []
    for index, keeper in sorted(copy_of.items()):
        record, other = good[index][0], good[keeper][0]
        copies.append({"file": record.path, "dataset": record.extra["dataset"], "label": classes[record.label],
                       "same_as": other.path, "same_as_dataset": other.extra["dataset"],
                       "same_as_label": classes[other.label], "agree": record.label == other.label,
                       "kept": keep, "sha256": good[index][1].sha256})
    kept = good if keep else [pair for index, pair in enumerate(good) if index not in copy_of]
    return kept, copies


def source_config(entry, where: str) -> SourceConfig:
    """A SourceConfig from a `sources` entry (a SourceConfig already, or a mapping of its fields); ConfigError
    naming the key otherwise."""
    if isinstance(entry, SourceConfig):
        return entry
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected the fields of a source (kind, root, ...), not {entry!r}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SourceConfig), entry))
    except MissingMandatoryValue as exc:
        key = f"{where}.{exc.full_key}" if getattr(exc, "full_key", None) else where
        raise ConfigError(f"{key} is required and has no value: give it on the command line ({key}=...)") from None
    except OmegaConfBaseException as exc:
        key = f"{where}.{exc.full_key}" if getattr(exc, "full_key", None) else where
        raise ConfigError(f"config {key}: {getattr(exc, 'msg', exc)}") from None
