"""Kaggle EyePACS (Diabetic Retinopathy Detection, 2015), as downloaded:

    <root>/trainLabels.csv            image,level              the labelled training set
    <root>/train/<patient>_{left,right}.jpeg
    <root>/retinopathy_solution.csv   image,level,Usage        optional: the test labels Kaggle released
    <root>/test/<patient>_{left,right}.jpeg                    (Usage: Public | Private leaderboard)

With test/ and retinopathy_solution.csv both there, the official test set is the test split (its Usage kept in
each sample's .json) and trainLabels.csv the train split; val is carved from the training patients. Without them
no record has an official split and the patients are split as for any source (val_fraction, test_fraction): the
train-only layout prepares exactly as it did before official splits existed. A test/ folder without the solution
CSV is unlabelled: its images are counted in the manifest's source description, never written. A source that
names another CSV or folder than trainLabels.csv and train (source.labels_csv, source.image_dir) reads exactly that
set, with no official split (the test set alone: how the two parts were prepared before official splits).
"""
from __future__ import annotations

from pathlib import Path

from tltrain.data.sources import (Problem, Record, SourceConfig, SourceData, _assign_keys, count_images,
                                  folder_description, label_classes, outside_root, read_labelled_folder)

KEY_COLUMN, LABEL_COLUMN, USAGE_COLUMN = "image", "level", "Usage"
TRAIN_CSV, TRAIN_DIR = "trainLabels.csv", "train"
TEST_CSV, TEST_DIR = "retinopathy_solution.csv", "test"


def patient_of(name: str, row: dict) -> str:
    """10_left / 10_right -> 10: both eyes of a patient share the number before the side."""
    return name.rsplit("_", 1)[0] if name.endswith(("_left", "_right")) else name


def read(cfg: SourceConfig, follow_links_outside: bool = False) -> SourceData:
    root = Path(cfg.root)
    classes, names = label_classes(cfg)
    csv_path, image_dir = root / (cfg.labels_csv or TRAIN_CSV), root / (cfg.image_dir or TRAIN_DIR)
    records, problems, candidates = read_labelled_folder(csv_path, image_dir, KEY_COLUMN, LABEL_COLUMN, classes,
                                                         patient_of)
    description = folder_description(cfg.kind, root, csv_path, image_dir)
    split_origin: dict[str, str] = {}
    test_csv, test_dir = root / TEST_CSV, root / TEST_DIR
    if (cfg.labels_csv or TRAIN_CSV) != TRAIN_CSV or (cfg.image_dir or TRAIN_DIR) != TRAIN_DIR:
        pass  # a source naming another CSV or folder is exactly that set (e.g. the test set alone)
    elif test_csv.is_file() and test_dir.is_dir():
        test_records, test_problems, test_candidates = _read_test(test_csv, test_dir, classes)
        for record in records:
            record.split = "train"
        records += test_records
        problems += test_problems
        candidates |= {f"{TEST_DIR}/{key}" for key in test_candidates}  # a test name may repeat a train name
        split_origin = {"train": f"{image_dir.name}/ + {csv_path.name}", "test": f"{TEST_DIR}/ + {TEST_CSV}"}
        description.update(test_labels_csv=str(test_csv.resolve()), test_image_dir=str(test_dir.resolve()))
    elif test_dir.is_dir():
        description["unlabelled_test_images"] = count_images(test_dir)
    elif test_csv.is_file():
        description["unused_test_labels"] = f"{test_csv.resolve()} (no {TEST_DIR}/ folder beside it)"
    records = _assign_keys(outside_root(records, problems, root, follow_links_outside), problems, root)
    return SourceData(records, problems, classes, names, candidates=candidates, description=description,
                      split_origin=split_origin)


def _read_test(test_csv: Path, test_dir: Path, classes: list[str]) -> tuple[list[Record], list[Problem], set[str]]:
    """The official test set: its records (split "test", the row's Usage in extra) from the solution CSV."""
    usage: dict[str, str] = {}

    def patient_noting_usage(name: str, row: dict) -> str:  # called once per matched row: its Usage noted here
        usage[name] = (row.get(USAGE_COLUMN) or "").strip()
        return patient_of(name, row)

    records, problems, candidates = read_labelled_folder(test_csv, test_dir, KEY_COLUMN, LABEL_COLUMN, classes,
                                                         patient_noting_usage)
    for record in records:
        record.split = "test"
        if usage.get(record.name):
            record.extra = {"usage": usage[record.name]}
    return records, problems, candidates
