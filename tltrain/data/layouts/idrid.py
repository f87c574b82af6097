"""IDRiD, part "B. Disease Grading", as downloaded from IEEE DataPort (folder names with their spaces and dots):

    B. Disease Grading/1. Original Images/a. Training Set/IDRiD_001.jpg ... IDRiD_413.jpg
    B. Disease Grading/1. Original Images/b. Testing Set/IDRiD_001.jpg ... IDRiD_103.jpg   (numbered from 001 again)
    B. Disease Grading/2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv
    B. Disease Grading/2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv
        columns "Image name" (no extension), "Retinopathy grade" (0-4), "Risk of macular edema " (0-2), then
        empty columns and rows of empty cells (the spreadsheet export's padding, skipped)

source.root is the folder holding "B. Disease Grading" or that folder itself. Training and Testing are the official
splits (Record.split); prepare carves val from the training patients. Both sets start at IDRiD_001, so a test
image's name gets "_test" (IDRiD_001_test) and keys stay unique. IDRiD publishes no patient ids: each image is
its own patient. IDRiD marks no image ungradable.
"""
from __future__ import annotations

from pathlib import Path

from tltrain.data.sources import (DR_GRADE_NAMES, DR_GRADES, IMAGE_EXTENSIONS, Problem, SourceConfig, SourceData,
                                  _assign_keys, _index_images, _join, _read_label_rows, outside_root)
from tltrain.errors import ConfigError, DataError

GRADING_DIR = "B. Disease Grading"
IMAGES_DIR = "1. Original Images"
TRUTHS_DIR = "2. Groundtruths"
#: (official split, image folder, labels CSV, suffix of its names)
SETS = (
    ("train", "a. Training Set", "a. IDRiD_Disease Grading_Training Labels.csv", ""),
    ("test", "b. Testing Set", "b. IDRiD_Disease Grading_Testing Labels.csv", "_test"),
)
NAME_COLUMN = "Image name"
DR_COLUMN = "Retinopathy grade"
DME_COLUMN = "Risk of macular edema"  # written "Risk of macular edema " (the reader strips header names)
DME_CLASSES = ("0", "1", "2")
DME_NAMES = ("no DME risk", "exudates beyond 1 disc diameter of the macula",
             "exudates within 1 disc diameter of the macula")
#: label_set -> (label column, classes, class names, the other set's column and its .json key and classes)
LABEL_SETS = {
    "dr": (DR_COLUMN, DR_GRADES, DR_GRADE_NAMES, DME_COLUMN, "dme", DME_CLASSES),
    "dme": (DME_COLUMN, DME_CLASSES, DME_NAMES, DR_COLUMN, "dr_grade", DR_GRADES),
}


def grading_folder(root: Path) -> Path:
    """The "B. Disease Grading" folder: source.root itself or the folder of that name inside it."""
    if (root / GRADING_DIR).is_dir():
        return root / GRADING_DIR
    if (root / IMAGES_DIR).is_dir() or (root / TRUTHS_DIR).is_dir():
        return root
    raise DataError(f"source.root={str(root)!r}: no {GRADING_DIR!r} folder (IDRiD's disease grading part); point "
                    f"source.root at the folder holding it, or at {GRADING_DIR!r} itself")


def read(cfg: SourceConfig, follow_links_outside: bool = False) -> SourceData:
    """Records of both official sets, labelled by source.label_set; the other label set goes to the .json."""
    for key in ("labels_csv", "image_dir", "classes"):
        if getattr(cfg, key):
            raise ConfigError(f"source.{key} does not apply to idrid: its folder tree and CSVs are fixed, and its "
                              "classes follow source.label_set (dr: grades 0-4, dme: 0-2)")
    base = grading_folder(Path(cfg.root))
    label_column, classes, class_names, other_column, other_key, other_classes = LABEL_SETS[cfg.label_set]
    records, problems, candidates, origin, csvs, folders = [], [], set(), {}, {}, {}
    for split, image_folder, csv_name, suffix in SETS:
        csv_path = base / TRUTHS_DIR / csv_name
        folder = base / IMAGES_DIR / image_folder
        rows = [(line, row) for line, row in _read_label_rows(csv_path, NAME_COLUMN, label_column)
                if any((value or "").strip() for value in row.values() if isinstance(value, str))]
        if rows and other_column not in rows[0][1]:
            raise DataError(f"{csv_path}: wrong columns: expected {NAME_COLUMN!r}, {DR_COLUMN!r} and "
                            f"{DME_COLUMN!r}; {other_column!r} missing")
        unread: list[Problem] = []
        by_key = _index_images(folder, unread)
        found, mismatches, keys = _join(csv_path, rows, by_key, NAME_COLUMN, label_column, list(classes),
                                        lambda key, row, suffix=suffix: key + suffix)
        other_of: dict[str, tuple[str, int]] = {}  # the first row of a name: the one _join labels it from
        for line, row in rows:
            name = (row.get(NAME_COLUMN) or "").strip()
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:  # IDRiD_001.jpg: the record's name is IDRiD_001
                name = name[:-len(Path(name).suffix)]
            other_of.setdefault(name, ((row.get(other_column) or "").strip(), line))
        for record in found:
            other, line = other_of[record.name]
            if other and other not in other_classes:
                mismatches.append(Problem(f"{csv_path}:{line}", f"unknown {other_column} {other!r} for "
                                                                f"{record.name!r} (valid: {', '.join(other_classes)})"))
                continue
            record.name += suffix
            record.split = split
            record.extra = {other_key: int(other) if other else None}
            records.append(record)
        problems += unread + mismatches
        candidates |= {key + suffix for key in keys}
        origin[split] = f"{IMAGES_DIR}/{image_folder} + {TRUTHS_DIR}/{csv_name}"
        csvs[split], folders[split] = str(csv_path.resolve()), str(folder.resolve())
    records = _assign_keys(outside_root(records, problems, base, follow_links_outside), problems, base)
    description = {"kind": "idrid", "root": str(base.resolve()), "label_set": cfg.label_set,
                   "labels_csvs": csvs, "image_dirs": folders, "patients": "one per image"}
    return SourceData(records, problems, list(classes), list(class_names), description=description,
                      candidates=candidates, split_origin=origin)

