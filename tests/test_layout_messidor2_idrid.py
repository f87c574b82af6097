"""source=messidor2 and source=idrid on generated mini-copies with the exact names of the real downloads.

Messidor-2: IMAGES/ with .png and upper-case .JPG mixed, the Kaggle messidor_data.csv (empty grades where
adjudicated_gradable=0) and ADCIS's `;`-separated messidor-2.csv of examination pairs. IDRiD: "B. Disease Grading"
with its spaces and dots, labels CSVs with a trailing space in a header name, empty trailing columns and padding rows
of empty cells, and test images numbered from IDRiD_001 again.
"""
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tltrain.cli import main as cli_main
from tltrain.data.layouts import idrid, messidor2
from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.sources import DR_GRADE_NAMES, SourceConfig
from tltrain.data.synth import render_fundus
from tltrain.errors import ConfigError, DataError

WIDTH = 160
#: (left, right) per examination, grades (dr, dme) per image; None: ungradable (empty grades, gradable 0)
EXAMS = [(f"2005102{i % 10}_{43808 + 37 * i}_0100_PP.png", f"2005102{i % 10}_{43845 + 37 * i}_0100_PP.png")
         for i in range(9)] + [(f"IM{2 * i + 2:06d}.JPG", f"IM{2 * i + 1:06d}.JPG") for i in range(7)]
WORST = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4]  # worst DR grade per examination
UNGRADABLE = {EXAMS[3][1], EXAMS[11][0]}


def _write_image(path: Path, seed: int, grade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(render_fundus(seed, grade, width=WIDTH))
    image.save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG", quality=85)


def _messidor_truth() -> dict[str, tuple[int, int] | None]:
    truth = {}
    for index, (left, right) in enumerate(EXAMS):
        worst = WORST[index]
        for eye, name in enumerate((left, right)):
            grade = worst if eye == 0 else max(0, worst - index % 2)
            truth[name] = None if name in UNGRADABLE else (grade, int(grade >= 2 and index % 3 != 0))
    return truth


def _make_messidor2(root: Path) -> list[str]:
    """The mini-copy; returns the image_id of each messidor_data.csv row in order (line = index + 2)."""
    truth = _messidor_truth()
    for seed, (name, grades) in enumerate(truth.items()):
        _write_image(root / "IMAGES" / name, seed, grades[0] if grades else 0)
    names = sorted(truth)  # the Kaggle file is sorted by image_id
    lines = ["image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable"]
    lines += [f"{n},,,0" if truth[n] is None else f"{n},{truth[n][0]},{truth[n][1]},1" for n in names]
    (root / "messidor_data.csv").write_text("\n".join(lines) + "\n")
    pairs = ["left;right "] + [f"{left};{right}" for left, right in EXAMS]  # ADCIS: ";" and a trailing space
    (root / "messidor-2.csv").write_bytes(("\r\n".join(pairs) + "\r\n").encode())
    (root / "messidor_readme.txt").write_text("Messidor-2 adjudicated grades (Krause et al. 2018)\n")
    return names


#: IDRiD sets: (folder, labels CSV, count); grades by image number
IDRID_SETS = {"train": ("a. Training Set", "a. IDRiD_Disease Grading_Training Labels.csv", 20),
              "test": ("b. Testing Set", "b. IDRiD_Disease Grading_Testing Labels.csv", 10)}


def _idrid_grades(split: str, number: int) -> tuple[int, int]:
    dr = (number + (2 if split == "test" else 0)) % 5
    return dr, 0 if dr == 0 else (number % 2) + (dr >= 3)


def _make_idrid(parent: Path) -> Path:
    base = parent / "B. Disease Grading"
    for split, (folder, csv_name, count) in IDRID_SETS.items():
        lines = ["Image name,Retinopathy grade,Risk of macular edema ,,"]
        for number in range(1, count + 1):
            dr, dme = _idrid_grades(split, number)
            _write_image(base / "1. Original Images" / folder / f"IDRiD_{number:03d}.jpg", 100 * (split == "test")
                         + number, dr)
            lines.append(f"IDRiD_{number:03d},{dr},{dme},,")
        lines += [",,,,"] * 3  # the export's padding rows
        (base / "2. Groundtruths").mkdir(parents=True, exist_ok=True)
        (base / "2. Groundtruths" / csv_name).write_bytes(("\r\n".join(lines) + "\r\n").encode())
    (parent / "A. Segmentation" / "1. Original Images" / "a. Training Set").mkdir(parents=True)  # other parts
    (parent / "C. Localization").mkdir()
    return base


def _prepare(root: Path, out: Path, kind: str, **options) -> dict:
    source = SourceConfig(kind=kind, root=str(root), label_set=options.pop("label_set", "dr"))
    return run_prepare(PrepareConfig(source=source, out=str(out), shard_samples=50, workers=1, progress=False,
                                     **options))


def _samples(out: Path) -> list[dict]:
    """The .json member of every written sample, with the split of its shard."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = []
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    sample = json.loads(tar.extractfile(member).read())
                    samples.append({**sample, "key": member.name[:-len(".json")], "split": shard["split"]})
    return samples


@pytest.fixture(scope="module")
def messidor_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messidor2")
    _make_messidor2(root)
    return root


@pytest.fixture(scope="module")
def messidor_out(messidor_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("messidor2_shards")
    _prepare(messidor_root, out, "messidor2", val_fraction=0.25, test_fraction=0.25)  # on_problem=fail
    return out


@pytest.fixture(scope="module")
def idrid_parent(tmp_path_factory) -> Path:
    parent = tmp_path_factory.mktemp("idrid") / "IDRiD"
    _make_idrid(parent)
    return parent


@pytest.fixture(scope="module")
def idrid_out(idrid_parent, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("idrid_shards")
    _prepare(idrid_parent, out, "idrid")  # on_problem=fail: the padding rows are no problem
    return out


# -- Messidor-2 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_set", ["dr", "dme"])
def test_messidor2_labels_of_either_label_set_and_the_other_in_extra(messidor_root, label_set):
    data = messidor2.read(SourceConfig(kind="messidor2", root=str(messidor_root), label_set=label_set))
    truth = _messidor_truth()
    assert data.problems == []
    assert len(data.records) == len(truth) - len(UNGRADABLE)
    for record in data.records:
        file_name = Path(record.path).name
        dr, dme = truth[file_name]
        assert record.name == Path(file_name).stem == record.key  # a safe name is its own key
        assert record.file == f"IMAGES/{file_name}" and record.split is None
        if label_set == "dr":
            assert (record.label, record.extra) == (dr, {"dme": dme})
        else:
            assert (record.label, record.extra) == (dme, {"dr_grade": dr})
    if label_set == "dr":
        assert (data.classes, data.class_names) == (["0", "1", "2", "3", "4"], list(DR_GRADE_NAMES))
    else:
        assert (data.classes, data.class_names) == (["0", "1"], ["no DME", "DME"])
    assert sorted(Path(p.file).name for p in data.ungradable) == sorted(UNGRADABLE)
    assert all("adjudicated_gradable=0" in p.reason for p in data.ungradable)
    assert data.description["patients"] == "from pairs file"
    assert data.description["examinations"] == len(EXAMS) and data.description["unpaired_images"] == 0
    assert len(data.candidates) == len(truth)  # every image found once, .png and .JPG alike


def test_messidor2_prepare_keeps_examinations_together_and_lists_ungradable(messidor_out):
    manifest = json.loads((messidor_out / "manifest.json").read_text())
    truth = _messidor_truth()
    assert manifest["counts"] == {"found": len(truth), "written": len(truth) - 2, "skipped": 2, "problems": 0}
    assert manifest["ungradable"]["count"] == 2
    assert sorted(Path(s["file"]).name for s in manifest["ungradable"]["samples"]) == sorted(UNGRADABLE)
    assert manifest["source"]["patients"] == "from pairs file"
    assert "official" not in json.dumps(manifest["split_origin"]["origin"])  # no official splits: by patient
    samples = _samples(messidor_out)
    split_of = {Path(s["file"]).name: s["split"] for s in samples}
    patient_of = {Path(s["file"]).name: s["patient"] for s in samples}
    assert {s["split"] for s in samples} == {"train", "val", "test"}
    for left, right in EXAMS:
        if left in split_of and right in split_of:
            assert split_of[left] == split_of[right] and patient_of[left] == patient_of[right]
    assert len(set(patient_of.values())) == len(EXAMS)
    for sample in samples:
        assert (sample["label"], sample["dme"]) == truth[Path(sample["file"]).name]


def test_messidor2_without_pairs_file_each_image_is_its_own_patient(messidor_root, tmp_path):
    root = tmp_path / "messidor2"
    shutil.copytree(messidor_root, root)
    (root / "messidor-2.csv").unlink()
    data = messidor2.read(SourceConfig(kind="messidor2", root=str(root)))
    assert data.description["patients"] == "one per image" and data.problems == []
    assert len({r.patient for r in data.records}) == len(data.records)


def test_messidor2_names_differing_in_case_and_pandas_floats_still_match(messidor_root, tmp_path):
    root = tmp_path / "messidor2"
    shutil.copytree(messidor_root, root)
    csv_path = root / "messidor_data.csv"
    text = csv_path.read_text().replace(".JPG,", ".jpg,").replace(",1\n", ",1.0\n")  # IM000001.jpg, gradable 1.0
    csv_path.write_text(text)
    data = messidor2.read(SourceConfig(kind="messidor2", root=str(root)))
    assert data.problems == [] and len(data.records) == len(EXAMS) * 2 - len(UNGRADABLE)
    with pytest.raises(ConfigError, match="source.classes does not apply to messidor2"):
        messidor2.read(SourceConfig(kind="messidor2", root=str(root), classes=["0", "1"]))


def test_messidor2_row_naming_a_missing_image_names_the_csv_line(messidor_root, tmp_path):
    root = tmp_path / "messidor2"
    shutil.copytree(messidor_root, root)
    names = sorted(_messidor_truth())
    gone = EXAMS[5][0]
    (root / "IMAGES" / gone).unlink()
    with pytest.raises(DataError) as caught:
        _prepare(root, tmp_path / "out", "messidor2")
    message = str(caught.value)
    assert f"messidor_data.csv:{names.index(gone) + 2}: image_id {gone!r} has no image file" in message
    assert f"messidor-2.csv:{5 + 2}: names {gone!r}" in message  # the pairs file no longer matches either
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_messidor2_from_the_command_line_with_the_dme_label_set(messidor_root, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(["prepare", "source=messidor2", f"source.root={messidor_root}", "source.label_set=dme",
                     f"out={out}", "workers=1", "progress=false", "shard_samples=50"])
    assert code in (0, None), capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["classes"], manifest["class_names"]) == (["0", "1"], ["no DME", "DME"])
    assert manifest["source"]["kind"] == "messidor2" and manifest["ungradable"]["count"] == 2
    assert all("dr_grade" in s for s in _samples(out))


# -- IDRiD -------------------------------------------------------------------------------------------------------
def test_idrid_reads_both_official_sets_from_either_root(idrid_parent):
    from_parent = idrid.read(SourceConfig(kind="idrid", root=str(idrid_parent)))
    from_itself = idrid.read(SourceConfig(kind="idrid", root=str(idrid_parent / "B. Disease Grading")))
    assert from_parent.problems == [] and from_parent.ungradable == []
    seen = [(r.key, r.name, r.file, r.label, r.split, r.extra) for r in from_parent.records]
    assert seen == [(r.key, r.name, r.file, r.label, r.split, r.extra) for r in from_itself.records]
    assert from_parent.description == from_itself.description  # the same dataset, the same shards
    by_split = {split: [r for r in from_parent.records if r.split == split] for split in IDRID_SETS}
    for split, (folder, _, count) in IDRID_SETS.items():
        assert len(by_split[split]) == count
        for record in by_split[split]:
            number = int(Path(record.path).stem.split("_")[1])
            assert record.name == f"IDRiD_{number:03d}" + ("_test" if split == "test" else "")
            assert record.key == record.name == record.patient  # unique keys, one patient per image
            assert record.file == f"1. Original Images/{folder}/IDRiD_{number:03d}.jpg"
            dr, dme = _idrid_grades(split, number)
            assert (record.label, record.extra) == (dr, {"dme": dme})
    assert len(from_parent.candidates) == 30
    assert from_parent.description["patients"] == "one per image"


def test_idrid_dme_label_set(idrid_parent):
    data = idrid.read(SourceConfig(kind="idrid", root=str(idrid_parent), label_set="dme"))
    assert data.classes == ["0", "1", "2"] and len(data.class_names) == 3 and data.class_names[0] == "no DME risk"
    for record in data.records:
        dr, dme = _idrid_grades(record.split, int(Path(record.path).stem.split("_")[1]))
        assert (record.label, record.extra) == (dme, {"dr_grade": dr})


def test_idrid_prepare_keeps_the_official_splits(idrid_out):
    manifest = json.loads((idrid_out / "manifest.json").read_text())
    assert manifest["counts"] == {"found": 30, "written": 30, "skipped": 0, "problems": 0}
    assert manifest["splits"]["test"]["count"] == 10
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 20
    origin = manifest["split_origin"]["origin"]
    assert origin["train"].startswith("official: ") and "a. Training Set" in origin["train"]
    assert origin["test"].startswith("official: ") and "b. IDRiD_Disease Grading_Testing Labels.csv" in origin["test"]
    assert origin["val"].startswith("carved from the training patients")
    assert manifest["split_origin"]["moved_images"] == 0 and manifest["ungradable"]["count"] == 0
    samples = _samples(idrid_out)
    assert sorted(s["name"] for s in samples if s["split"] == "test") == [f"IDRiD_{n:03d}_test" for n in range(1, 11)]
    assert all("b. Testing Set" in s["file"] for s in samples if s["split"] == "test")
    assert all("a. Training Set" in s["file"] for s in samples if s["split"] != "test")
    splits_of_patient: dict[str, set] = {}
    for sample in samples:
        splits_of_patient.setdefault(sample["patient"], set()).add(sample["split"])
    assert all(len(splits) == 1 for splits in splits_of_patient.values())


def test_idrid_row_naming_a_missing_image_names_the_csv_line(idrid_parent, tmp_path):
    parent = tmp_path / "IDRiD"
    shutil.copytree(idrid_parent, parent)
    (parent / "B. Disease Grading" / "1. Original Images" / "b. Testing Set" / "IDRiD_004.jpg").unlink()
    with pytest.raises(DataError) as caught:
        _prepare(parent, tmp_path / "out", "idrid")
    assert "b. IDRiD_Disease Grading_Testing Labels.csv:5: label row for 'IDRiD_004' has no image file" \
        in str(caught.value)


def test_idrid_root_without_the_grading_folder_is_one_clear_error(tmp_path):
    (tmp_path / "A. Segmentation").mkdir()
    with pytest.raises(DataError, match="no 'B. Disease Grading' folder"):
        idrid.read(SourceConfig(kind="idrid", root=str(tmp_path)))


def test_idrid_from_the_command_line(idrid_parent, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(["prepare", "source=idrid", f"source.root={idrid_parent / 'B. Disease Grading'}", f"out={out}",
                     "workers=1", "progress=false", "shard_samples=50"])
    assert code in (0, None), capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "idrid" and manifest["splits"]["test"]["count"] == 10
