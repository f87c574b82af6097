"""Sample keys from any file name: spaces, dots, non-ASCII, long names and names differing only in case go through
prepare -> verify -> the webdataset library, DALI's reader (with an index identical to wds2idx's) and both loaders.
"""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tltrain.data.keys import MAX_KEY_LEN, is_safe_key, make_keys, path_hash
from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.sources import SourceConfig, read_source
from tltrain.data.verify import verify_shards
from tltrain.errors import DataError

# original patient ids -> what each one exercises
ODD_PATIENTS = {
    "mal 00000": "space",
    "909.v2": "dot in the stem",
    "über-ñandú": "non-ASCII (folds to ASCII)",
    "眼底": "non-ASCII (nothing left to fold)",
    "P" * 180: "very long",
    "Case": "differs from the next only in case",
    "case": "differs from the previous only in case",
}


def _rename_patients(raw: Path, new_ids: list[str]) -> dict[str, str]:
    """Rename the first patients' images and CSV rows to new_ids; returns original image name -> label."""
    rows = list(csv.DictReader(open(raw / "trainLabels.csv")))
    patients = sorted({r["image"].rsplit("_", 1)[0] for r in rows}, key=int)
    mapping = dict(zip(patients, new_ids))
    for row in rows:
        patient, eye = row["image"].rsplit("_", 1)
        if patient in mapping:
            new = f"{mapping[patient]}_{eye}"
            (raw / "train" / f"{row['image']}.jpeg").rename(raw / "train" / f"{new}.jpeg")
            row["image"] = new
    with open(raw / "trainLabels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "level"])
        writer.writeheader()
        writer.writerows(rows)
    return {r["image"]: int(r["level"]) for r in rows}


@pytest.fixture(scope="module")
def odd_names(fundus_raw, tmp_path_factory):
    raw = tmp_path_factory.mktemp("odd") / "raw"
    shutil.copytree(fundus_raw, raw)
    truth = _rename_patients(raw, list(ODD_PATIENTS))
    out = raw.parent / "shards"
    manifest = run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(raw)), out=str(out),
                                         shard_samples=12, workers=1, progress=False))
    return raw, out, manifest, truth


def _samples(out: Path, manifest: dict) -> dict[str, dict]:
    """key -> .json metadata, read with the webdataset library (its own key splitting)."""
    import webdataset as wds

    urls = [str(out / s["tar"]) for s in manifest["shards"]]
    seen = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
        assert sample["__key__"] not in seen
        assert sample["jpg"].size[0] > 0 and sample["cls"] == sample["json"]["label"]
        seen[sample["__key__"]] = sample["json"]
    return seen


def test_every_odd_name_reaches_webdataset_with_its_original_name(odd_names):
    raw, out, manifest, truth = odd_names
    assert manifest["counts"]["written"] == len(truth) and manifest["counts"]["problems"] == 0
    assert verify_shards(out)["ok"]
    samples = _samples(out, manifest)
    by_name = {meta["name"]: (key, meta) for key, meta in samples.items()}
    assert set(by_name) == set(truth)  # every original name kept in the .json member
    for name, (key, meta) in by_name.items():
        assert meta["key"] == key and is_safe_key(key) and meta["label"] == truth[name]
        assert meta["file"] == f"train/{name}.jpeg"
        assert len(f"{key}.json".encode()) <= 100  # a plain ustar name field
    plain = [n for n in by_name if n.rsplit("_", 1)[0] not in ODD_PATIENTS]
    assert plain and all(by_name[n][0] == n for n in plain)  # plain names stay their own key (10_left)
    assert len({k.lower() for k in samples}) == len(samples)  # distinct ignoring case ("Case" vs "case")
    assert by_name["Case_left"][0].lower() != by_name["case_left"][0].lower()
    assert len(by_name["P" * 180 + "_left"][0]) <= MAX_KEY_LEN
    # patients still come from the original names: both eyes of "909.v2" are one patient, in one split
    for patient in ODD_PATIENTS:
        metas = [by_name[f"{patient}_{eye}"][1] for eye in ("left", "right")]
        assert {m["patient"] for m in metas} == {patient}
    split_of = {}
    for shard in manifest["shards"]:
        import webdataset as wds

        for sample in wds.WebDataset(str(out / shard["tar"]), shardshuffle=False, empty_check=False):
            split_of.setdefault(json.loads(sample["json"])["patient"], set()).add(shard["split"])
    assert all(len(splits) == 1 for splits in split_of.values())


def test_odd_names_index_identical_to_wds2idx_and_read_by_dali(odd_names, tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    _, out, manifest, truth = odd_names
    tool = Path(sys.executable).parent / "wds2idx"
    for shard in manifest["shards"]:
        tar = out / shard["tar"]
        subprocess.run([str(tool), str(tar), str(tmp_path / "x.idx")], check=True, capture_output=True)
        assert (tmp_path / "x.idx").read_text() == (out / shard["index"]).read_text(), shard["tar"]
    names = {key: meta["name"] for key, meta in _samples(out, manifest).items()}
    tars = [str(out / s["tar"]) for s in manifest["shards"]]

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=["jpg", "lbl"],
                                         dtypes=[types.UINT8, types.INT32], name="reader", pad_last_batch=False)
        return fn.decoders.image(jpg, device="cpu"), lbl, fn.pad(fn.get_property(jpg, key="source_info"), fill_value=0)

    p = pipe()
    p.build()
    seen = {}
    while len(seen) < len(truth):
        _, labels, info = p.run()
        for i in range(len(labels)):
            key = bytes(np.asarray(info.at(i))).rstrip(b"\0").decode().rsplit(":", 1)[-1].rsplit(".", 1)[0]
            seen[key] = int(np.asarray(labels.at(i))[0])
    assert {names[k]: label for k, label in seen.items()} == truth


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_both_loaders_read_every_odd_name(odd_names, backend):
    from tltrain.data.loaders import LoaderConfig, build_loader

    _, out, manifest, truth = odd_names
    names = {key: meta["name"] for key, meta in _samples(out, manifest).items()}
    got = {}
    for split in ("train", "val", "test"):
        cfg = LoaderConfig(backend=backend, batch_size=8, size=32, workers=1)
        for batch in build_loader(cfg, out, split, train=False):
            for key, label, valid in zip(batch.keys, batch.labels.tolist(), batch.valid.tolist()):
                if valid:
                    assert names[key] not in got
                    got[names[key]] = label
    assert got == truth


def test_key_rules():
    names = ["10_left", "a b", "a_b", "a.b", "X", "x", "ü", "眼", "y" * 300]
    keys = make_keys(names, [f"train/{n}.jpeg" for n in names])
    assert keys[0] == "10_left" and keys[2] == "a_b"  # safe and unique: unchanged
    assert keys[1] == f"a_b-{path_hash('train/a b.jpeg')}" and keys[1] != keys[3]  # sanitised: slug + hash
    assert keys[4] != "X" and keys[5] != "x" and keys[4].lower() != keys[5].lower()  # case twins both hashed
    assert keys[6].startswith("u-") and keys[7].startswith("sample-") and len(keys[8]) == MAX_KEY_LEN
    assert all(is_safe_key(k) for k in keys) and len({k.lower() for k in keys}) == len(keys)
    assert make_keys(names, [f"train/{n}.jpeg" for n in names]) == keys  # deterministic


def test_real_collision_is_a_problem_naming_both_files(fundus_raw, tmp_path):
    """A file literally named like another's hashed key: two samples would share a key."""
    raw = tmp_path / "raw"
    shutil.copytree(fundus_raw, raw)
    truth = _rename_patients(raw, ["a b"])
    taken = f"a_b_left-{path_hash('train/a b_left.jpeg')}"  # the key "a b_left" gets
    shutil.copy(raw / "train" / "a b_left.jpeg", raw / "train" / f"{taken}.jpeg")
    with open(raw / "trainLabels.csv", "a") as f:
        f.write(f"{taken},{truth['a b_left']}\n")
    source = read_source(SourceConfig(kind="eyepacs", root=str(raw)))
    problems = [str(p) for p in source.problems]
    assert len(problems) == 1 and "a b_left.jpeg" in problems[0] and f"{taken}.jpeg" in problems[0], problems
    with pytest.raises(DataError, match="collides"):
        run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(raw)), out=str(tmp_path / "o"),
                                  workers=1, progress=False))


def test_imagefolder_same_stem_is_a_problem_and_lookalike_paths_get_distinct_keys(tmp_path):
    from PIL import Image

    root = tmp_path / "folder"
    for rel in ("a/b_c.png", "a_b/c.png", "a/x.png", "a/x.jpg", "a_b/ok.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / rel)
    source = read_source(SourceConfig(kind="imagefolder", root=str(root)))
    keys = {r.file: r.key for r in source.records}
    assert keys["a/b_c.png"] != keys["a_b/c.png"] and keys["a_b/ok.png"] == "a_b_ok"
    assert len(source.records) == len(source.candidates) == 4  # manifest counts: found = written + skipped
    assert [(Path(p.file).name, "x.jpg" in p.reason) for p in source.problems] == [("x.png", True)]
