"""synth -> prepare -> read back with the webdataset library and with DALI's reader (CPU) on our index files."""
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.sources import SourceConfig
from tltrain.data.verify import verify_shards
from tltrain.errors import DataError


def _labels_csv(raw):
    import csv

    return {r["image"]: int(r["level"]) for r in csv.DictReader(open(raw / "trainLabels.csv"))}


def test_webdataset_library_reads_every_sample_once(fundus_raw, fundus_shards):
    import webdataset as wds

    manifest = json.loads((fundus_shards / "manifest.json").read_text())
    urls = [str(fundus_shards / s["tar"]) for s in manifest["shards"]]
    seen = Counter()
    truth = _labels_csv(fundus_raw)
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"):
        seen[sample["__key__"]] += 1
        assert sample["cls"] == truth[sample["__key__"]]
        assert sample["json"]["label"] == sample["cls"]
        assert sample["jpg"].size[0] > 0
    assert set(seen) == set(truth) and set(seen.values()) == {1}
    assert manifest["counts"] == {"found": len(truth), "written": len(truth), "skipped": 0, "problems": 0}


def test_dali_reader_with_project_index_files(fundus_raw, fundus_shards):
    from nvidia.dali import fn, pipeline_def, types

    manifest = json.loads((fundus_shards / "manifest.json").read_text())
    tars = [str(fundus_shards / s["tar"]) for s in manifest["shards"]]
    n = sum(s["count"] for s in manifest["shards"])

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl, disc = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars],
                                               ext=["jpg", "lbl", "disc"],
                                               dtypes=[types.UINT8, types.INT32, types.FLOAT],
                                               name="reader", pad_last_batch=False)
        return fn.decoders.image(jpg, device="cpu"), lbl, fn.pad(fn.get_property(jpg, key="source_info"), fill_value=0)

    p = pipe()
    p.build()
    truth = _labels_csv(fundus_raw)
    seen = Counter()
    while sum(seen.values()) < n:
        images, labels, info = p.run()
        for i in range(len(labels)):
            key = bytes(np.asarray(info.at(i))).rstrip(b"\0").decode().rsplit(":", 1)[-1].rsplit(".", 1)[0]
            if sum(seen.values()) < n:
                seen[key] += 1
                assert int(np.asarray(labels.at(i))[0]) == truth[key]
                assert np.asarray(images.at(i)).ndim == 3
    assert set(seen) == set(truth) and set(seen.values()) == {1}


def test_index_matches_dalis_wds2idx(fundus_shards, tmp_path):
    tool = Path(sys.executable).parent / "wds2idx"
    tar = next(fundus_shards.glob("val-*.tar"))
    subprocess.run([str(tool), str(tar), str(tmp_path / "x.idx")], check=True, capture_output=True)
    assert (tmp_path / "x.idx").read_text() == tar.with_suffix(".idx").read_text()


def test_no_patient_in_two_splits_and_nested_stratified_fractions(fundus_shards):
    import webdataset as wds

    manifest = json.loads((fundus_shards / "manifest.json").read_text())
    split_of_patient, train_tier = {}, {}
    for shard in manifest["shards"]:
        for sample in wds.WebDataset(str(fundus_shards / shard["tar"]), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            split_of_patient.setdefault(meta["patient"], set()).add(shard["split"])
            if shard["split"] == "train":
                train_tier[sample["__key__"]] = (shard["tier"], meta["label"])
    assert all(len(s) == 1 for s in split_of_patient.values())
    assert set(manifest["splits"]) == {"train", "val", "test"}
    train_counts = np.array(manifest["splits"]["train"]["class_counts"])
    previous = set()
    for fraction, info in sorted(manifest["fractions"].items(), key=lambda kv: float(kv[0])):
        keys = {k for k, (tier, _) in train_tier.items() if tier <= info["tier"]}
        assert previous <= keys  # nested
        previous = keys
        counts = np.bincount([train_tier[k][1] for k in keys], minlength=5)
        assert counts.tolist() == info["class_counts"] and len(keys) == info["count"]
        expected = np.maximum(1, np.round(float(fraction) * train_counts))
        assert np.all(np.abs(counts - expected) <= 1)  # stratified within one sample per class


def test_same_seed_same_bytes_and_interrupted_run_resumes(fundus_raw, fundus_shards, tmp_path):
    cfg = PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(fundus_raw)), out=str(tmp_path / "s"),
                        shard_samples=12, workers=2, progress=False)
    first = run_prepare(cfg)
    reference = json.loads((fundus_shards / "manifest.json").read_text())
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in reference["shards"]]
    # simulate a crash: two shards gone, one half-written temp file left behind
    out = tmp_path / "s"
    for shard in first["shards"][:2]:
        (out / shard["tar"]).unlink()
        (out / f"{shard['name']}.done.json").unlink()
    (out / ".train-f100-000000.tar.tmp").write_bytes(b"partial")
    resumed = run_prepare(cfg)
    strip = lambda m: {k: v for k, v in m.items() if k != "created"}  # noqa: E731
    assert strip(resumed) == strip(first)
    assert not list(out.glob(".*.tmp"))
    assert verify_shards(out)["ok"]


def test_verify_catches_a_flipped_byte(fundus_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fundus_shards, copy)
    tar = next(copy.glob("train-*.tar"))
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(DataError, match=tar.name):
        verify_shards(copy)


def test_offline_radius_resize_shrinks_and_centres_disc(fundus_raw, tmp_path):
    manifest = run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(fundus_raw)),
                                         out=str(tmp_path / "r"), resize="radius:32", workers=2, progress=False))
    import webdataset as wds

    sample = next(iter(wds.WebDataset(str(tmp_path / "r" / manifest["shards"][0]["tar"]), shardshuffle=False,
                                      empty_check=False).decode("pil")))
    width, height = sample["jpg"].size
    cx, cy, r = sample["json"]["disc"]
    assert r == 32.0 and width <= 64 and height <= 64  # the disc square, less what lay outside the photo
    assert abs(cx - 32) <= 32 - width / 2 + 0.5 and abs(cy - 32) <= 32 - height / 2 + 0.5
    assert verify_shards(tmp_path / "r")["ok"]


def test_offline_radius_resize_keeps_a_cut_edge_a_cut_edge(tmp_path):
    """A photo cut at top and bottom keeps its cut after `resize=radius:N`: the stored image is only the photo's
    part of the disc square, so the loaders give the rest zero weight instead of filtering black padding."""
    from PIL import Image

    from tltrain.data.prepare import _resized_sample

    photo = Image.new("RGB", (100, 70), (120, 60, 30))
    path = tmp_path / "cut.jpeg"
    photo.save(path, quality=95)
    data, disc, size = _resized_sample(str(path), (50.0, 35.0, 50.0), "radius", 32, 95)
    assert size == (64, 45) and disc == pytest.approx((32.0, 32.0 - 15 * 45 / 70, 32.0))


@pytest.mark.parametrize("resize", ["longest:80", "radius:48"])
def test_resized_oriented_photos_are_stored_upright_without_their_tag(fundus_raw, tmp_path, resize):
    """With resize, prepare re-encodes the rule's (oriented) pixels: the stored JPEG must carry no orientation tag
    (DALI would turn it a second time) and its disc must be the true disc of the oriented photo, scaled."""
    import io
    import tarfile

    from PIL import Image

    from tltrain.data.decode import orientation
    from tltrain.data.disc import find_disc

    truth = json.loads((fundus_raw / "truth.json").read_text())
    turned = {stem for stem, info in truth.items() if info["orientation"] in (5, 6, 7, 8)}  # width and height swap
    assert turned
    out = tmp_path / "o"
    run_prepare(PrepareConfig(source=SourceConfig(kind="eyepacs", root=str(fundus_raw)), out=str(out), resize=resize,
                              workers=1, progress=False))
    seen = set()
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if not name.endswith(".json"):
                continue
            meta = json.loads(data)
            if meta["name"] not in turned:
                continue
            seen.add(meta["name"])
            with Image.open(io.BytesIO(members[f"{meta['key']}.jpg"])) as img:
                assert orientation(img) == 1, meta["name"]
                pixels = np.asarray(img.convert("RGB"))
            disc = np.frombuffer(members[f"{meta['key']}.disc"], "<f4").astype(float)
            if resize.startswith("longest"):
                assert (pixels.shape[1], pixels.shape[0]) == (80, 60), meta["name"]  # upright landscape
                want = np.asarray(truth[meta["name"]]["disc"]) * 80 / 160
            else:
                assert disc[2] == 48.0 and max(pixels.shape[:2]) <= 96
                want = disc
            found = np.asarray(find_disc(pixels).disc)  # the retina really lies where .disc says, upright
            assert np.abs(disc - want).max() <= 0.015 * want[2], (meta["name"], disc, want)
            assert np.abs(found - disc).max() <= 0.03 * disc[2], (meta["name"], found, disc)
    assert seen == turned


def test_prepare_crop_box_equals_the_training_crop_box():
    """prepare's torch-free disc_square must cut exactly the square the loaders cut (tltrain.preprocess.disc_box)."""
    from tltrain.data.disc import disc_square
    from tltrain.preprocess import disc_box

    rng = np.random.default_rng(0)
    discs = [(10.5, 20.5, 7.25), (0.0, 0.0, 1.0)] + [tuple(rng.uniform(0, 3000, 3)) for _ in range(200)]
    for disc in discs:
        assert disc_square(disc) == disc_box(disc, 2592, 1944), disc


def test_prepare_workers_do_not_import_torch(fundus_raw, tmp_path):
    """Each prepare process would otherwise carry ~400 MB of torch; the radius resize path is the one at risk."""
    code = (
        "import sys\n"
        "from tltrain.data.prepare import PrepareConfig, run_prepare\n"
        "from tltrain.data.sources import SourceConfig\n"
        f"run_prepare(PrepareConfig(source=SourceConfig(kind='eyepacs', root={str(fundus_raw)!r}), "
        f"out={str(tmp_path / 'o')!r}, resize='radius:32', workers=1, progress=False))\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_prepare_lists_images_accepted_near_the_disc_threshold_with_their_fill(tmp_path, capsys):
    """A retina with a 40-degree sector cut away fills 0.89 of its circle: accepted (MIN_FILL 0.85) but listed in
    manifest.json disc_near_threshold with its fill, at any canvas size; the whole ones are not listed."""
    from PIL import ImageDraw

    from tltrain.data.disc import MIN_FILL
    from tltrain.data.synth import _rng, render_fundus_disc

    for name in ("a", "b"):
        (tmp_path / "raw" / name).mkdir(parents=True)
    for index, width in enumerate((640, 1600)):
        height = width * 2 // 3
        r = 0.46 * height
        img, _ = render_fundus_disc(_rng(25, index), 1, width, height, disc=(width / 2, height / 2, r))
        Image.fromarray(img).save(tmp_path / "raw" / "a" / f"whole_{width}.png")
        pil = Image.fromarray(img)
        ImageDraw.Draw(pil).pieslice([width / 2 - r - 5, height / 2 - r - 5, width / 2 + r + 5, height / 2 + r + 5],
                                     160, 200, fill=(0, 0, 0))
        pil.save(tmp_path / "raw" / "b" / f"notched_{width}.png")
    manifest = run_prepare(PrepareConfig(source=SourceConfig(kind="imagefolder", root=str(tmp_path / "raw")),
                                         out=str(tmp_path / "out"), val_fraction=0, test_fraction=0, workers=1,
                                         progress=False))
    near = manifest["disc_near_threshold"]
    assert near["min_fill"] == MIN_FILL and near["count"] == 2
    assert sorted(Path(s["file"]).name for s in near["samples"]) == ["notched_1600.png", "notched_640.png"]
    assert all(abs(s["fill"] - (1 - 40 / 360)) < 0.02 for s in near["samples"])
    assert "2 image(s) were accepted with a disc fill within 0.05 of the 0.85 threshold" in capsys.readouterr().out
