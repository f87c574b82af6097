"""Kaggle APTOS 2019 Blindness Detection, as downloaded:

    <root>/train.csv            id_code,diagnosis     the labelled set (DR grade 0-4)
    <root>/train_images/<id_code>.png
    <root>/test.csv             id_code               optional: the competition's test set, without labels
    <root>/test_images/<id_code>.png

APTOS has no official val or test labels and no patient ids: each id_code is its own patient, split by
val_fraction/test_fraction as for any source. test_images/ is unlabelled: its images are counted in the manifest's
source description (unlabelled_test_images), never written; `tltrain predict` scores them. source=aptos (the older
name) reads the same layout.
"""
from __future__ import annotations

from pathlib import Path

from tltrain.data.sources import (SourceConfig, SourceData, _assign_keys, count_images, folder_description,
                                  label_classes, outside_root, read_labelled_folder)

KEY_COLUMN, LABEL_COLUMN = "id_code", "diagnosis"
TRAIN_CSV, TRAIN_DIR, TEST_DIR = "train.csv", "train_images", "test_images"


def patient_of(name: str, row: dict) -> str:
    """APTOS gives no patient ids: one patient per image."""
    return name


def read(cfg: SourceConfig, follow_links_outside: bool = False) -> SourceData:
    root = Path(cfg.root)
    classes, names = label_classes(cfg)
    csv_path, image_dir = root / (cfg.labels_csv or TRAIN_CSV), root / (cfg.image_dir or TRAIN_DIR)
    records, problems, candidates = read_labelled_folder(csv_path, image_dir, KEY_COLUMN, LABEL_COLUMN, classes,
                                                         patient_of)
    records = _assign_keys(outside_root(records, problems, root, follow_links_outside), problems, root)
    description = folder_description(cfg.kind, root, csv_path, image_dir)
    if (root / TEST_DIR).is_dir():
        description["unlabelled_test_images"] = count_images(root / TEST_DIR)
    return SourceData(records, problems, classes, names, candidates=candidates, description=description)
