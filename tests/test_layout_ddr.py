"""source=ddr on a generated mini-copy of DDR's DR grading part, with the names of the real download:
DDR-dataset/DR_grading/{train,valid,test}/ JPEGs named 007-0004-000.jpg or 20170323093305605.jpg, and
{train,valid,test}.txt lines `<file name> <grade>`, grade 5 = ungradable."""
from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import TLTRAIN
from PIL import Image

from tltrain.data.layouts import ddr
from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.sources import SourceConfig
from tltrain.data.synth import render_fundus
from tltrain.errors import ConfigError, DataError

# grades per official split, as (folder/list name, grades); 5 = ungradable
GRADES = {"train": [0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 0, 5, 5],
          "valid": [0, 1, 2, 3, 4, 2, 5],
          "test": [0, 0, 1, 2, 3, 4, 2, 4, 5]}
SPLIT_OF = {"train": "train", "valid": "val", "test": "test"}


def ddr_name(index: int) -> str:
    """The two name families of DDR: <NNN>-<NNNN>-<NNN> and 17-digit timestamps."""
    return f"007-{1000 + 7 * index:04d}-{(index % 7) * 100:03d}.jpg" if index % 3 else f"2017032309{index:07d}.jpg"


def write_image(path: Path, seed: int, grade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render_fundus(seed, min(grade, 4), width=160)).save(path, "JPEG", quality=90)


def write_ddr(grading: Path, grades: dict[str, list[int]], first_index: int = 0) -> dict[str, tuple[str, int]]:
    """DR_grading/<split>/ images and <split>.txt; returns file name -> (official split folder, grade)."""
    truth, index = {}, first_index
    for folder, split_grades in grades.items():
        lines = []
        for grade in split_grades:
            name = ddr_name(index)
            write_image(grading / folder / name, index, grade)
            lines.append(f"{name} {grade}\n")
            truth[name] = (folder, grade)
            index += 1
        (grading / f"{folder}.txt").write_text("".join(lines))
    return truth


@pytest.fixture(scope="module")
def ddr_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddr") / "DDR-dataset"
    truth = write_ddr(root / "DR_grading", GRADES)
    return root, truth


def prepare(root: Path, out: Path, **options) -> dict:
    return run_prepare(PrepareConfig(source=SourceConfig(kind="ddr", root=str(root)), out=str(out),
                                     shard_samples=50, workers=1, progress=False, **options))


def sample_metadata(out: Path, manifest: dict) -> dict[str, tuple[str, dict]]:
    """image file relative to the source root -> (split, the sample's .json) over every shard."""
    found = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    found[meta["file"]] = (shard["split"], meta)
    return found


def test_read_labels_splits_and_ungradable_from_either_root(ddr_copy):
    root, truth = ddr_copy
    for given in (root, root / "DR_grading"):  # the folder holding DR_grading, or DR_grading itself
        source = ddr.read(SourceConfig(kind="ddr", root=str(given)))
        assert source.problems == []
        assert {Path(r.path).name: (r.split, r.label) for r in source.records} == {
            name: (SPLIT_OF[folder], grade) for name, (folder, grade) in truth.items() if grade != 5}
        assert all(r.patient == r.name == Path(r.path).stem for r in source.records)  # each image its own patient
        assert sorted(Path(p.file).name for p in source.ungradable) == sorted(
            name for name, (_, grade) in truth.items() if grade == 5)
        assert all("grade 5 (ungradable)" in p.reason and ".txt:" in p.reason for p in source.ungradable)
        assert source.description["root"] == str((root / "DR_grading").resolve())  # one dataset, either root
        assert len(source.candidates) == len(truth)


def test_prepare_keeps_official_splits_and_lists_ungradable(ddr_copy, tmp_path):
    root, truth = ddr_copy
    manifest = prepare(root, tmp_path / "out")  # on_problem=fail: ungradable images are not problems
    assert manifest["problems"] == []
    gradable = {name: fg for name, fg in truth.items() if fg[1] != 5}
    for folder, split in SPLIT_OF.items():
        grades = [g for f, g in gradable.values() if f == folder]
        assert manifest["splits"][split]["count"] == len(grades)
        assert manifest["splits"][split]["class_counts"] == [grades.count(c) for c in range(5)]
        assert manifest["split_origin"]["origin"][split].startswith("official")
    assert manifest["split_origin"]["moved_patients"] == 0
    assert manifest["ungradable"]["count"] == 4
    assert sorted(Path(s["file"]).name for s in manifest["ungradable"]["samples"]) == sorted(
        name for name, (_, grade) in truth.items() if grade == 5)
    assert manifest["counts"]["found"] == len(truth) and manifest["counts"]["written"] == len(gradable)
    samples = sample_metadata(tmp_path / "out", manifest)
    assert {Path(file).name: (split, meta["label"]) for file, (split, meta) in samples.items()} == {
        name: (SPLIT_OF[folder], grade) for name, (folder, grade) in gradable.items()}
    patients = {}
    for split, meta in samples.values():
        patients.setdefault(meta["patient"], set()).add(split)
    assert all(len(splits) == 1 for splits in patients.values())


def test_broken_lists_are_problems_naming_file_and_line(tmp_path):
    grading = tmp_path / "DDR-dataset" / "DR_grading"
    write_ddr(grading, {"train": [0, 1, 2, 3], "valid": [0, 4], "test": [1, 2]})
    train_txt = grading / "train.txt"
    names = [line.split()[0] for line in train_txt.read_text().splitlines()]
    write_image(grading / "train" / "007-9999-000.jpg", 99, 1)  # an image with no line
    train_txt.write_text(f"{names[0]} 0\n"
                         f"{names[1]}\n"                   # line 2: no grade
                         f"{names[2]} 7\n"                 # line 3: grade outside 0-5
                         f"{names[3]} 3\n"
                         "\n"                              # blank lines are passed over
                         "007-0404-000.jpg 2\n"            # line 6: listed, no such image
                         f"{names[0]} 0\n")                # line 7: listed twice
    source = ddr.read(SourceConfig(kind="ddr", root=str(grading.parent)))
    where = {p.file: p.reason for p in source.problems}
    assert "expected '<image file name> <grade>'" in where[f"{train_txt}:2"]
    assert "not one of 0-5" in where[f"{train_txt}:3"]
    assert "007-0404-000.jpg" in where[f"{train_txt}:6"] and "not in" in where[f"{train_txt}:6"]
    assert "listed again (first at line 1)" in where[f"{train_txt}:7"]
    assert where[str(grading / "train" / "007-9999-000.jpg")] == "image has no line in train.txt"
    assert where[str(grading / "train" / names[1])] == "image has no line in train.txt"  # its line was broken
    assert len(source.problems) == 6
    with pytest.raises(DataError, match=r"train\.txt:2: malformed line"):
        prepare(grading.parent, tmp_path / "out")


def test_incomplete_download_and_unknown_folder_are_clear_errors(tmp_path):
    grading = tmp_path / "DDR-dataset" / "DR_grading"
    write_ddr(grading, {"train": [0, 1], "valid": [2], "test": [3]})
    shutil.rmtree(grading / "test")
    with pytest.raises(DataError, match=r"DR_grading: incomplete DDR DR_grading folder: test/ not found"):
        ddr.read(SourceConfig(kind="ddr", root=str(grading.parent)))
    with pytest.raises(DataError, match="not a DDR copy"):
        ddr.read(SourceConfig(kind="ddr", root=str(tmp_path)))
    with pytest.raises(ConfigError, match="source.labels_csv is not used"):
        ddr.read(SourceConfig(kind="ddr", root=str(grading), labels_csv="labels.csv"))


def _ddr_with_a_twin(tmp_path):
    """A DDR copy where one training image also sits in test/ (the same file, listed in test.txt too)."""
    grading = tmp_path / "DDR-dataset" / "DR_grading"
    truth = write_ddr(grading, {"train": [0, 1, 2, 2], "valid": [0, 3], "test": [1, 4]})
    twin = next(name for name, (folder, _) in truth.items() if folder == "train")
    shutil.copy(grading / "train" / twin, grading / "test" / twin)
    with open(grading / "test.txt", "a") as lines:
        lines.write(f"{twin} {truth[twin][1]}\n")
    return grading, twin


def test_a_name_in_two_official_splits_is_one_patient_moved_to_the_later(tmp_path, capsys):
    grading, twin = _ddr_with_a_twin(tmp_path)
    manifest = prepare(grading.parent, tmp_path / "out", duplicates="keep")  # the copy is byte-identical: kept
    assert manifest["split_origin"]["moved_patients"] == 1 and manifest["split_origin"]["moved_images"] == 1
    assert [manifest["splits"][s]["count"] for s in ("train", "val", "test")] == [3, 2, 4]
    samples = sample_metadata(tmp_path / "out", manifest)
    assert samples[f"train/{twin}"][0] == samples[f"test/{twin}"][0] == "test"
    assert "warning: 1 patient(s) (1 images) appear in two official splits" in capsys.readouterr().out


def test_an_identical_image_in_two_official_splits_is_kept_in_the_later_and_listed(tmp_path):
    """By default (duplicates=drop) a byte-identical copy is left out and listed; of a copy in train and one in
    test, the test one is kept, so the official test set stays whole."""
    grading, twin = _ddr_with_a_twin(tmp_path)
    manifest = prepare(grading.parent, tmp_path / "out")
    assert [manifest["splits"][s]["count"] for s in ("train", "val", "test")] == [3, 2, 3]
    assert manifest["duplicates"]["count"] == manifest["duplicates"]["left_out"] == 1
    copy = manifest["duplicates"]["samples"][0]
    assert copy["file"] == str(grading / "train" / twin) and copy["same_as"] == str(grading / "test" / twin)
    assert copy["agree"] and not copy["kept"]
    samples = sample_metadata(tmp_path / "out", manifest)
    assert samples[f"test/{twin}"][0] == "test" and f"train/{twin}" not in samples


def test_kaggle_copy_without_official_splits(tmp_path):
    """The Kaggle copy: DR_grading.csv (id_code with .jpg, diagnosis) and every image in DR_grading/DR_grading/."""
    root = tmp_path / "ddrdataset"
    grades = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4, 0, 2, 5]
    rows = ["id_code,diagnosis"]
    for index, grade in enumerate(grades):
        write_image(root / "DR_grading" / "DR_grading" / ddr_name(index), index, grade)
        rows.append(f"{ddr_name(index) if index else Path(ddr_name(index)).stem},{grade}")  # an id without .jpg too
    (root / "DR_grading.csv").write_text("\n".join(rows) + "\n")
    source = ddr.read(SourceConfig(kind="ddr", root=str(root)))
    assert source.problems == [] and source.split_origin == {}
    assert all(r.split is None for r in source.records) and len(source.records) == len(grades) - 1
    assert [Path(p.file).name for p in source.ungradable] == [ddr_name(len(grades) - 1)]
    manifest = prepare(root, tmp_path / "out", val_fraction=0.2, test_fraction=0.2)
    assert sum(info["count"] for info in manifest["splits"].values()) == len(grades) - 1
    assert not manifest["split_origin"]["origin"]["test"].startswith("official")
    assert manifest["ungradable"]["count"] == 1


def test_cli_prepare(ddr_copy, tmp_path):
    root, truth = ddr_copy
    out = tmp_path / "shards"
    done = subprocess.run([TLTRAIN, "prepare", "source=ddr", f"source.root={root}", f"out={out}", "workers=1",
                           "progress=false", "shard_samples=50"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "ddr" and manifest["ungradable"]["count"] == 4
    assert sum(info["count"] for info in manifest["splits"].values()) == sum(g != 5 for _, g in truth.values())
