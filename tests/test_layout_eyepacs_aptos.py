"""source=eyepacs, source=aptos2019 and the csv kind on generated mini-copies with the names of the real downloads:
official splits kept, Usage in the sample .json, unlabelled test images counted and never written, no patient in
two splits, the CLI command, and broken inputs named."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.shards import iter_tar_samples
from tltrain.data.sources import SourceConfig, read_source
from tltrain.data.splits import split_by_patient
from tltrain.errors import DataError

TRAIN_PATIENTS = [10, 13, 15, 16, 17, 19, 20, 21, 22, 23, 25, 30, 31, 33, 36]  # Kaggle's first train numbers
TEST_PATIENTS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]  # test numbers never appear in train
APTOS_IDS = ["000c1434d8d7", "001639a390f0", "0024cdab0c1e", "002c21358ce6", "005b95c28852", "0083ee8054ee",
             "0097f532ac9f", "00a8624548a9", "00b74780d31d", "00cb6555d108", "00cc2b75cddd", "00e4ddff966a",
             "00f6c1be5a33", "0104b032c141", "0124dffecf29", "0125fbd2e791", "012a242ac6ff", "0151781fe50b",
             "0161338f53cc", "0180bfa26c0b"]
APTOS_TEST_IDS = ["0005cfc8afb6", "003f0afdcd15", "006efc72b638", "00836aaacf06", "009245722fa4"]


def _write_image(path: Path, seed: int, grade: int, fmt: str) -> None:
    from tltrain.data.synth import render_fundus

    Image.fromarray(render_fundus(seed, grade, width=160, height=120)).save(path, fmt)


def _eyepacs_rows(patients, offset):
    """(image, level) per eye: grades cycle so every class has a few patients."""
    return [(f"{p}_{side}", (i + offset) % 5) for i, p in enumerate(patients) for side in ("left", "right")]


def _make_eyepacs(root: Path, with_test: bool, with_solution: bool) -> dict:
    (root / "train").mkdir(parents=True)
    train = _eyepacs_rows(TRAIN_PATIENTS, 0)
    with open(root / "trainLabels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "level"), *train])
    for seed, (name, level) in enumerate(train):
        _write_image(root / "train" / f"{name}.jpeg", seed, level, "JPEG")
    test = _eyepacs_rows(TEST_PATIENTS, 2)
    usage = {name: "Public" if i % 3 == 0 else "Private" for i, (name, _) in enumerate(test)}
    if with_test:
        (root / "test").mkdir()
        for seed, (name, level) in enumerate(test, start=500):
            _write_image(root / "test" / f"{name}.jpeg", seed, level, "JPEG")
    if with_solution:
        with open(root / "retinopathy_solution.csv", "w", newline="") as f:
            csv.writer(f).writerows([("image", "level", "Usage"), *((n, lv, usage[n]) for n, lv in test)])
    (root / "sampleSubmission.csv").write_text("image,level\n" + "".join(f"{n},0\n" for n, _ in test))
    return {"train": dict(train), "test": dict(test), "usage": usage}


def _prepare(kind, root, out, **kw):
    return run_prepare(PrepareConfig(source=SourceConfig(kind=kind, root=str(root)), out=str(out), shard_samples=16,
                                     workers=1, progress=False, **kw))


def _samples(out: Path) -> list[tuple[str, dict]]:
    """(split, sample .json) of every sample written, read back from the shards."""
    manifest = json.loads((out / "manifest.json").read_text())
    return [(shard["split"], json.loads(sample["json"]))
            for shard in manifest["shards"] for sample in iter_tar_samples(out / shard["tar"])]


def _patients_in_one_split(samples) -> None:
    split_of = {}
    for split, meta in samples:
        assert split_of.setdefault(meta["patient"], split) == split, f"patient {meta['patient']} in two splits"


@pytest.fixture(scope="module")
def eyepacs_full(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("kaggle") / "diabetic-retinopathy-detection"
    return root, _make_eyepacs(root, with_test=True, with_solution=True)


def test_eyepacs_official_test_split_keeps_usage_and_patients(eyepacs_full, tmp_path):
    root, truth = eyepacs_full
    manifest = _prepare("eyepacs", root, tmp_path / "out")
    samples = _samples(tmp_path / "out")
    assert manifest["counts"] == {"found": 50, "written": 50, "skipped": 0, "problems": 0}
    tested = {meta["name"]: meta for split, meta in samples if split == "test"}
    assert set(tested) == set(truth["test"])  # exactly the official test set, nothing carved into it
    assert {meta["name"] for split, meta in samples if split != "test"} == set(truth["train"])
    assert manifest["splits"]["val"]["count"] > 0  # val carved from the training patients
    for name, meta in tested.items():
        assert meta["usage"] == truth["usage"][name] and meta["label"] == truth["test"][name]
        assert meta["file"] == f"test/{name}.jpeg" and meta["patient"] == name.rsplit("_", 1)[0]
    for split, meta in samples:
        if split != "test":
            assert "usage" not in meta and meta["label"] == truth["train"][meta["name"]]
    _patients_in_one_split(samples)
    origin = manifest["split_origin"]
    assert origin["origin"]["test"] == "official: test/ + retinopathy_solution.csv"
    assert origin["origin"]["train"] == "official: train/ + trainLabels.csv"
    assert origin["origin"]["val"].startswith("carved from the training patients") and origin["moved_images"] == 0
    assert manifest["source"]["test_labels_csv"].endswith("retinopathy_solution.csv")
    assert manifest["ungradable"] == {"count": 0, "samples": []}


def test_eyepacs_train_only_splits_patients_as_before(tmp_path):
    """No test/: no official split, the patients split by val_fraction/test_fraction exactly as split_by_patient."""
    root = tmp_path / "eyepacs"
    truth = _make_eyepacs(root, with_test=False, with_solution=False)
    source = read_source(SourceConfig(kind="eyepacs", root=str(root)))
    assert all(r.split is None for r in source.records) and source.split_origin == {}
    assert set(source.description) == {"kind", "root", "labels_csv", "image_dir"}
    manifest = _prepare("eyepacs", root, tmp_path / "out")
    expected = split_by_patient(source.records, 0.1, 0.1, 0)
    samples = _samples(tmp_path / "out")
    assert {meta["key"]: split for split, meta in samples} == expected
    assert set(manifest["split_origin"]["origin"].values()) == {
        "patient-level stratified (0.1 val, 0.1 test, seed 0)"}
    assert manifest["counts"]["written"] == len(truth["train"])


def test_eyepacs_test_folder_without_solution_is_counted_not_written(tmp_path):
    root = tmp_path / "eyepacs"
    truth = _make_eyepacs(root, with_test=True, with_solution=False)
    (root / "test" / "notes.txt").write_text("not an image")
    manifest = _prepare("eyepacs", root, tmp_path / "out")  # on_problem=fail: the unlabelled images are no problem
    assert manifest["source"]["unlabelled_test_images"] == len(truth["test"])
    assert manifest["counts"] == {"found": 30, "written": 30, "skipped": 0, "problems": 0}
    assert {meta["name"] for _, meta in _samples(tmp_path / "out")} == set(truth["train"])


def test_eyepacs_solution_row_without_its_image_names_the_csv_line(eyepacs_full, tmp_path):
    import shutil

    root = tmp_path / "eyepacs"
    shutil.copytree(eyepacs_full[0], root)
    (root / "test" / "5_left.jpeg").unlink()  # a partial download of test/
    with pytest.raises(DataError) as info:
        _prepare("eyepacs", root, tmp_path / "out")
    assert "retinopathy_solution.csv:" in str(info.value) and "'5_left' has no image file" in str(info.value)
    manifest = _prepare("eyepacs", root, tmp_path / "skip", on_problem="skip")
    assert manifest["splits"]["test"]["count"] == 19 and manifest["counts"]["skipped"] == 1


def test_eyepacs_solution_with_wrong_columns_is_one_error_naming_it(eyepacs_full, tmp_path):
    import shutil

    root = tmp_path / "eyepacs"
    shutil.copytree(eyepacs_full[0], root)
    (root / "retinopathy_solution.csv").write_text("id,grade\n1_left,0\n")
    with pytest.raises(DataError, match="retinopathy_solution.csv: wrong columns: expected 'image' and 'level'"):
        _prepare("eyepacs", root, tmp_path / "out", on_problem="skip")


def _cli_prepare(*args, cwd):
    done = subprocess.run([sys.executable, "-m", "tltrain.cli", "prepare", *args, "workers=1", "progress=false",
                           "shard_samples=16"], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_eyepacs_cli(eyepacs_full, tmp_path):
    root, truth = eyepacs_full
    _cli_prepare("source=eyepacs", f"source.root={root}", f"out={tmp_path / 'out'}", cwd=tmp_path)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "eyepacs" and manifest["splits"]["test"]["count"] == len(truth["test"])


# -- APTOS 2019 ---------------------------------------------------------------------------------------------------
def _make_aptos(root: Path) -> dict:
    (root / "train_images").mkdir(parents=True)
    (root / "test_images").mkdir()
    labels = {code: i % 5 for i, code in enumerate(APTOS_IDS)}
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([("id_code", "diagnosis"), *labels.items()])
    for seed, (code, grade) in enumerate(labels.items()):
        _write_image(root / "train_images" / f"{code}.png", seed, grade, "PNG")
    (root / "test.csv").write_text("id_code\n" + "".join(f"{code}\n" for code in APTOS_TEST_IDS))
    for seed, code in enumerate(APTOS_TEST_IDS, start=900):
        _write_image(root / "test_images" / f"{code}.png", seed, 0, "PNG")
    (root / "sample_submission.csv").write_text("id_code,diagnosis\n" + "".join(f"{c},0\n" for c in APTOS_TEST_IDS))
    return labels


@pytest.fixture(scope="module")
def aptos(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("kaggle") / "aptos2019-blindness-detection"
    return root, _make_aptos(root)


def test_aptos2019_labels_patient_split_and_unlabelled_test(aptos, tmp_path):
    root, labels = aptos
    manifest = _prepare("aptos2019", root, tmp_path / "out")  # on_problem=fail: test_images/ is no problem
    samples = _samples(tmp_path / "out")
    assert {meta["name"]: meta["label"] for _, meta in samples} == labels  # no test image written
    assert {split for split, _ in samples} == {"train", "val", "test"}
    _patients_in_one_split(samples)
    assert manifest["source"]["unlabelled_test_images"] == len(APTOS_TEST_IDS)
    assert manifest["counts"] == {"found": 20, "written": 20, "skipped": 0, "problems": 0}
    assert manifest["split_origin"]["origin"]["test"].startswith("patient-level stratified")


def test_aptos_is_the_same_layout_as_aptos2019(aptos):
    root, _ = aptos
    old, new = (read_source(SourceConfig(kind=kind, root=str(root))) for kind in ("aptos", "aptos2019"))
    assert [(r.key, r.label, r.patient, r.file) for r in old.records] == \
        [(r.key, r.label, r.patient, r.file) for r in new.records]
    assert old.description["kind"] == "aptos" and new.description["kind"] == "aptos2019"


def test_aptos2019_cli(aptos, tmp_path):
    root, labels = aptos
    _cli_prepare("source=aptos2019", f"source.root={root}", f"out={tmp_path / 'out'}", cwd=tmp_path)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "aptos2019" and manifest["counts"]["written"] == len(labels)


def test_aptos2019_missing_train_csv_names_it(tmp_path):
    (tmp_path / "aptos" / "train_images").mkdir(parents=True)
    with pytest.raises(DataError, match="train.csv: labels CSV not found"):
        read_source(SourceConfig(kind="aptos2019", root=str(tmp_path / "aptos")))


# -- the csv kind -------------------------------------------------------------------------------------------------
def _csv_folder(root: Path, rows: list[str], files: list[str]) -> None:
    (root / "images").mkdir(parents=True)
    for seed, name in enumerate(files):
        _write_image(root / "images" / name, seed, seed % 5, "PNG" if name.lower().endswith(".png") else "JPEG")
    (root / "labels.csv").write_bytes("\n".join(rows).encode("utf-8-sig") + b"\n")  # with a byte-order mark


def _csv_source(root: Path, **kw) -> SourceConfig:
    return SourceConfig(kind="csv", root=str(root), labels_csv="labels.csv", image_dir="images", key_column="image",
                        label_column="grade", **kw)


def test_csv_key_with_or_without_extension_in_any_case(tmp_path):
    root = tmp_path / "csv"
    _csv_folder(root, [" image , grade ", "IM0001.jpg,0", "IM0002.JPG,1", "IM0003,2", "IM0004.PNG,3"],
                ["IM0001.JPG", "IM0002.jpg", "IM0003.png", "IM0004.png"])
    source = read_source(_csv_source(root))
    assert not source.problems, source.problems
    assert {r.key: (r.label, r.file) for r in source.records} == {
        "IM0001": (0, "images/IM0001.JPG"), "IM0002": (1, "images/IM0002.jpg"), "IM0003": (2, "images/IM0003.png"),
        "IM0004": (3, "images/IM0004.png")}
    assert len(source.candidates) == 4


def test_csv_key_with_extension_picks_that_file_and_names_the_other(tmp_path):
    root = tmp_path / "csv"
    _csv_folder(root, ["image,grade", "a.jpg,0", "b.jpg,1", "c,2", "c.png,2"], ["a.jpg", "a.png", "b.png", "c.png"])
    source = read_source(_csv_source(root))
    assert [(r.key, r.file) for r in source.records] == [("a", "images/a.jpg"), ("c", "images/c.png")]
    problems = [str(p) for p in source.problems]
    assert any(p.endswith("a.png: image has no label in labels.csv") for p in problems), problems
    assert any("labels.csv:3" in p and "'b.jpg' has no image file (found b.png)" in p for p in problems), problems
    assert any("labels.csv:5" in p and "duplicate key 'c.png' (first at line 4)" in p for p in problems), problems


def test_csv_patient_column_keeps_patients_together(tmp_path):
    root = tmp_path / "csv"
    files = [f"p{p}_{eye}.png" for p in range(12) for eye in ("od", "os")]
    rows = ["image,grade, patient "] + [f"{name},{int(name[1:].split('_')[0]) % 5}, P{name.split('_')[0]} "
                                        for name in files]
    _csv_folder(root, rows, files)
    source = read_source(_csv_source(root, patient_column="patient"))
    assert {r.patient for r in source.records} == {f"Pp{p}" for p in range(12)}  # trimmed cells
    manifest = run_prepare(PrepareConfig(source=_csv_source(root, patient_column="patient"), out=str(tmp_path / "o"),
                                         workers=1, progress=False))
    assert sum(info["patients"] for info in manifest["splits"].values()) == 12
    _patients_in_one_split(_samples(tmp_path / "o"))


def test_csv_missing_patient_column_is_named(tmp_path):
    root = tmp_path / "csv"
    _csv_folder(root, ["image,grade", "a,0"], ["a.png"])
    with pytest.raises(DataError, match="labels.csv: wrong columns: expected 'image', 'grade' and 'subject'"):
        read_source(_csv_source(root, patient_column="subject"))


def test_a_source_naming_the_test_set_itself_reads_only_that_set(eyepacs_full):
    """The older way to shard the official test set (a second prepare with labels_csv and image_dir pointing at
    it, as benchmarks/bench_scale.py does) reads the test set alone, once."""
    root = eyepacs_full[0]
    data = read_source(SourceConfig(kind="eyepacs", root=str(root), labels_csv="retinopathy_solution.csv",
                                    image_dir="test"))
    assert not data.problems and data.records and all(r.split is None for r in data.records)
    assert all(Path(r.path).parent.name == "test" for r in data.records)
