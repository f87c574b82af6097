"""Messidor-2 as downloaded: the ADCIS images plus the Kaggle (Google Brain) adjudicated grades.

    <root>/IMAGES/20051020_43808_0100_PP.png, IM000001.JPG, ...   (.png and upper-case .JPG mixed)
    <root>/messidor_data.csv   image_id (file name with extension), adjudicated_dr_grade (0-4),
                               adjudicated_dme (0/1), adjudicated_gradable (1/0; grades empty when 0)
    <root>/messidor-2.csv      optional, from ADCIS: "left;right" image names, one examination per row

Why the examination pairs matter: Messidor-2 is two images (one per eye) of each examination, and the grades CSV
does not say which go together. With messidor-2.csv the two eyes of an examination are one patient (never split
across train/val/test); without it every image is its own patient, a leak risk the manifest records
(description["patients"]). Images marked ungradable are an outcome (SourceData.ungradable), not a problem.
Messidor-2 has no official splits: prepare splits by patient.
"""
from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from tltrain import safe_io
from tltrain.data.sources import (DR_GRADE_NAMES, DR_GRADES, LABELS_CSV_BYTES, Problem, Record, SourceConfig,
                                  SourceData, _assign_keys, _index_images, _read_label_rows,
                                  folder_description, outside_root)
from tltrain.errors import ConfigError, DataError

LABELS_CSV = "messidor_data.csv"
IMAGE_DIR = "IMAGES"
PAIRS_CSV = "messidor-2.csv"
NAME_COLUMN = "image_id"
GRADABLE_COLUMN = "adjudicated_gradable"
DR_COLUMN = "adjudicated_dr_grade"
DME_COLUMN = "adjudicated_dme"
DME_CLASSES = ("0", "1")
DME_NAMES = ("no DME", "DME")
#: label_set -> (label column, classes, class names, the other set's column and its .json key and classes)
LABEL_SETS = {
    "dr": (DR_COLUMN, DR_GRADES, DR_GRADE_NAMES, DME_COLUMN, "dme", DME_CLASSES),
    "dme": (DME_COLUMN, DME_CLASSES, DME_NAMES, DR_COLUMN, "dr_grade", DR_GRADES),
}
_WHOLE_FLOAT = re.compile(r"(\d+)\.0*")  # "2.0": a grade column written through pandas (NaN made it float)


def read(cfg: SourceConfig, follow_links_outside: bool = False) -> SourceData:
    """Records of the gradable images (label = source.label_set), the ungradable ones as an outcome, problems."""
    if cfg.classes:
        raise ConfigError("source.classes does not apply to messidor2: its classes follow source.label_set "
                          "(dr: grades 0-4, dme: 0/1)")
    root = Path(cfg.root)
    csv_path = root / (cfg.labels_csv or LABELS_CSV)
    image_dir = root / (cfg.image_dir or IMAGE_DIR)
    label_column, classes, class_names, other_column, other_key, other_classes = LABEL_SETS[cfg.label_set]
    rows = _read_label_rows(csv_path, NAME_COLUMN, label_column)
    if not rows:
        raise DataError(f"{csv_path}: no label rows")
    missing = [c for c in (GRADABLE_COLUMN, other_column) if c not in rows[0][1]]
    if missing:
        raise DataError(f"{csv_path}: wrong columns: expected {NAME_COLUMN!r}, {DR_COLUMN!r}, {DME_COLUMN!r} and "
                        f"{GRADABLE_COLUMN!r}; {', '.join(map(repr, missing))} missing")
    problems: list[Problem] = []
    images = _ImageNames(image_dir)
    records, ungradable, named, unmatched = [], [], set(), set()
    seen: dict[str, int] = {}
    for line, row in rows:
        if not any((value or "").strip() for value in row.values() if isinstance(value, str)):
            continue  # a line of empty cells (a spreadsheet export's padding)
        where = f"{csv_path}:{line}"
        name = (row.get(NAME_COLUMN) or "").strip()
        if not name:
            problems.append(Problem(where, f"empty {NAME_COLUMN}"))
            continue
        if name.lower() in seen:
            problems.append(Problem(where, f"duplicate {NAME_COLUMN} {name!r} (first at line {seen[name.lower()]})"))
            continue
        seen[name.lower()] = line
        path = images.find(name)
        if path is None:
            problems.append(Problem(where, f"{NAME_COLUMN} {name!r} has no image file in {image_dir}"))
            unmatched.add(name)
            continue
        named.add(path.name)
        gradable = _cell(row.get(GRADABLE_COLUMN))
        if gradable == "0":
            ungradable.append(Problem(str(path), f"adjudicated ungradable ({GRADABLE_COLUMN}=0 at "
                                                 f"{csv_path.name}:{line})"))
            continue
        if gradable != "1":
            problems.append(Problem(where, f"{GRADABLE_COLUMN} {gradable!r} for {name!r} (valid: 1, 0)"))
            continue
        label, other = _cell(row.get(label_column)), _cell(row.get(other_column))
        if label not in classes:
            problems.append(Problem(where, f"unknown {label_column} {label!r} for {name!r} "
                                           f"(valid: {', '.join(classes)})"))
            continue
        if other and other not in other_classes:
            problems.append(Problem(where, f"unknown {other_column} {other!r} for {name!r} "
                                           f"(valid: {', '.join(other_classes)}, or empty)"))
            continue
        records.append(Record("", path.stem, classes.index(label), str(path), name=path.stem,
                              extra={other_key: int(other) if other else None}))
    for path in images.all():
        if path.name not in named:
            problems.append(Problem(str(path), f"image has no row in {csv_path.name}"))
    pairs_path = root / PAIRS_CSV
    description = folder_description("messidor2", root, csv_path, image_dir, label_set=cfg.label_set)
    if pairs_path.exists():
        patient_of = _examinations(pairs_path, images, problems)
        for record in records:
            record.patient = patient_of.get(Path(record.path).name, record.patient)
        description.update(patients="from pairs file", pairs_csv=str(pairs_path.resolve()),
                           examinations=len(set(patient_of.values())),
                           unpaired_images=sum(Path(r.path).name not in patient_of for r in records))
    else:
        description.update(patients="one per image", pairs_csv=None)
    records = _assign_keys(outside_root(records, problems, root, follow_links_outside), problems, root)
    candidates = {path.name for path in images.all()} | unmatched
    return SourceData(records, images.unread + problems, list(classes), list(class_names), description=description,
                      candidates=candidates, ungradable=ungradable)


def _cell(value) -> str:
    """A grade cell as written, less spaces and a pandas-style ".0"."""
    text = (value or "").strip() if isinstance(value, str) else ""
    whole = _WHOLE_FLOAT.fullmatch(text)
    return whole.group(1) if whole else text


class _ImageNames:
    """The image files of IMAGES/ by file name. The CSVs name files with their extension; a name differing only
    in case from exactly one file (IM000001.jpg for IM000001.JPG) still finds it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.unread: list[Problem] = []
        by_stem = _index_images(folder, self.unread)
        self.by_name = {path.name: path for paths in by_stem.values() for path in paths}
        self.by_folded: dict[str, list[Path]] = {}
        for name, path in self.by_name.items():
            self.by_folded.setdefault(name.lower(), []).append(path)

    def find(self, name: str) -> Path | None:
        if name in self.by_name:
            return self.by_name[name]
        folded = self.by_folded.get(name.lower(), [])
        return folded[0] if len(folded) == 1 else None

    def all(self) -> list[Path]:
        return list(self.by_name.values())


def _examinations(pairs_path: Path, images: _ImageNames, problems: list[Problem]) -> dict[str, str]:
    """image file name -> examination (patient) from ADCIS's messidor-2.csv: images named in one row, or linked
    through rows sharing an image, are one patient, named after the first of its images in sorted order. A row
    naming an image that IMAGES/ lacks is a problem naming the line: the file does not match this download."""
    group: dict[str, str] = {}

    def top(name: str) -> str:
        while group[name] != name:
            group[name] = group[group[name]]
            name = group[name]
        return name

    for line, names in _read_pairs(pairs_path):
        found = []
        for name in names:
            path = images.find(name)
            if path is None:
                problems.append(Problem(f"{pairs_path}:{line}", f"names {name!r}, which has no image file in "
                                                                f"{images.folder}"))
            else:
                found.append(path.name)
                group.setdefault(path.name, path.name)
        for name in found[1:]:
            first, other = top(found[0]), top(name)
            if first != other:
                group[max(first, other)] = min(first, other)
    return {name: Path(top(name)).stem for name in group}


def _read_pairs(pairs_path: Path) -> list[tuple[int, list[str]]]:
    """(line, image names) per examination row of messidor-2.csv: a bounded regular file, `;`-separated as ADCIS
    ships it (`,` also read), header "left;right" (spaces around names ignored)."""
    with safe_io.open_regular(pairs_path, "examination pairs CSV") as raw:
        size = os.fstat(raw.fileno()).st_size
        if size > LABELS_CSV_BYTES:
            raise DataError(f"{pairs_path}: pairs CSV is {size:,} bytes, over the {LABELS_CSV_BYTES:,}-byte limit")
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="").read()
    header = text.split("\n", 1)[0]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=";" if ";" in header else ",")
    try:
        columns = [name.strip().lower() for name in next(reader, [])]
        if columns[:2] != ["left", "right"]:
            raise DataError(f"{pairs_path}: wrong columns: expected 'left' and 'right' (the examination pairs of "
                            f"ADCIS's messidor-2.csv), found {', '.join(map(repr, columns)) or 'no header'}")
        return [(reader.line_num, [cell.strip() for cell in row[:2] if cell.strip()]) for row in reader]
    except csv.Error as exc:
        raise DataError(f"{pairs_path}:{reader.line_num}: not a readable CSV ({exc})") from None
