"""DDR (Li et al. 2019, "Diagnostic Assessment of Deep Learning Algorithms for Diabetic Retinopathy Screening"):
its DR grading part, as downloaded.

The official download (DDR-dataset.zip, linked from github.com/nkicsl/DDR-dataset) holds DR_grading/ with the
image folders train/, valid/, test/ and the lists train.txt, valid.txt, test.txt, one `<file name> <grade>` line
per image (`007-0004-000.jpg 0`). source.root may be the folder holding DR_grading or DR_grading itself: both name
the same dataset (the manifest's root is DR_grading). train/valid/test are the official splits (train/val/test).

A third-party Kaggle copy (mariaherrerot/ddrdataset) is read too: DR_grading.csv (id_code = file name with .jpg,
diagnosis) beside DR_grading/DR_grading/ holding every image. It keeps no official split: prepare carves val and
test by patient, as for any source without one.

Grades 0-4 are the DR grades; 5 is DDR's "ungradable": an outcome (SourceData.ungradable), neither a record nor a
problem. Patients: DDR has 13,673 images of 9,598 patients but publishes no patient id; its names are
`NNN-NNNN-NNN` or 17-digit timestamps, and their parts are not patient keys (grouping by the first two parts gives
one image per group), so each image is its own patient. One name in two official splits is then one patient,
which prepare moves wholly to the later split and counts.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

from tltrain import safe_io
from tltrain.data.sources import (DR_GRADE_NAMES, DR_GRADES, IMAGE_EXTENSIONS, LABELS_CSV_BYTES, Problem, Record,
                                  SourceConfig, SourceData, _assign_keys, _read_label_rows, outside_root,
                                  unread_images)
from tltrain.errors import ConfigError, DataError

#: (folder and list name in DR_grading, Record.split)
OFFICIAL_SPLITS = (("train", "train"), ("valid", "val"), ("test", "test"))
UNGRADABLE_GRADE = 5
KAGGLE_CSV = "DR_grading.csv"
GRADE = re.compile(r"[0-9]{1,6}")


def read(cfg: SourceConfig, follow_links_outside: bool = False) -> SourceData:
    """Records (grades 0-4, official split where there is one), ungradable images and problems of a DDR copy."""
    _check_options(cfg)
    root = Path(cfg.root)
    base = _grading_folder(root)
    if base is not None:
        listings = _official_listings(base)
        layout = "official download"
        origin = {split: f"DR_grading/{folder}/ + {folder}.txt" for folder, split in OFFICIAL_SPLITS}
    elif (root / KAGGLE_CSV).is_file():
        base = root
        images = root / "DR_grading" / "DR_grading"
        if not images.is_dir():
            images = root / "DR_grading"
        listings = [(root / KAGGLE_CSV, images, None)]
        layout = "Kaggle copy (no official splits)"
        origin = {}
    else:
        raise DataError(f"source.root={str(root)!r}: not a DDR copy: expected DR_grading/ holding train.txt, "
                        "valid.txt, test.txt and the folders train/, valid/, test/ (the official download; "
                        "source.root may also be DR_grading itself), or DR_grading.csv beside "
                        "DR_grading/DR_grading/ (the Kaggle copy)")
    records, problems, ungradable, candidates = [], [], [], set()
    for labels, folder, split in listings:
        rows = _read_kaggle_rows(labels) if split is None else _read_list(labels, problems)
        images = _images(folder, problems)
        missing = _match(labels, folder, rows, images, split, records, problems, ungradable)
        prefix = "" if split is None else f"{folder.name}/"
        candidates.update(prefix + name for name in [*images, *missing])
    records = _assign_keys(outside_root(records, problems, root, follow_links_outside), problems, base)
    return SourceData(records, problems, list(DR_GRADES), list(DR_GRADE_NAMES), candidates=candidates,
                      ungradable=ungradable, split_origin=origin,
                      description={"kind": "ddr", "layout": layout, "root": str(base.resolve()),
                                   "labels": [str(labels.resolve()) for labels, _, _ in listings],
                                   "image_dirs": [str(folder.resolve()) for _, folder, _ in listings]})


def _check_options(cfg: SourceConfig) -> None:
    """DDR fixes its own files, columns and grades: an option that would be ignored is an error, not a surprise."""
    ignored = [name for name in ("labels_csv", "image_dir", "key_column", "label_column", "patient_column")
               if getattr(cfg, name)]
    if ignored:
        raise ConfigError(f"source.kind=ddr reads its own layout; source.{ignored[0]} is not used (leave it unset)")
    if cfg.classes and [str(c) for c in cfg.classes] != list(DR_GRADES):
        raise ConfigError("source.kind=ddr has the DR grades 0-4 as classes; leave source.classes unset")
    if cfg.label_set != "dr":
        raise ConfigError(f"source.label_set={cfg.label_set}: DDR grades diabetic retinopathy only (label_set=dr)")


def _grading_folder(root: Path) -> Path | None:
    """The official DR_grading folder: root/DR_grading or root itself, whichever holds one of the lists."""
    for base in (root / "DR_grading", root):
        if any((base / f"{folder}.txt").exists() for folder, _ in OFFICIAL_SPLITS):
            return base
    return None


def _official_listings(base: Path) -> list[tuple[Path, Path, str]]:
    """(list, image folder, split) of the three official splits; a part missing is a broken download: fatal."""
    listings = [(base / f"{folder}.txt", base / folder, split) for folder, split in OFFICIAL_SPLITS]
    missing = [labels.name for labels, _, _ in listings if not labels.exists()]
    missing += [f"{folder.name}/" for _, folder, _ in listings if not folder.is_dir()]
    if missing:
        raise DataError(f"{base}: incomplete DDR DR_grading folder: {', '.join(missing)} not found (the download "
                        "holds train.txt, valid.txt, test.txt and train/, valid/, test/)")
    return listings


def _read_list(path: Path, problems: list[Problem]) -> list[tuple[int, str, str]]:
    """(line, file name, grade) of a DDR list someone else wrote: a regular file of at most LABELS_CSV_BYTES; a
    line that is not `<file name> <grade>` is a problem naming file:line (blank lines are passed over)."""
    rows = []
    with safe_io.open_regular(path, "DDR label list") as raw:
        size = os.fstat(raw.fileno()).st_size
        if size > LABELS_CSV_BYTES:
            raise DataError(f"{path}: DDR label list is {size:,} bytes, over the {LABELS_CSV_BYTES:,}-byte limit")
        for line, text in enumerate(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace"), start=1):
            fields = text.split()
            if not fields:
                continue
            if len(fields) != 2:
                problems.append(Problem(f"{path}:{line}", f"malformed line {safe_io.printable(text.strip(), 200)!r}"
                                                          ": expected '<image file name> <grade>'"))
                continue
            rows.append((line, fields[0], fields[1]))
    return rows


def _read_kaggle_rows(path: Path) -> list[tuple[int, str, str]]:
    return [(line, (row.get("id_code") or "").strip(), (row.get("diagnosis") or "").strip())
            for line, row in _read_label_rows(path, "id_code", "diagnosis")]


def _images(folder: Path, problems: list[Problem]) -> dict[str, Path]:
    """Image files of a folder by file name (non-recursive); types tltrain does not read are problems."""
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    files = [path for path in sorted(folder.iterdir()) if path.is_file()]
    problems += unread_images(files)
    images = {path.name: path for path in files if path.suffix.lower() in IMAGE_EXTENSIONS}
    if not images:
        raise DataError(f"{folder}: empty folder (no {'/'.join(IMAGE_EXTENSIONS)} images)")
    return images


def _match(labels: Path, folder: Path, rows, images: dict[str, Path], split: str | None, records: list[Record],
           problems: list[Problem], ungradable: list[Problem]) -> list[str]:
    """Rows of one list against its image folder: grades 0-4 become records, 5 ungradable, the rest problems
    naming the list's line or the image file. Returns the listed names that have no image."""
    by_stem: dict[str, list[Path]] = {}
    by_lower = {name.lower(): name for name in images}
    for path in images.values():
        by_stem.setdefault(path.stem, []).append(path)
    entry = "row" if split is None else "line"
    first_line: dict[str, int] = {}  # image file name -> the line that graded it
    missing = []
    for line, name, grade in rows:
        where = f"{labels}:{line}"
        if not name:
            problems.append(Problem(where, "empty image name"))
            continue
        path = images.get(name)
        if path is None and split is None and Path(name).suffix.lower() not in IMAGE_EXTENSIONS \
                and len(by_stem.get(name, [])) == 1:
            path = by_stem[name][0]  # the Kaggle CSV's id without its extension
        if path is None:
            twin = by_lower.get(name.lower())
            hint = f" (there is {twin!r}: names must match exactly)" if twin else ""
            problems.append(Problem(where, f"lists {name!r}, which is not in {folder}{hint}"))
            missing.append(name)
            continue
        if path.name in first_line:
            problems.append(Problem(where, f"{name!r} listed again (first at {entry} {first_line[path.name]})"))
            continue
        first_line[path.name] = line
        if not GRADE.fullmatch(grade) or int(grade) > UNGRADABLE_GRADE:
            problems.append(Problem(where, f"grade {safe_io.printable(grade, 50)!r} for {name!r} is not one of 0-5 "
                                           "(0-4: DR grades, 5: ungradable)"))
        elif int(grade) == UNGRADABLE_GRADE:
            ungradable.append(Problem(str(path), f"grade 5 (ungradable) in {where}"))
        else:
            records.append(Record(path.stem, path.stem, int(grade), str(path), name=path.stem, split=split))
    for name, path in images.items():
        if name not in first_line:
            problems.append(Problem(str(path), f"image has no {entry} in {labels.name}"))
    return missing
