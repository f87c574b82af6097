"""Shards, manifests and source folders made by someone else are data (issue 23): each test crafts the hostile file
and proves the fault is gone by a refusal naming the file, a byte comparison, or a memory bound."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, tiny_run_overrides
from tltrain.data.decode import MAX_PIXELS
from tltrain.data.loaders import LoaderConfig, build_loader
from tltrain.data.loaders.plan import select_shards
from tltrain.data.manifest import MAX_CLASSES, load_manifest
from tltrain.data.prepare import OWNER_FILE, PrepareConfig, run_prepare
from tltrain.data.shards import MEMBER_BYTES, iter_tar_samples, read_index
from tltrain.data.sources import SourceConfig
from tltrain.data.verify import verify_shards
from tltrain.errors import ConfigError, DataError


def _copy(shards: Path, tmp_path: Path, name: str = "copy") -> Path:
    copy = tmp_path / name
    shutil.copytree(shards, copy)
    return copy


def _edit_manifest(folder: Path, edit) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _max_rss_mb(code: str, timeout: int = 120) -> tuple[float, str]:
    """Run `code` in a fresh interpreter; its peak RSS in MB and its output. The peak is VmHWM, the high-water
    mark of the child's own address space: getrusage's ru_maxrss would carry over pytest's (torch-sized) RSS
    from the fork that started the child."""
    wrapper = (f"{code}\nprint('RSS_KB', next(int(line.split()[1]) for line in open('/proc/self/status') "
               "if line.startswith('VmHWM')))\n")
    done = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    rss = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("RSS_KB"))
    return rss / 1024, done.stdout


def _prepare_cfg(root, out, **kw) -> PrepareConfig:
    kw.setdefault("workers", 1)
    return PrepareConfig(source=SourceConfig(kind=kw.pop("kind", "eyepacs"), root=str(root)), out=str(out),
                         progress=False, shard_samples=12, **kw)


# -- 1. one manifest reader: entries stay in the folder, values bounded -------------------------------------------
@pytest.mark.parametrize("entry", ["/etc/passwd", "../../../../etc/passwd"])
def test_shard_entry_outside_the_folder_is_refused_by_verify_training_and_evaluation(fundus_shards, tmp_path, entry):
    copy = _copy(fundus_shards, tmp_path)
    _edit_manifest(copy, lambda m: [s.update(tar=entry) for s in m["shards"]])
    checks = {
        "verify": lambda: verify_shards(copy, workers=1),
        "train loader": lambda: build_loader(LoaderConfig(batch_size=8, size=32, workers=0), copy, "train",
                                             train=True, fraction=1.0),
        "evaluate loader": lambda: build_loader(LoaderConfig(batch_size=8, size=32, workers=0), copy, "test",
                                                train=False),
        "run planning": lambda: __import__("tltrain.runner", fromlist=["read_manifest"]).read_manifest(copy),
    }
    for name, check in checks.items():
        with pytest.raises(DataError, match="outside the folder") as info:
            check()
        assert "\n" not in str(info.value) and "manifest.json" in str(info.value), name


def test_shard_linked_from_outside_the_folder_no_longer_passes_verify(fundus_shards, tmp_path):
    """A valid shard kept outside the folder (reached by `..` or by a symlink) used to pass verify."""
    copy = _copy(fundus_shards, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    first = manifest["shards"][0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(copy / first["tar"], elsewhere / first["tar"])
    (copy / first["tar"]).symlink_to(elsewhere / first["tar"])
    with pytest.raises(DataError, match="through a symbolic link"):
        verify_shards(copy, workers=1)
    (copy / first["tar"]).unlink()
    _edit_manifest(copy, lambda m: m["shards"][0].update(tar=f"../elsewhere/{first['tar']}"))
    with pytest.raises(DataError, match="outside the folder"):
        verify_shards(copy, workers=1)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(num_classes=10**9), "num_classes must be a whole number"),
    (lambda m: m.update(num_classes=5.5), "num_classes must be a whole number"),
    (lambda m: m.update(classes=m["classes"] + ["x" * 5000], num_classes=6), "at most 256 characters"),
    (lambda m: m.update(format="something-else/9"), "format"),
    (lambda m: m["shards"][0].update(count=-1), "count must be a whole number"),
    (lambda m: m["shards"][0].update(bytes="12"), "bytes must be a whole number"),
    (lambda m: m["shards"][0].update(name="a/b"), "shard name"),
    (lambda m: m["fractions"]["1"].update(shards=["../x"]), "not in the shard list"),
    (lambda m: m["splits"]["train"].update(class_counts=[1] * (MAX_CLASSES + 1)), "at most 10,000 counts"),
])
def test_manifest_values_are_bounded_before_anything_is_built(fundus_shards, tmp_path, edit, needle):
    copy = _copy(fundus_shards, tmp_path)
    _edit_manifest(copy, edit)
    for reader in (load_manifest, lambda d: select_shards(d, "val"), lambda d: verify_shards(d, workers=1)):
        with pytest.raises(DataError, match=needle) as info:
            reader(copy)
        assert "\n" not in str(info.value)


def test_manifest_that_is_not_a_regular_file_is_refused_without_blocking(fundus_shards, tmp_path):
    copy = _copy(fundus_shards, tmp_path)
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="not a regular file"):
        load_manifest(copy)


# -- 2. tar members: regular, matching the index, under a cap, checked before a byte is read ----------------------
def _huge_member_shard(shards: Path, tmp_path: Path, declared: int = 2 << 30) -> tuple[Path, dict]:
    """A copy whose first val shard is a tar declaring one `declared`-byte member: a sparse file, 100 KB on disk,
    with the declared length (so the old readers really read it all)."""
    copy = _copy(shards, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["split"] == "val")
    info = tarfile.TarInfo(read_index(copy / entry["index"])[0]["jpg"][2])
    info.size = declared
    tar = copy / entry["tar"]
    tar.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + b"\x01" * 100_000)
    os.truncate(tar, tarfile.BLOCKSIZE + declared + 2 * tarfile.BLOCKSIZE)
    return copy, entry  # its size differs from the manifest's: verify says so (not hashing 2 GB) and goes on


def test_verify_refuses_a_huge_declared_member_without_reading_it(fundus_shards, tmp_path):
    """Measured on this shard (VmHWM): before 2,088 MB (it read the 2 GB member), after 41 MB. Bound: 400 MB."""
    copy, entry = _huge_member_shard(fundus_shards, tmp_path)
    rss, out = _max_rss_mb(
        "from tltrain.data.verify import verify_shards\nfrom tltrain.errors import DataError\n"
        f"try:\n    verify_shards({str(copy)!r}, workers=1)\nexcept DataError as exc:\n    print('REFUSED', exc)\n")
    assert "REFUSED" in out and f"over the {MEMBER_BYTES:,}-byte limit" in out and entry["tar"] in out
    assert rss < 400, f"verify peaked at {rss:.0f} MB"


def test_loaders_refuse_a_huge_declared_member_without_reading_it(fundus_shards, tmp_path):
    copy, entry = _huge_member_shard(fundus_shards, tmp_path, declared=20 << 30)
    with pytest.raises(DataError, match="over the .*-byte limit"):  # the torch backend's (and evaluate's) reader
        next(iter_tar_samples(copy / entry["tar"]))
    evaluation = build_loader(LoaderConfig(batch_size=8, size=32, workers=0), copy, "val", train=False)
    with pytest.raises(DataError, match=f"{entry['tar']}: member .* over the .*-byte limit"):
        list(evaluation)
    index = copy / entry["index"]  # DALI reads what the index says: an index member over the cap is refused
    lines = index.read_text().splitlines()
    fields = lines[1].split(" ")
    fields[2] = str(20 << 30)
    index.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=f"{index.name}:2: member .* over the"):
        build_loader(LoaderConfig(batch_size=8, size=32, workers=0), copy, "val", train=False)


def test_index_past_the_end_of_its_tar_and_non_regular_index_are_refused(fundus_shards, tmp_path):
    copy = _copy(fundus_shards, tmp_path)
    entry = next(s for s in load_manifest(copy)["shards"] if s["split"] == "val")
    tar = copy / entry["tar"]
    tar.write_bytes(tar.read_bytes()[:2048])  # the index now points past the end
    with pytest.raises(DataError, match="damaged shard"):
        build_loader(LoaderConfig(batch_size=8, size=32, workers=0), copy, "val", train=False)
    (copy / entry["index"]).unlink()
    (copy / entry["index"]).symlink_to("/dev/zero")
    with pytest.raises(DataError, match="not a regular file"):
        read_index(copy / entry["index"])


def test_symlink_member_in_a_shard_is_refused(tmp_path):
    tar = tmp_path / "links.tar"
    with tarfile.open(tar, "w") as out:
        link = tarfile.TarInfo("k.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        out.addfile(link)
    with pytest.raises(DataError, match="not a regular file"):
        list(iter_tar_samples(tar))


# -- 3. prepare stays inside the source root ----------------------------------------------------------------------
def test_prepare_does_not_follow_a_symlink_out_of_the_source_root(fundus_raw, tmp_path):
    raw = _copy(fundus_raw, tmp_path, "raw")
    victim = sorted((raw / "train").glob("*.jpeg"))[0]
    outside = tmp_path / "private" / victim.name
    outside.parent.mkdir()
    shutil.move(victim, outside)
    victim.symlink_to(outside)
    secret = outside.read_bytes()
    with pytest.raises(DataError, match=f"(?s){victim.name}: leads outside source.root"):
        run_prepare(_prepare_cfg(raw, tmp_path / "out"))
    manifest = run_prepare(_prepare_cfg(raw, tmp_path / "out", on_problem="skip"))
    assert any(victim.name in p["file"] and "follow_links_outside" in p["reason"] for p in manifest["problems"])
    assert all(secret not in (tmp_path / "out" / s["tar"]).read_bytes() for s in manifest["shards"])
    allowed = run_prepare(_prepare_cfg(raw, tmp_path / "out2", follow_links_outside=True))
    assert allowed["counts"]["written"] == manifest["counts"]["written"] + 1
    assert any(secret in (tmp_path / "out2" / s["tar"]).read_bytes() for s in allowed["shards"])


def test_labels_csv_that_is_a_fifo_is_refused_without_blocking(fundus_raw, tmp_path):
    raw = _copy(fundus_raw, tmp_path, "raw")
    (raw / "trainLabels.csv").unlink()
    os.mkfifo(raw / "trainLabels.csv")
    # no writer ever opens the FIFO: a blocking open would hang here
    with pytest.raises(DataError, match="trainLabels.csv: labels CSV is a FIFO"):
        run_prepare(_prepare_cfg(raw, tmp_path / "out"))


# -- 4. prepare refuses an out holding another dataset; a re-run of the same dataset resumes ---------------------
def _small_imagefolder(tmp_path: Path) -> Path:
    from tltrain.data.synth import generate_target_domain

    raw = tmp_path / "other_raw"
    generate_target_domain(raw, n_per_class=6, size=64, seed=1, workers=1, progress=False)
    return raw


def test_prepare_refuses_an_out_holding_another_dataset_unless_replace(fundus_shards, tmp_path):
    out = _copy(fundus_shards, tmp_path, "out")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = _small_imagefolder(tmp_path)
    cfg = _prepare_cfg(other, out, kind="imagefolder", val_fraction=0.2, test_fraction=0.2)
    with pytest.raises(DataError, match="holds the shards of another dataset") as info:
        run_prepare(cfg)
    assert "\n" not in str(info.value) and "replace=true" in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched
    (out / OWNER_FILE).unlink()  # a folder written before the owner file: told apart by its manifest's source
    with pytest.raises(DataError, match="another dataset"):
        run_prepare(cfg)
    cfg.replace = True
    manifest = run_prepare(cfg)
    assert manifest["source"]["root"] == str(other.resolve()) and verify_shards(out, workers=1)["ok"]
    assert not [name for name in before if name.endswith(".tar") and (out / name).exists()
                and name not in {s["tar"] for s in manifest["shards"]}]


def test_rerunning_the_same_prepare_into_its_out_keeps_working(fundus_raw, fundus_shards, tmp_path, capsys):
    out = _copy(fundus_shards, tmp_path, "out")
    reference = json.loads((out / "manifest.json").read_text())
    (out / OWNER_FILE).unlink()  # also when the folder predates the owner file
    again = run_prepare(_prepare_cfg(fundus_raw, out, workers=2))
    assert "resuming" in capsys.readouterr().out
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in reference["shards"]]
    # a split prepare (as `tltrain submit --prepare` runs it) of the same dataset into the same out
    for phase, tasks in (("check", 2), ("write", 2), ("finish", 1)):
        for task in range(tasks):
            run_prepare(_prepare_cfg(fundus_raw, out, phase=phase, task=f"{task}/{tasks}"))
    assert [s["sha256"] for s in load_manifest(out)["shards"]] == [s["sha256"] for s in reference["shards"]]
    other = _small_imagefolder(tmp_path)  # the check phase of another dataset is refused before any work
    with pytest.raises(DataError, match="another dataset"):
        run_prepare(_prepare_cfg(other, out, kind="imagefolder", phase="check", task="0/2"))


# -- 5. one pixel limit, checked from the header ------------------------------------------------------------------
def _large_canvas_png(path: Path, width: int = 8000, height: int = 8000) -> Path:
    """A valid RGBA PNG of width x height, all transparent: a few hundred KB on disk, 256 MB of pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row, parts = zlib.compressobj(9), b"\x00" * (1 + 4 * width), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))
    return path


def test_large_canvas_png_is_refused_from_its_header(tmp_path):
    png = _large_canvas_png(tmp_path / "canvas.png")
    assert png.stat().st_size < 1_000_000 and 8000 * 8000 > MAX_PIXELS
    rss, out = _max_rss_mb(
        "from tltrain.data.decode import decode_image\nfrom tltrain.errors import DataError\n"
        f"try:\n    decode_image({str(png)!r}, {str(png)!r})\nexcept DataError as exc:\n    print('REFUSED', exc)\n")
    assert f"REFUSED {png}: 8000 x 8000 pixels (64 MP) is over the 50 MP limit" in out
    assert rss < 250, f"decoding peaked at {rss:.0f} MB"  # decoded, the RGBA canvas alone is 256 MB


def test_prepare_reports_and_predict_skips_a_large_canvas(fundus_raw, tmp_path, monkeypatch):
    raw = _copy(fundus_raw, tmp_path, "raw")
    victim = sorted((raw / "train").glob("*.jpeg"))[1]
    victim.unlink()
    _large_canvas_png(victim.with_suffix(".png"))
    manifest = run_prepare(_prepare_cfg(raw, tmp_path / "out", on_problem="skip"))
    reasons = {Path(p["file"]).name: p["reason"] for p in manifest["problems"]}
    assert "over the 50 MP limit" in reasons[victim.with_suffix(".png").name]

    import torch

    import tltrain.export.prediction as export

    class FakeModel:  # predict's model: two logits per image; any package attribute predict asks for is None
        def __call__(self, x):
            return torch.zeros(len(x), 2)

        def __getattr__(self, name):
            return None

    monkeypatch.setattr(export, "load_pretrained", lambda *args, **kwargs: (
        FakeModel(), lambda image, source: torch.zeros(3, 8, 8)))
    monkeypatch.setattr(export, "read_metadata", lambda *args, **kwargs: {"classes": ["a", "b"], "num_classes": 2})
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(victim.with_suffix(".png"), images / "big.png")
    shutil.copy(sorted((raw / "train").glob("*.jpeg"))[0], images / "ok.jpeg")
    result = export.predict("pkg", images, tmp_path / "p.csv", progress=False)
    assert result["predicted"] == 1 and [Path(s["file"]).name for s in result["skipped"]] == ["big.png"]
    assert "50 MP limit" in result["skipped"][0]["reason"]


# -- 6. prepare's values checked before anything runs -------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("jpeg_quality", 500), ("jpeg_quality", 0), ("resize", "radius:99999"),
                                        ("resize", "longest:\u00b2"), ("shard_samples", 0), ("workers", -1),
                                        ("shard_mb", float("nan")), ("fractions", []), ("seed", -3),
                                        ("val_fraction", float("inf"))])
def test_prepare_values_are_checked_before_anything_runs(fundus_raw, tmp_path, key, value):
    cfg = _prepare_cfg(fundus_raw, tmp_path / "out")
    setattr(cfg, key, value)
    with pytest.raises(ConfigError, match=f"prepare.{key}") as info:
        run_prepare(cfg)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


# -- 7. image types: GIF/WebP read, multi-frame files and unread types are problems -------------------------------
def test_gif_and_webp_are_read_multi_frame_and_unread_types_are_problems(fundus_raw, tmp_path):
    raw = _copy(fundus_raw, tmp_path, "raw")
    photos = sorted((raw / "train").glob("*.jpeg"))
    for photo, suffix in ((photos[0], ".webp"), (photos[1], ".gif")):
        Image.open(photo).save(photo.with_suffix(suffix), lossless=True) if suffix == ".webp" else \
            Image.open(photo).convert("P").save(photo.with_suffix(suffix))
        photo.unlink()
    frames = [Image.open(photos[2]), Image.open(photos[2]).rotate(90)]
    frames[0].save(photos[2].with_suffix(".tif"), save_all=True, append_images=frames[1:])
    photos[2].unlink()
    (raw / "train" / "scan.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    manifest = run_prepare(_prepare_cfg(raw, tmp_path / "out", on_problem="skip"))
    reasons = {Path(p["file"]).name: p["reason"] for p in manifest["problems"]}
    assert "2 frames/pages" in reasons[photos[2].with_suffix(".tif").name]
    assert "not read by tltrain" in reasons["scan.heic"]
    keys = {m["__key__"]: m for s in manifest["shards"] for m in iter_tar_samples(tmp_path / "out" / s["tar"])}
    for photo in photos[:2]:  # read by the shared rule and stored as lossless PNG
        assert "png" in keys[photo.stem] and json.loads(keys[photo.stem]["json"])["file"].endswith(
            (".webp", ".gif"))


# -- 8. a shard that disappears during a torch-backend run stops it -----------------------------------------------
def test_shard_deleted_between_epochs_stops_the_torch_run_naming_it(fundus_shards, tmp_path, monkeypatch):
    from tltrain.data.loaders.torch_wds import TorchWdsLoader
    from tltrain.train_app import train_from_overrides

    copy = _copy(fundus_shards, tmp_path)
    victim = copy / next(s["tar"] for s in load_manifest(copy)["shards"] if s["split"] == "train")
    set_epoch = TorchWdsLoader.set_epoch

    def delete_then_set_epoch(self, epoch):
        if self.train and epoch >= 1:
            victim.unlink(missing_ok=True)
        set_epoch(self, epoch)

    monkeypatch.setattr(TorchWdsLoader, "set_epoch", delete_then_set_epoch)
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match=f"{victim}: shard missing") as info:
        train_from_overrides(tiny_run_overrides(copy, run_dir, "data.test_split="))
    assert "\n" not in str(info.value) and not victim.exists()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and victim.name in status["error"]


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_stops_on_samples_missing_from_their_shard(fundus_shards, tmp_path, workers):
    copy = _copy(fundus_shards, tmp_path)
    entry = next(s for s in load_manifest(copy)["shards"] if s["split"] == "val")
    tar = copy / entry["tar"]
    size = tar.stat().st_size
    with tarfile.open(tar) as source:  # keep only the first sample's members: the index still lists all of them
        members = source.getmembers()
        first = members[0].name.split(".")[0]
        kept = [(m, source.extractfile(m).read()) for m in members if m.name.split(".")[0] == first]
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as out:
        for member, data in kept:
            out.addfile(member, io.BytesIO(data))
    with open(tar, "ab") as out:  # zeros after the end-of-archive blocks: the same size, so the index fits it
        out.write(b"\0" * (size - tar.stat().st_size))
    loader = build_loader(LoaderConfig(batch_size=8, size=32, workers=workers), copy, "val", train=False)
    # the reader checks the tar header before each member the index lists: the second sample's is gone
    with pytest.raises(DataError, match=f"{tar}: no tar header before the member .* changed after") as info:
        list(loader)
    assert "\n" not in str(info.value)
    missing = build_loader(LoaderConfig(batch_size=8, size=32, workers=workers), copy, "val", train=False)
    tar.unlink()
    with pytest.raises(DataError, match=f"{tar}: shard missing") as info:
        list(missing)
    assert "\n" not in str(info.value)


# -- 9. read-only output folder: one line, exit 2 -----------------------------------------------------------------
@contextlib.contextmanager
def _read_only_mount(folder: Path):
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({mounted.stderr.strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_prepare_into_a_read_only_folder_is_one_line_exit_2(fundus_raw, tmp_path):
    with _read_only_mount(tmp_path / "ro") as folder:
        for out in (folder, folder / "new" / "shards"):
            with pytest.raises(DataError, match="read-only file system") as info:
                run_prepare(_prepare_cfg(fundus_raw, out))
            assert "\n" not in str(info.value) and "out=" in str(info.value)
        done = subprocess.run([sys.executable, "-m", "tltrain.cli", "prepare", "source=eyepacs",
                               f"source.root={fundus_raw}", f"out={folder / 'shards'}", "progress=false"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and "read-only file system" in done.stderr


# -- 10. problems.csv quotes cells a spreadsheet would run ----------------------------------------------------------
def test_problems_csv_quotes_formula_cells(fundus_raw, tmp_path, monkeypatch):
    raw = _copy(fundus_raw, tmp_path, "=HYPERLINK(1)")
    with open(raw / "trainLabels.csv", "a") as f:
        f.write("99999_left,2\n")  # a label row without an image: one problem, its file starts with the root
    monkeypatch.chdir(tmp_path)
    run_prepare(_prepare_cfg(Path("=HYPERLINK(1)"), tmp_path / "out", on_problem="skip"))
    with open(tmp_path / "out" / "problems.csv", newline="") as f:
        rows = list(csv.reader(f))
    # prepare records absolute paths (#25), so a relative root no longer starts a cell; a name that does is quoted
    assert rows[1][0].startswith(str(tmp_path / "=HYPERLINK(1)")) and not any(r[0].startswith("=") for r in rows[1:])
    from tltrain.data.prepare import _write_problems
    from tltrain.data.sources import Problem

    _write_problems(tmp_path / "out", [Problem("=HYPERLINK(1)/trainLabels.csv:82", "=cmd|' /C calc'!A0")])
    with open(tmp_path / "out" / "problems.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[1][0].startswith("'=HYPERLINK(1)") and rows[1][1].startswith("'=cmd")
