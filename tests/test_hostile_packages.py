"""Pretrained packages and weight files from someone else (issue 23): what export publishes, what load refuses.

Each test crafts its hostile file in tmp_path and proves the fault gone by a byte comparison, a marker (a secret,
a victim file), a memory bound or a one-line refusal."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TLTRAIN
from tltrain.errors import ConfigError, DataError
from tltrain.export import evaluate, export_run, load_pretrained, predict, read_metadata, write_checksums

SECRET = "tltrain-test-secret-4f1c9a"


def _run(*args, cwd=None, env=None):
    return subprocess.run([TLTRAIN, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=300)


def _one_line(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, (done.returncode, done.stderr[-2000:])
    return lines[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def package(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile_pkg") / "pkg"
    export_run(trained_run, out, resamples=10)
    return out


@pytest.fixture
def copy(package, tmp_path):
    """A private copy of the package to edit."""
    target = tmp_path / "copy"
    shutil.copytree(package, target)
    return target


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1))


def _refused(folder, match, error=DataError, **kwargs):
    with pytest.raises(error, match=match) as info:
        load_pretrained(folder, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# -- 1. a shared config.yaml is not resolved into the package -------------------------------------------------------
@pytest.mark.parametrize("variable", ["TLTRAIN_TEST_SECRET", "HOME"])
def test_env_interpolation_in_shared_config_is_never_published(trained_run, tmp_path, variable):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = (run / "config.yaml").read_text()
    assert "${" not in config  # a run writes its config resolved
    edited, count = re.subn(r"(?m)^(data:\n(?:  .*\n)*?  name: ).*$", rf"\g<1>${{oc.env:{variable}}}", config, 1)
    assert count == 1
    (run / "config.yaml").write_text(edited)
    out = tmp_path / "published"
    done = _run("export", run, out, env={variable: SECRET})
    line = _one_line(done)
    assert "data.name holds an unresolved interpolation" in line and SECRET not in done.stderr + done.stdout
    published = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(run)]
    assert not out.exists() and all(SECRET.encode() not in p.read_bytes() for p in published)


@pytest.mark.parametrize("line, replacement, match", [
    ("  size: 32", "  size: 30000", r"preprocessing: size must be a whole number in \[8, 4096\], not 30000"),
    ("  arch: resnet10t", "  arch: os.system", "model.arch 'os.system' is not a timm model"),
])
def test_export_refuses_config_values_a_load_would_refuse(trained_run, tmp_path, line, replacement, match):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = (run / "config.yaml").read_text()
    assert config.count(f"\n{line}\n") == 1
    (run / "config.yaml").write_text(config.replace(f"\n{line}\n", f"\n{replacement}\n"))
    with pytest.raises((DataError, ConfigError), match=match) as info:
        export_run(run, tmp_path / "pkg", resamples=10)
    assert "\n" not in str(info.value) and not (tmp_path / "pkg").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left either


# -- 2. every file that changes what is loaded is checksummed; every value validated --------------------------------
def test_package_digest_is_sha256_of_checksums_and_can_be_required(package):
    digest = hashlib.sha256((package / "SHA256SUMS").read_bytes()).hexdigest()
    listed = (package / "SHA256SUMS").read_text().split()
    assert listed[1::2] == ["config.json", "model.safetensors", "tltrain.json"]
    model, _ = load_pretrained(package, digest=digest)
    assert model.tltrain_package_digest == digest
    _refused(package, "is not the expected", digest="0" * 64)
    line = _one_line(_run("predict", package, package, "--digest", "0" * 64))
    assert "is not the expected" in line


def test_edited_preprocessing_in_metadata_is_refused(copy):
    _edit_json(copy / "tltrain.json", lambda m: m["preprocessing"].update(gain=40.0))
    _refused(copy, r"tltrain.json: sha256 does not match SHA256SUMS")


def test_model_args_in_timm_config_are_refused_even_when_resealed(copy):
    import timm

    _edit_json(copy / "config.json", lambda c: c.update(model_args={"act_layer": "tanh"}))
    built = timm.create_model(f"local-dir:{copy}", pretrained=True)  # what plain timm does with it: a Tanh model
    assert any(type(m).__name__ == "Tanh" for m in built.modules())
    _refused(copy, r"config.json: sha256 does not match SHA256SUMS")
    write_checksums(copy)  # a publisher who recomputes the checksums
    _refused(copy, r"config.json: model_args \{'act_layer': 'tanh'\} differs from what tltrain.json describes")


@pytest.mark.parametrize("change, match", [
    (lambda m: m["weights"].update(file="../../victim.safetensors"), "weights.file '../../victim.safetensors' is not"),
    (lambda m: m["weights"].update(file="/etc/passwd"), "weights.file '/etc/passwd' is not a valid name"),
    (lambda m: m.update(num_outputs=1_000_000, num_classes=1_000_000), r"num_classes must be a whole number in"),
    (lambda m: m["preprocessing"].update(size=30000), r"preprocessing: size must be a whole number in \[8, 4096\]"),
    (lambda m: m["preprocessing"].update(sigma_ratio=float("nan")), r"preprocessing: sigma_ratio must be a number"),
    (lambda m: m["preprocessing"].update(std=[0.2, 0.2]), r"std must be a list of 3 numbers"),
    (lambda m: m.update(num_outputs=3), r"num_outputs=3 does not fit num_classes=5"),
    (lambda m: m.update(class_names=["x" * 10_000] * 5), r"class_names must be a list of 5 names"),
])
def test_resealed_metadata_values_are_validated_before_a_model_is_built(copy, change, match):
    _edit_json(copy / "tltrain.json", change)
    write_checksums(copy)
    _refused(copy, match)


def test_unknown_architecture_is_one_line(copy):
    _edit_json(copy / "tltrain.json", lambda m: m.update(architecture="os.system"))
    write_checksums(copy)
    _refused(copy, "architecture 'os.system' is not a timm model", ConfigError)


def test_checksum_file_must_list_what_changes_loading(copy):
    sums = copy / "SHA256SUMS"
    sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if "config.json" not in line))
    _refused(copy, "SHA256SUMS: does not list config.json")
    sums.write_text(f"{'0' * 64}  ../outside\n")
    _refused(copy, "file '../outside' is not a valid name")


def test_package_as_model_weights_is_verified(copy):
    from tltrain.models import create_model

    assert create_model("resnet10t", 5, weights=str(copy)).tltrain_load_report.matched
    _edit_json(copy / "tltrain.json", lambda m: m["preprocessing"].update(gain=40.0))
    for weights in (copy, copy / "model.safetensors"):  # the folder, or its weights file named directly
        with pytest.raises(DataError, match="tltrain.json: sha256 does not match SHA256SUMS"):
            create_model("resnet10t", 5, weights=str(weights))


def test_package_without_checksums_loads_with_a_warning(copy):
    (copy / "SHA256SUMS").unlink()
    with pytest.warns(RuntimeWarning, match="no SHA256SUMS"):
        model, _ = load_pretrained(copy)
    assert model.tltrain_package_digest is None


def test_cli_refuses_an_edited_package_in_one_line(copy, fundus_shards, tmp_path):
    _edit_json(copy / "tltrain.json", lambda m: m["preprocessing"].update(gain=40.0))
    line = _one_line(_run("evaluate", copy, fundus_shards, "--out", tmp_path / "e.json"))
    assert "sha256 does not match SHA256SUMS" in line and not (tmp_path / "e.json").exists()


def test_metadata_that_is_not_a_regular_file_is_refused(copy):
    (copy / "tltrain.json").unlink()
    (copy / "tltrain.json").symlink_to("/dev/zero")
    with pytest.raises(DataError, match="not a regular file"):
        read_metadata(copy)


# -- 3. export is atomic and deterministic --------------------------------------------------------------------------
def test_two_exports_of_one_checkpoint_are_byte_identical(trained_run, tmp_path):
    first, second = tmp_path / "a" / "pkg", tmp_path / "b" / "pkg"
    digest = export_run(trained_run, first, resamples=10)["digest"]
    export_run(trained_run, second, resamples=10)
    assert _files(first) == _files(second)
    assert digest == hashlib.sha256((first / "SHA256SUMS").read_bytes()).hexdigest()
    card = (first / "README.md").read_text()
    assert str(tmp_path) not in card and 'load_pretrained("pkg")' in card  # the folder's name, not a local path
    from safetensors import safe_open

    with safe_open(str(first / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_existing_package_is_kept_without_force_and_replaced_whole_with_it(trained_run, package, tmp_path):
    target = tmp_path / "pkg"
    shutil.copytree(package, target)
    (target / "stale_weights.pth").write_bytes(b"stale")
    before = _files(target)
    line = _one_line(_run("export", trained_run, target))
    assert "already holds a package; pass --force" in line and _files(target) == before
    done = _run("export", trained_run, target, "--force")
    assert done.returncode == 0, done.stderr
    assert "package digest" in done.stdout
    assert sorted(_files(target)) == ["README.md", "SHA256SUMS", "config.json", "layercam.png", "model.safetensors",
                                      "tltrain.json"]  # layercam.png: the card's LayerCAM picture
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # no temporary or moved-aside folder left


def test_force_never_replaces_a_folder_that_is_not_a_package(trained_run, tmp_path):
    target = tmp_path / "home"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    with pytest.raises(DataError, match="is not a tltrain package"):
        export_run(trained_run, target, force=True, resamples=10)
    assert (target / "thesis.tex").read_text() == "years of work"


KILLED_EXPORT = """
import os, signal, sys
import tltrain.export.package as export

write = export.write_new_file
def dying(path, data):
    if path.name == "README.md":  # weights and metadata written: the worst moment
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, data)
export.write_new_file = dying
export.export_run(sys.argv[1], sys.argv[2], resamples=10, force=True)
"""


def test_a_killed_export_leaves_the_old_package_and_a_temp_folder_the_next_removes(trained_run, package, tmp_path):
    target = tmp_path / "pkg"
    shutil.copytree(package, target)
    before = _files(target)
    done = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(trained_run), str(target)], capture_output=True,
                          timeout=300)
    assert done.returncode == -9
    assert _files(target) == before
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".pkg.export-")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()
    export_run(trained_run, target, force=True, resamples=10)
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
    load_pretrained(target)


# -- 4. evaluate and predict write where they are told, and safely --------------------------------------------------
def test_evaluate_default_output_is_beside_the_shards_not_in_the_package(copy, fundus_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(fundus_shards, shards)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (copy / "evaluation_test.json").symlink_to(victim)  # shipped in the package
    done = _run("evaluate", copy, shards)
    assert done.returncode == 0, done.stderr
    assert victim.read_text() == "precious"
    assert (shards / "evaluation_test_copy.json").is_file()
    assert (shards / "evaluation_test_copy_predictions.csv").is_file()
    assert sorted(p.name for p in copy.iterdir()) == ["README.md", "SHA256SUMS", "config.json",
                                                      "evaluation_test.json", "layercam.png", "model.safetensors",
                                                      "tltrain.json"]
    out = tmp_path / "out.json"
    out.symlink_to(victim)  # --out through a symlink: the link is replaced, not followed
    evaluate(copy, shards, out=out, batch_size=8)
    assert victim.read_text() == "precious" and not out.is_symlink()


def test_predict_creates_the_output_folder_and_quotes_formula_names(package, fundus_raw, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    source = sorted(p for p in Path(fundus_raw).rglob("*.jpeg"))[0]
    shutil.copy(source, images / "=HYPERLINK(evil).jpeg")
    shutil.copy(source, images / "plain.jpeg")
    out = tmp_path / "new" / "deeper" / "predictions.csv"
    done = _run("predict", package, images, "--out", out)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(out)))
    assert sorted(r["image"] for r in rows) == ["'=HYPERLINK(evil).jpeg", "plain.jpeg"]


def test_predict_lists_an_image_over_the_pixel_limit_as_skipped(package, fundus_raw, tmp_path, monkeypatch):
    from PIL import Image

    from tltrain.data import decode

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(sorted(Path(fundus_raw).rglob("*.jpeg"))[0], images / "ok.jpeg")
    Image.new("RGB", (400, 400)).save(images / "huge.png")
    monkeypatch.setattr(decode, "MAX_PIXELS", 100_000)  # 400 x 400 is over it; the fundus photo is not
    result = predict(package, images, tmp_path / "p.csv", progress=False)
    assert result["predicted"] == 1 and [Path(s["file"]).name for s in result["skipped"]] == ["huge.png"]
    assert "limit" in result["skipped"][0]["reason"]


# -- 5. bounded work for any weight file ----------------------------------------------------------------------------
RSS_PROBE = """
import resource, sys
from tltrain.cli import main
import torch, safetensors.torch, timm, tltrain.models, tltrain.engine.checkpoint  # imported before the first measure
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = main(sys.argv[1:])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RSS", code, before, after)
"""


def _rss_of_cli(*args) -> tuple[int, int, str]:
    """(exit code, peak RSS growth in KB, stderr) of `tltrain ARGS` in a fresh process."""
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    line = next(text for text in done.stdout.splitlines() if text.startswith("RSS"))
    _, code, before, after = line.split()
    return int(code), int(after) - int(before), done.stderr


def test_expanded_tensor_pth_is_refused_before_it_is_materialised(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save({"weight": torch.zeros(1).expand(1_000_000, 1_000_000)}, path)  # 4 TB as float32
    assert path.stat().st_size < 2000
    code, grown_kb, stderr = _rss_of_cli("convert-weights", path, tmp_path / "out.safetensors")
    assert code == 2 and "an expanded tensor" in stderr and len(stderr.strip().splitlines()) == 1
    assert grown_kb < 50_000 and not (tmp_path / "out.safetensors").exists()  # 4 TB before the fix


def test_overlapping_strides_are_refused(tmp_path):
    from tltrain.models import read_state_dict

    path = tmp_path / "overlap.pth"
    torch.save({"weight": torch.zeros(8191).as_strided((4096, 4096), (1, 1))}, path)
    with pytest.raises(DataError, match="overlapping strides"):
        read_state_dict(path)


def test_hidden_expanded_array_in_checkpoint_state_is_refused(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    index = json.loads((run / "checkpoints" / "index.json").read_text())
    checkpoint = next(p for p in (run / "checkpoints").iterdir() if p.name.startswith(index["best"]))
    content = torch.load(checkpoint, weights_only=True)
    content.setdefault("trainer", {})["rng_hidden"] = torch.zeros(1, dtype=torch.uint8).expand(4 << 30)
    torch.save(content, checkpoint)
    with pytest.raises(DataError, match="an expanded tensor"):
        export_run(run, tmp_path / "pkg", resamples=10)
    assert not (tmp_path / "pkg").exists()


def _safetensors_with_header(path: Path, header: bytes, declared: int | None = None) -> None:
    with open(path, "wb") as handle:
        handle.write((declared if declared is not None else len(header)).to_bytes(8, "little"))
        handle.write(header)


def test_oversized_safetensors_header_is_refused_by_its_length(tmp_path):
    path = tmp_path / "huge_header.safetensors"
    _safetensors_with_header(path, b" " * (80 << 20))  # an 80 MB header, as in the issue
    code, grown_kb, stderr = _rss_of_cli("convert-weights", path, tmp_path / "out.safetensors")
    assert code == 2 and "over the 16,777,216-byte limit" in stderr and len(stderr.strip().splitlines()) == 1
    assert grown_kb < 20_000  # the 80 MB header is never read


def test_safetensors_header_with_too_many_entries_is_refused(tmp_path):
    from tltrain.models import read_state_dict

    entries = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(120_000)}
    path = tmp_path / "many.safetensors"
    _safetensors_with_header(path, json.dumps(entries).encode())
    with pytest.raises(DataError, match="120,000 entries, over the 100,000 limit"):
        read_state_dict(path)


def test_safetensors_entry_declaring_more_than_it_holds_is_refused(tmp_path):
    from tltrain.models import read_state_dict

    header = json.dumps({"w": {"dtype": "F32", "shape": [100_000, 100_000], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "liar.safetensors"
    _safetensors_with_header(path, header + b"\0" * 4, declared=len(header))
    with pytest.raises(DataError, match=r"declares more than|needs 40,000,000,000 bytes"):
        read_state_dict(path)


def test_evaluate_with_no_readable_sample_is_one_line(package, fundus_shards, tmp_path):
    """Every test image damaged in place (same sizes, so the index still fits): one line, not KeyError 'confusion'."""
    from tltrain.data.manifest import load_manifest
    from tltrain.data.shards import read_index
    from tltrain.export import evaluate

    shards = tmp_path / "shards"
    shutil.copytree(fundus_shards, shards)
    for entry in load_manifest(shards)["shards"]:
        if entry["split"] != "test":
            continue
        with open(shards / entry["tar"], "r+b") as tar:
            for sample in read_index(shards / entry["index"]):
                for ext, (offset, size, _name) in sample.items():
                    if ext in ("jpg", "png"):
                        tar.seek(offset)
                        tar.write(b"\0" * size)
    with pytest.raises(DataError, match="no sample could be read"):
        evaluate(package, shards, "test", batch_size=4)
