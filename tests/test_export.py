"""export -> load with tltrain and with plain timm -> identical outputs; predict on a folder matches evaluate."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tltrain import preprocess as P
from tltrain.errors import DataError
from tltrain.export import evaluate, export_run, load_pretrained, predict, read_metadata


@pytest.fixture(scope="module")
def package(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "fundus_resnet10t"
    export_run(trained_run, out)
    return out


def test_metadata_describes_the_model(package, fundus_shards):
    meta = read_metadata(package)
    assert meta["architecture"] == "resnet10t" and meta["num_classes"] == 5 and meta["input_size"] == [3, 32, 32]
    assert meta["preprocessing"]["recipe"] == "ben_graham" and meta["preprocessing"]["sigma_ratio"] > 0
    assert meta["preprocessing"]["filter_version"] == P.FILTER_VERSION  # the definition the weights were trained on
    assert meta["training_data"]["manifest_sha256"] and meta["metrics"]["test"]["count"] > 0
    assert meta["versions"]["torch"] == torch.__version__ and meta["license"]
    card = (package / "README.md").read_text()
    assert "How to load" in card and meta["weights"]["sha256"] in card


def test_tltrain_and_plain_timm_give_identical_outputs(package):
    model, preprocess = load_pretrained(package)
    meta = read_metadata(package)
    # pretrained=True with a local `file` overlay: timm reads the package's file, no hub download
    plain = timm.create_model("resnet10t", pretrained=True, num_classes=5,
                              pretrained_cfg_overlay=dict(file=str(package / "model.safetensors"), num_classes=5)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    from tltrain.data.synth import render_fundus

    tensor = preprocess(Image.fromarray(render_fundus(5, 2, 200)))
    assert tensor.shape == (3, 32, 32) and meta["num_outputs"] == 5


def test_export_matches_consolidated_checkpoint(trained_run, package):
    from safetensors.torch import load_file

    from tltrain.engine.checkpoint import consolidate_checkpoint

    exported = load_file(str(package / "model.safetensors"))
    best = consolidate_checkpoint(trained_run, "best")
    assert exported.keys() == best.keys() and all(torch.equal(exported[k], best[k]) for k in best)


def test_new_head_reports_matched_new_and_mismatched(package):
    model, _ = load_pretrained(package, num_classes=2)
    report = model.tltrain_load_report
    assert report.mismatched and all(k.startswith("fc.") for k, _, _ in report.mismatched)
    assert len(report.matched) > 10 and model.get_classifier().out_features == 2


def test_bad_package_inputs(package, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(package, broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (broken / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 does not match"):
        load_pretrained(broken)
    other = tmp_path / "other"
    shutil.copytree(package, other)
    meta = json.loads((other / "tltrain.json").read_text())
    meta["architecture"] = "resnet18"
    (other / "tltrain.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="do not fit resnet18"):
        load_pretrained(other)
    _, preprocess = load_pretrained(package)
    with pytest.raises(DataError, match="no fundus disc found"):
        preprocess(Image.new("RGB", (100, 80)), source="black.png")


def test_predict_on_folder_matches_evaluate_on_shards(package, fundus_shards, tmp_path):
    """The test split's images, written out as files, predicted one by one = evaluate on the shards."""
    import webdataset as wds

    manifest = json.loads((fundus_shards / "manifest.json").read_text())
    folder = tmp_path / "images"
    folder.mkdir()
    truth = {}
    for shard in manifest["shards"]:
        if shard["split"] == "test":
            for sample in wds.WebDataset(str(fundus_shards / shard["tar"]), shardshuffle=False, empty_check=False):
                (folder / f"{sample['__key__']}.jpeg").write_bytes(sample["jpg"])
                truth[sample["__key__"]] = int(sample["cls"])
    (folder / "unreadable.jpeg").write_bytes(b"not an image")
    result = predict(package, folder, tmp_path / "pred.csv", progress=False)
    assert result["predicted"] == len(truth) and result["skipped"][0]["file"].endswith("unreadable.jpeg")
    rows = list(csv.DictReader(open(tmp_path / "pred.csv")))
    predicted = np.array([int(r["predicted"]) for r in rows])
    labels = np.array([truth[r["image"].rsplit(".", 1)[0]] for r in rows])
    metrics = evaluate(package, fundus_shards, "test", batch_size=4)
    assert metrics["count"] == len(rows)
    assert metrics["accuracy"] == pytest.approx(float((predicted == labels).mean()), abs=1.0 / len(rows) + 1e-9)


def test_cli_export_evaluate_predict(trained_run, fundus_shards, tmp_path):
    tool = os.path.join(os.path.dirname(sys.executable), "tltrain")
    out = tmp_path / "pkg"
    done = subprocess.run([tool, "export", str(trained_run), str(out)], capture_output=True, text=True)
    assert done.returncode == 0 and "load_pretrained" in done.stdout
    done = subprocess.run([tool, "evaluate", str(out), str(fundus_shards)], capture_output=True, text=True)
    assert done.returncode == 0 and "kappa" in done.stdout and (out / "evaluation_test.json").exists()
    done = subprocess.run([tool, "evaluate", str(tmp_path), str(fundus_shards)], capture_output=True, text=True)
    assert done.returncode == 2 and "tltrain.json: not found" in done.stderr
