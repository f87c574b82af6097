"""Each kind of bad input is reported with its file and reason; skip mode writes the good samples, counts add up."""
import json
import shutil

import pytest
from PIL import Image

from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.sources import SourceConfig
from tltrain.data.verify import verify_shards
from tltrain.errors import DataError


@pytest.fixture()
def raw(fundus_raw, tmp_path):
    copy = tmp_path / "raw"
    shutil.copytree(fundus_raw, copy)
    return copy


def _cfg(root, out, **kw):
    return PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(root)), out=str(out), workers=1,
                         progress=False, **kw)


def _append(raw, line):
    with open(raw / "trainLabels.csv", "a") as f:
        f.write(line + "\n")


def _expect_problem(raw, tmp_path, needle_file, needle_reason):
    with pytest.raises(DataError) as info:
        run_prepare(_cfg(raw, tmp_path / "out"))
    text = str(info.value)
    assert needle_file in text and needle_reason in text, text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tar"))  # nothing written


def test_truncated_jpeg(raw, tmp_path):
    victim = sorted((raw / "train").glob("*.jpeg"))[3]
    victim.write_bytes(victim.read_bytes()[:300])
    _expect_problem(raw, tmp_path, victim.name, "cannot decode image")


def test_label_row_without_file(raw, tmp_path):
    _append(raw, "99999_left,2")
    _expect_problem(raw, tmp_path, "trainLabels.csv", "'99999_left' has no image file")


def test_file_without_label(raw, tmp_path):
    Image.new("RGB", (64, 64)).save(raw / "train" / "77777_left.jpeg")
    _expect_problem(raw, tmp_path, "77777_left.jpeg", "has no label")


def test_unknown_grade(raw, tmp_path):
    lines = (raw / "trainLabels.csv").read_text().splitlines()
    key = lines[1].split(",")[0]
    lines[1] = f"{key},7"
    (raw / "trainLabels.csv").write_text("\n".join(lines) + "\n")
    _expect_problem(raw, tmp_path, "trainLabels.csv:2", "unknown grade '7'")


def test_duplicate_key(raw, tmp_path):
    first = (raw / "trainLabels.csv").read_text().splitlines()[1]
    _append(raw, first)
    _expect_problem(raw, tmp_path, "trainLabels.csv", "duplicate key")


def test_not_a_fundus_image(raw, tmp_path):
    victim = sorted((raw / "train").glob("*.jpeg"))[0]
    Image.new("RGB", (160, 120), (0, 0, 0)).save(victim)
    _expect_problem(raw, tmp_path, victim.name, "no fundus disc found")


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "trainLabels.csv").write_text("image,level\n")
    with pytest.raises(DataError, match="empty folder"):
        run_prepare(_cfg(tmp_path / "empty", tmp_path / "out", on_problem="skip"))


def test_csv_with_wrong_columns(raw, tmp_path):
    (raw / "trainLabels.csv").write_text("name,grade\n10_left,0\n")
    with pytest.raises(DataError, match="wrong columns.*'image' and 'level'"):
        run_prepare(_cfg(raw, tmp_path / "out", on_problem="skip"))


def test_every_problem_listed_at_once_and_skip_mode_counts_add_up(raw, fundus_raw, tmp_path):
    victim = sorted((raw / "train").glob("*.jpeg"))[5]
    victim.write_bytes(b"not a jpeg")
    _append(raw, "99999_right,1")
    Image.new("RGB", (64, 64)).save(raw / "train" / "88888_left.jpeg")
    with pytest.raises(DataError) as info:
        run_prepare(_cfg(raw, tmp_path / "fail"))
    assert len(info.value.problems) == 3
    manifest = run_prepare(_cfg(raw, tmp_path / "skip", on_problem="skip"))
    counts = manifest["counts"]
    assert counts["written"] + counts["skipped"] == counts["found"] and counts["skipped"] == 3
    problems = json.loads((tmp_path / "skip" / "problems.json").read_text())
    assert {p["file"].rsplit("/", 1)[-1] for p in problems} >= {victim.name, "88888_left.jpeg"}
    assert (tmp_path / "skip" / "problems.csv").exists()
    # fix the input and run again into the same folder: every image written, the old report gone
    shutil.copy(fundus_raw / "train" / victim.name, victim)
    (raw / "train" / "88888_left.jpeg").unlink()
    shutil.copy(fundus_raw / "trainLabels.csv", raw / "trainLabels.csv")
    fixed = run_prepare(_cfg(raw, tmp_path / "skip", on_problem="skip"))
    assert fixed["counts"]["skipped"] == 0 and fixed["counts"]["written"] == counts["written"] + 1
    assert not (tmp_path / "skip" / "problems.json").exists()
    assert verify_shards(tmp_path / "skip")["samples"] == fixed["counts"]["written"]


def test_aptos_source(tmp_path):
    from tltrain.data.synth import render_fundus

    aptos = tmp_path / "aptos"
    (aptos / "train_images").mkdir(parents=True)
    rows = ["id_code,diagnosis"]
    for i in range(24):
        Image.fromarray(render_fundus(i, i % 5, 96)).save(aptos / "train_images" / f"a{i:03d}.png")
        rows.append(f"a{i:03d},{i % 5}")
    (aptos / "train.csv").write_text("\n".join(rows) + "\n")
    manifest = run_prepare(PrepareConfig(source=SourceConfig(kind="aptos", root=str(aptos)), out=str(tmp_path / "o"),
                                         workers=1, progress=False))
    assert manifest["counts"]["written"] == 24 and manifest["num_classes"] == 5


def test_imagefolder_source_classes_from_folders(tmp_path):
    from tltrain.data.synth import generate_target_domain

    generate_target_domain(tmp_path / "target", n_per_class=6, size=64, seed=1, workers=1, progress=False)
    class_dirs = sorted(p.name for p in (tmp_path / "target").iterdir() if p.is_dir())
    manifest = run_prepare(PrepareConfig(source=SourceConfig(kind="imagefolder", root=str(tmp_path / "target")),
                                         out=str(tmp_path / "o"), workers=1, progress=False))
    assert manifest["classes"] == class_dirs
    assert manifest["counts"]["written"] == 6 * len(class_dirs)
    assert sum(manifest["splits"]["train"]["class_counts"]) == manifest["splits"]["train"]["count"]


def test_generic_csv_source_groups_patients(fundus_raw, tmp_path):
    """Custom columns; the patient column keeps both eyes together even though keys do not say so."""
    import csv

    rows = list(csv.DictReader(open(fundus_raw / "trainLabels.csv")))
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "grade", "subject"])
        writer.writerows((r["image"], r["level"], "p" + r["image"].rsplit("_", 1)[0]) for r in rows)
    source = SourceConfig(kind="csv", root=str(fundus_raw), labels_csv=str(tmp_path / "labels.csv"),
                          image_dir="train", key_column="file", label_column="grade", patient_column="subject")
    manifest = run_prepare(PrepareConfig(source=source, out=str(tmp_path / "o"), workers=1, progress=False))
    assert manifest["counts"]["written"] == len(rows)
    patients = {r["image"].rsplit("_", 1)[0] for r in rows}
    assert sum(info["patients"] for info in manifest["splits"].values()) == len(patients)


def test_generic_csv_with_wrong_columns_names_the_expected_ones(fundus_raw, tmp_path):
    source = SourceConfig(kind="csv", root=str(fundus_raw), labels_csv="trainLabels.csv", image_dir="train",
                          key_column="file", label_column="grade")
    with pytest.raises(DataError, match="trainLabels.csv: wrong columns: expected 'file' and 'grade'"):
        run_prepare(PrepareConfig(source=source, out=str(tmp_path / "o"), workers=1, progress=False,
                                  on_problem="skip"))
