"""Dataset sources -> records (key, patient, label, path) plus every problem found, each naming its file.

Why a list of problems instead of raising at the first one: a user fixing an 80k-image dataset wants the whole
list in one go, and with `on_problem=skip` the good samples must still be written (a good image is never lost).
Structural problems (a CSV with the wrong columns, an empty folder) are fatal: there is nothing sane to write.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from tltrain import safe_io
from tltrain.data.keys import key_collisions, make_keys, relative_file
from tltrain.data.layouts import LAYOUTS, layout_reader
from tltrain.errors import ConfigError, DataError, choices_error

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")  # what decode reads
#: Image types found in the wild that tltrain does not read: listed as problems, never silently passed over.
UNREAD_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".jp2", ".j2k", ".jpx", ".jxl", ".dcm", ".dicom", ".svg",
                           ".psd", ".dng", ".nef", ".cr2", ".arw", ".raw", ".ppm", ".pgm", ".pbm", ".ico", ".tga")
LABELS_CSV_BYTES = 1 << 30  # 1 GiB: ~10 million label rows
DR_GRADES = ("0", "1", "2", "3", "4")
DR_GRADE_NAMES = ("no DR", "mild", "moderate", "severe", "proliferative DR")
SOURCE_KINDS = ("eyepacs", "aptos", "aptos2019", "messidor2", "idrid", "ddr", "imagefolder", "csv")
#: Older kind names kept working: source=aptos reads APTOS 2019 as it always did (tltrain.data.layouts.aptos2019).
KIND_ALIASES = {"aptos": "aptos2019"}
LABEL_SETS = ("dr", "dme")  # messidor2, idrid: which of their two label sets is the label


@dataclass
class SourceConfig:
    """Where the raw dataset is and how to read it. Defaults per kind follow the Kaggle layouts."""

    kind: str = "eyepacs"  # one of SOURCE_KINDS: a built-in layout (tltrain.data.layouts), imagefolder or csv
    root: str = MISSING  # dataset folder
    labels_csv: str | None = None  # relative to root; eyepacs: trainLabels.csv, aptos: train.csv
    image_dir: str | None = None  # relative to root; eyepacs: train, aptos: train_images, csv: root
    key_column: str | None = None  # csv: column holding the image name, with or without its extension
    label_column: str | None = None  # csv: column holding the label
    patient_column: str | None = None  # csv: optional patient id column (default: one patient per image)
    classes: list[str] | None = None  # label values in class order; None: DR grades 0-4 (imagefolder: folder names)
    label_set: str = "dr"  # messidor2, idrid: dr (DR grade 0-4) | dme (macular oedema); the other set goes to .json
    #: This source's class value -> a class value of the dataset's label set (prepare.classes), or null to leave
    #: that class out (counted and listed in manifest.json). Empty: the source's label set must be the dataset's.
    label_map: Any = None

    def validate(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise choices_error("source.kind", self.kind, SOURCE_KINDS)
        if self.label_set not in LABEL_SETS:
            raise choices_error("source.label_set", self.label_set, LABEL_SETS)
        if not Path(self.root).is_dir():
            raise DataError(f"source.root={self.root!r}: no such folder")
        if self.kind == "csv" and not (self.labels_csv and self.key_column and self.label_column):
            raise ConfigError("source.kind=csv needs source.labels_csv, source.key_column and source.label_column")
        if self.label_map is not None and (not isinstance(self.label_map, dict) or len(self.label_map) > 10_000):
            raise ConfigError("source.label_map must be a mapping {source class: dataset class or null}")


@dataclass(slots=True)  # one per image: no per-instance __dict__ (tens of thousands are held during prepare)
class Record:
    key: str  # unique sample key: the name itself when safe (10_left), else a slug + hash (tltrain.data.keys)
    patient: str  # samples of one patient always land in the same split (derived from the original name)
    label: int  # class index into the source's class list
    path: str  # image file
    name: str = ""  # the original sample name (CSV image id; imagefolder: <class>_<file stem>)
    file: str = ""  # the image file relative to the source root, as found
    split: str | None = None  # the source's official split (train | val | test), None where it defines none
    extra: dict | None = None  # what the source says besides the label (EyePACS Usage, the other label set, ...)


@dataclass
class Problem:
    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass
class SourceData:
    records: list[Record]
    problems: list[Problem]
    classes: list[str]
    class_names: list[str]
    description: dict = field(default_factory=dict)
    candidates: set[str] = field(default_factory=set)  # every key seen (files and label rows): "found"
    #: Images the source itself marks ungradable: an outcome (left out of the label set, counted, listed), not a
    #: problem; `on_problem` is for files that are really broken.
    ungradable: list[Problem] = field(default_factory=list)
    #: Where each official split comes from ("test": "test/ + retinopathy_solution.csv"); empty: no official split.
    split_origin: dict[str, str] = field(default_factory=dict)


def _index_images(folder: Path, problems: list[Problem]) -> dict[str, list[Path]]:
    """Image files of a folder by key (name without extension); several files per key = a duplicate. Images of
    a type tltrain does not read are added to `problems`."""
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found")
    by_key: dict[str, list[Path]] = {}
    files = [path for path in sorted(folder.iterdir()) if path.is_file()]
    for path in files:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            by_key.setdefault(path.stem, []).append(path)
    problems += unread_images(files)
    if not by_key:
        raise DataError(f"{folder}: empty folder (no {'/'.join(IMAGE_EXTENSIONS)} images)")
    return by_key


def unread_images(files: list[Path]) -> list[Problem]:
    """A problem for each file of an image type tltrain does not read (HEIC, JPEG 2000, DICOM, ...)."""
    return [Problem(str(path), f"image type {path.suffix.lower()} is not read by tltrain (it reads "
                               f"{', '.join(IMAGE_EXTENSIONS)}); convert it to PNG or JPEG")
            for path in files if path.suffix.lower() in UNREAD_IMAGE_EXTENSIONS]


def count_images(folder: Path) -> int:
    """Image files directly in a folder (0 when it is absent): what a layout reports of images it does not write,
    such as a competition's unlabelled test set."""
    if not folder.is_dir():
        return 0
    return sum(1 for path in folder.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())


def outside_root(records: list[Record], problems: list[Problem], root: Path, allow: bool) -> list[Record]:
    """Records whose file, symlinks followed, stays inside the source root; the others become problems naming
    the file and where it leads (a dataset folder from someone else must not pull in files from elsewhere on
    this machine). allow (prepare's follow_links_outside=true) keeps them."""
    if allow:
        return records
    base = root.resolve()
    kept = []
    for record in records:
        resolved = Path(record.path).resolve()
        if resolved == base or base not in resolved.parents:
            problems.append(Problem(record.path, f"leads outside source.root {base} (to {resolved}) through a "
                                                 "symbolic link; not read (pass follow_links_outside=true to "
                                                 "allow it)"))
        else:
            kept.append(record)
    return kept


def _read_label_rows(csv_path: Path, key_column: str, label_column: str, *more_columns: str) -> list[tuple[int, dict]]:
    """The labelled rows of a CSV someone else wrote: a regular file (a FIFO or device is refused at once) of at
    most LABELS_CSV_BYTES; a malformed CSV is one DataError naming the file. more_columns: other columns the
    CSV must have (the csv kind's patient column): a missing one is named at once, not read as empty cells."""
    if not csv_path.exists():
        raise DataError(f"{csv_path}: labels CSV not found")
    with safe_io.open_regular(csv_path, "labels CSV") as raw:
        size = os.fstat(raw.fileno()).st_size
        if size > LABELS_CSV_BYTES:
            raise DataError(f"{csv_path}: labels CSV is {size:,} bytes, over the {LABELS_CSV_BYTES:,}-byte limit")
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="")
        try:
            reader = csv.DictReader(text)
            # header names as written, less surrounding spaces (IDRiD ships "Retinopathy grade " etc.); the
            # utf-8-sig decoding above already drops a byte-order mark
            columns = [name.strip() for name in (reader.fieldnames or [])]
            reader.fieldnames = columns
            expected = [key_column, label_column, *more_columns]
            if any(c not in columns for c in expected):
                named = ", ".join(map(repr, expected[:-1])) + f" and {expected[-1]!r}"
                raise DataError(f"{csv_path}: wrong columns: expected {named}, "
                                f"found {', '.join(map(repr, columns)) or 'no header'}")
            return [(line, row) for line, row in enumerate(reader, start=2)]
        except csv.Error as exc:
            raise DataError(f"{csv_path}:{reader.line_num}: not a readable CSV ({exc})") from None


def _files_named(key: str, by_key: dict[str, list[Path]]) -> tuple[str, list[Path], bool]:
    """(sample name, its files, whether the key named the extension) for a label row's key: the key as a name
    without extension (10_left), else as a file name whose extension is compared ignoring case (IM0001.JPG,
    IM0001.jpg -> the file IM0001.JPG): the sample name is then the name without extension."""
    if key in by_key:
        return key, by_key[key], False
    stem, dot, extension = key.rpartition(".")
    if dot and stem and f".{extension.lower()}" in IMAGE_EXTENSIONS and stem in by_key:
        return stem, [p for p in by_key[stem] if p.suffix.lower() == f".{extension.lower()}"], True
    return key, [], False


def _join(csv_path: Path, rows, by_key: dict[str, list[Path]], key_column: str, label_column: str,
          classes: list[str], patient_of) -> tuple[list[Record], list[Problem], set[str]]:
    """Match labelled rows to image files; every mismatch becomes a Problem naming the file or CSV line. A key may
    name the file with or without its extension (_files_named); patient_of(name, row) gets the name without it."""
    records, problems, seen = [], [], {}
    labelled_keys = set()
    named_files: dict[str, set[Path]] = {}  # name -> the files that rows named with their extension
    for line, row in rows:
        key = (row.get(key_column) or "").strip()
        raw_label = (row.get(label_column) or "").strip()
        where = f"{csv_path}:{line}"
        if not key:
            problems.append(Problem(where, "empty image name"))
            continue
        name, files, by_extension = _files_named(key, by_key)
        if name in seen:
            problems.append(Problem(where, f"duplicate key {key!r} (first at line {seen[name]})"))
            continue
        seen[name] = line
        labelled_keys.add(name)
        if by_extension:
            named_files.setdefault(name, set()).update(files)
        if not files:
            others = ", ".join(p.name for p in by_key.get(name, []))
            problems.append(Problem(where, f"label row for {key!r} has no image file"
                                           + (f" (found {others})" if others else "")))
            continue
        if len(files) > 1:
            problems.append(Problem(str(files[1]), f"duplicate key {key!r}: also {files[0].name}"))
            continue
        if raw_label not in classes:
            problems.append(Problem(where, f"unknown grade {raw_label!r} for {key!r} "
                                           f"(valid: {', '.join(classes)})"))
            continue
        records.append(Record(name, patient_of(name, row), classes.index(raw_label), str(files[0]), name=name))
    for key, files in by_key.items():
        if key not in labelled_keys:
            problems.append(Problem(str(files[0]), f"image has no label in {csv_path.name}"))
        elif key in named_files:  # x.jpg labelled by name: x.png beside it is not
            problems += [Problem(str(path), f"image has no label in {csv_path.name}")
                         for path in files if path not in named_files[key]]
    return records, problems, set(by_key) | labelled_keys


def read_labelled_folder(csv_path: Path, image_dir: Path, key_column: str, label_column: str, classes: list[str],
                         patient_of, *more_columns: str) -> tuple[list[Record], list[Problem], set[str]]:
    """(records, problems, candidate keys) of one labels CSV and one image folder: what most layouts are made of.
    Records get their keys later (_assign_keys, once every part of a source is read)."""
    rows = _read_label_rows(csv_path, key_column, label_column, *more_columns)
    unread: list[Problem] = []
    by_key = _index_images(image_dir, unread)
    records, problems, candidates = _join(csv_path, rows, by_key, key_column, label_column, classes, patient_of)
    return records, unread + problems, candidates


def folder_description(kind: str, root: Path, csv_path: Path, image_dir: Path, **more) -> dict:
    """The manifest's `source` record of a CSV + image-folder source (resolved paths: the source's identity)."""
    return {"kind": kind, "root": str(root.resolve()), "labels_csv": str(csv_path.resolve()),
            "image_dir": str(image_dir.resolve()), **more}


def label_classes(cfg: SourceConfig) -> tuple[list[str], list[str]]:
    """(classes, class names): source.classes, else the DR grades 0-4 with their names."""
    classes = [str(c) for c in (cfg.classes or DR_GRADES)]
    return classes, list(DR_GRADE_NAMES) if classes == list(DR_GRADES) else classes


def read_source(cfg: SourceConfig, follow_links_outside: bool = False) -> SourceData:
    """The records and problems of a source. Files whose resolved path leaves cfg.root are problems unless
    follow_links_outside. Built-in dataset layouts live in tltrain.data.layouts (one module each)."""
    layout = KIND_ALIASES.get(cfg.kind, cfg.kind)
    if layout in LAYOUTS:
        return layout_reader(layout)(cfg, follow_links_outside)
    if cfg.kind == "imagefolder":
        return _read_imagefolder(Path(cfg.root), cfg, follow_links_outside)
    if cfg.kind == "csv":
        return _read_csv(cfg, follow_links_outside)
    raise choices_error("source.kind", cfg.kind, SOURCE_KINDS)


def _read_csv(cfg: SourceConfig, follow_links_outside: bool = False) -> SourceData:
    """Any labels CSV: the key column names the image (with or without extension), the label column its class;
    the optional patient column keeps one person's images in one split (empty cell: the image is its own)."""
    root = Path(cfg.root)
    csv_path, image_dir = root / cfg.labels_csv, root / (cfg.image_dir or ".")
    patient_column = cfg.patient_column

    def patient_of(key, row):
        return ((row.get(patient_column) or "").strip() or key) if patient_column else key
    classes, names = label_classes(cfg)
    records, problems, candidates = read_labelled_folder(
        csv_path, image_dir, cfg.key_column, cfg.label_column, classes, patient_of,
        *([patient_column] if patient_column else []))
    records = _assign_keys(outside_root(records, problems, root, follow_links_outside), problems, root)
    return SourceData(records, problems, classes, names, candidates=candidates,
                      description=folder_description(cfg.kind, root, csv_path, image_dir))


def _read_imagefolder(root: Path, cfg: SourceConfig, follow_links_outside: bool = False) -> SourceData:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: empty folder (an ImageFolder dataset has one sub-folder per class)")
    classes = [str(c) for c in cfg.classes] if cfg.classes else [p.name for p in class_dirs]
    records, problems, candidates, seen = [], [], set(), {}

    def key_of(folder: Path, path: Path) -> str:
        return f"{folder.name}_{path.stem}"

    for folder in class_dirs:
        files = [p for p in sorted(folder.iterdir()) if p.is_file()]
        if folder.name not in classes:
            problems += [Problem(str(p), f"class folder {folder.name!r} is not in source.classes") for p in files]
            candidates.update(f"{folder.name}/{p.stem}" for p in files)
            continue
        images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
        problems += unread_images(files)
        if not images:
            raise DataError(f"{folder}: empty folder (class {folder.name!r} has no images)")
        for path in images:
            key = key_of(folder, path)
            candidates.add(f"{folder.name}/{path.stem}")
            if (folder.name, path.stem) in seen:  # x.jpg and x.png in one folder: which one is the sample?
                problems.append(Problem(str(path), f"duplicate key {key!r}: also {seen[folder.name, path.stem]}"))
                continue
            seen[folder.name, path.stem] = path.name
            records.append(Record(key, key, classes.index(folder.name), str(path), name=key))
    records = _assign_keys(outside_root(records, problems, root, follow_links_outside), problems, root)
    return SourceData(records, problems, classes, classes, candidates=candidates,
                      description={"kind": "imagefolder", "root": str(root.resolve())})


def _assign_keys(records: list[Record], problems: list[Problem], root: Path) -> list[Record]:
    """Give every record its shard key (tltrain.data.keys); keep the original name and file beside it. Two records
    whose keys still coincide ignoring case are a real collision: a problem naming both files, the later dropped."""
    for record in records:
        record.file = relative_file(record.path, str(root))
    keys = make_keys([r.name for r in records], [r.file for r in records])
    for record, key in zip(records, keys):
        record.key = key
    dropped = set()
    for first, later in key_collisions(keys):
        problems.append(Problem(records[later].path, f"sample key {keys[later]!r} collides with that of "
                                                     f"{records[first].path} (rename one of the files)"))
        dropped.add(later)
    return [r for i, r in enumerate(records) if i not in dropped]
