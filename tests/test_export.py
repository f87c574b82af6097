"""export -> load with tltrain and with plain timm -> identical outputs; predict on a folder matches evaluate."""
import csv
import json
import shutil
import subprocess

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import TLTRAIN
from tltrain import preprocess as P
from tltrain.errors import DataError
from tltrain.data.synth import render_fundus
from tltrain.export import evaluate, export_run, load_pretrained, predict, read_metadata, write_checksums
from tltrain.export.package_format import CARD


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
    overlay = dict(file=str(package / "model.safetensors"), num_classes=5)
    plain = timm.create_model("resnet10t", pretrained=True, num_classes=5, pretrained_cfg_overlay=overlay).eval()
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


def test_preprocess_warns_only_for_a_package_of_another_filter_version(package):
    """A package records the preprocessing definition its weights were trained on; one made before the version was
    recorded (version 1: bars at cut edges) still loads, but its preprocess says that it now applies version 2."""
    import warnings

    from tltrain.export import Preprocessing

    _, preprocess = load_pretrained(package)
    image = Image.fromarray(render_fundus(0, grade=1, width=160))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the package's own version: silent
        current = preprocess(image)
    older = {k: v for k, v in preprocess.config.items() if k != "filter_version"}
    with pytest.warns(RuntimeWarning, match="filter version 1; this tltrain applies version 2"):
        again = Preprocessing(preprocess.size, older)(image)
    assert torch.equal(current, again)  # the warning is all that differs: the current definition is applied


def test_new_head_reports_matched_new_and_mismatched(package):
    model, _ = load_pretrained(package, num_classes=2)
    report = model.tltrain_load_report
    assert report.mismatched and all(k.startswith("fc.") for k, _, _ in report.mismatched)
    assert len(report.matched) > 10 and model.get_classifier().out_features == 2


def _consistent_edit(package):
    """After an edit of tltrain.json's architecture: timm's config.json says the same and SHA256SUMS is
    recomputed, so the load gets past the package's own consistency checks to the weights check under test."""
    config = json.loads((package / "config.json").read_text())
    config["architecture"] = "resnet18"
    (package / "config.json").write_text(json.dumps(config))
    write_checksums(package)


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
    _consistent_edit(other)
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
    tool = TLTRAIN
    out = tmp_path / "pkg"
    done = subprocess.run([tool, "export", str(trained_run), str(out)], capture_output=True, text=True)
    assert done.returncode == 0 and "load_pretrained" in done.stdout
    done = subprocess.run([tool, "evaluate", str(out), str(fundus_shards)], capture_output=True, text=True)
    # written beside the shards, never inside the package (a link shipped in a package would be written through)
    assert done.returncode == 0 and "kappa" in done.stdout
    assert (fundus_shards / "evaluation_test_pkg.json").exists()
    assert (fundus_shards / "evaluation_test_pkg_predictions.csv").exists()
    assert "evaluation_test_pkg_predictions.csv" in done.stdout
    assert not list(out.glob("evaluation_*"))
    done = subprocess.run([tool, "evaluate", str(tmp_path), str(fundus_shards)], capture_output=True, text=True)
    assert done.returncode == 2 and "tltrain.json: not found" in done.stderr


# -- issue 14: the metadata is true of the exported weights --------------------------------------------------------
def test_metadata_metrics_are_the_exported_checkpoints(trained_run, package):
    meta = read_metadata(package)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    index = json.loads((trained_run / "checkpoints" / "index.json").read_text())
    checkpoint = meta["checkpoint"]
    assert checkpoint["name"] == index["best"] == metrics["best"]["checkpoint"]
    assert checkpoint["metric"] == "kappa" and "highest validation kappa" in checkpoint["chosen_by"]
    at_step = next(h["val"] for h in metrics["history"] if h["step"] == checkpoint["step"])
    assert meta["metrics"]["validation"]["kappa"] == at_step["kappa"] == metrics["best"]["val"]["kappa"]
    assert meta["metrics"]["validation"]["cross_entropy"] == at_step["cross_entropy"]
    assert metrics["test"]["checkpoint"] == checkpoint["name"]
    assert meta["metrics"]["test"]["kappa"] == metrics["test"]["kappa"]


def test_latest_export_of_another_checkpoint_has_no_foreign_test_metrics(trained_run, tmp_path):
    index = json.loads((trained_run / "checkpoints" / "index.json").read_text())
    meta = export_run(trained_run, tmp_path / "latest", which="latest", resamples=10)
    assert meta["checkpoint"]["name"] == index["latest"]
    history = json.loads((trained_run / "metrics.json").read_text())["history"]
    assert meta["metrics"]["validation"]["cross_entropy"] == history[-1]["val"]["cross_entropy"]
    if index["latest"] != index["best"]:  # the run's test metrics are the best checkpoint's, not these weights'
        assert meta["metrics"]["test"] == {} and "no test metrics of this checkpoint" in (
            tmp_path / "latest" / "README.md").read_text()


def test_model_card_gives_test_set_intervals_referable_and_choice(package, fundus_shards):
    meta = read_metadata(package)
    manifest = json.loads((fundus_shards / "manifest.json").read_text())
    test_set = meta["metrics"]["test_set"]
    assert test_set["count"] == manifest["splits"]["test"]["count"]
    assert test_set["class_counts"] == manifest["splits"]["test"]["class_counts"]
    ci = meta["metrics"]["test_ci"]
    assert ci["resamples"] == 1000 and "stratified" in ci["method"]
    for name in ("kappa", "auc", "sensitivity", "specificity", "referable_auc"):
        assert ci[name]["low"] <= ci[name]["value"] <= ci[name]["high"], name
        assert ci[name]["value"] == pytest.approx(meta["metrics"]["test"][name])
    card = (package / "README.md").read_text()
    assert f"{test_set['count']} images" in card and "grade >= 2" in card and "1000 resamples" in card
    assert meta["checkpoint"]["name"] in card and "highest validation kappa" in card
    assert f"{ci['kappa']['value']:.3f} ({ci['kappa']['low']:.3f} to {ci['kappa']['high']:.3f})" in card


def test_timm_local_dir_loads_package_with_identical_outputs(package):
    from timm.data import resolve_data_config

    model, _ = load_pretrained(package)
    plain = timm.create_model(f"local-dir:{package}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    data = resolve_data_config(model=plain)
    meta = read_metadata(package)
    assert tuple(data["input_size"]) == (3, 32, 32) and data["crop_pct"] == 1.0
    assert data["interpolation"] == "bilinear" and list(data["mean"]) == meta["preprocessing"]["mean"]
    assert plain.pretrained_cfg["label_names"] == meta["class_names"]
    config = json.loads((package / "config.json").read_text())
    assert config["tltrain_preprocessing"]["sigma_ratio"] == meta["preprocessing"]["sigma_ratio"]


def test_relative_shards_run_exports_from_another_directory(fundus_shards, tmp_path, monkeypatch):
    """A run started with relative paths records them absolute; export from elsewhere gives the full package."""
    from conftest import tiny_run_overrides
    from tltrain.train_app import train_from_overrides

    monkeypatch.chdir(fundus_shards.parent)
    result = train_from_overrides(tiny_run_overrides(fundus_shards.name, "rel_run", "schedule.epochs_per_phase=1",
                                                     "data.test_split="))
    assert result["status"] == "completed"
    run_dir = fundus_shards.parent / "rel_run"
    config = (run_dir / "config.yaml").read_text()
    assert f"shards: {fundus_shards}" in config and f"run_dir: {run_dir}" in config
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([TLTRAIN, "export", str(run_dir), "pkg"], cwd=elsewhere, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    meta = read_metadata(elsewhere / "pkg")
    assert meta["num_classes"] == 5 and meta["training_data"]["manifest_sha256"]
    assert meta["training_data"]["splits"]["test"]["count"] > 0
    assert meta["metrics"]["test"] == {} and meta["metrics"]["validation"]["count"] > 0  # no test split was run
    card = (elsewhere / "pkg" / CARD).read_text()
    assert "the run had no test split" in card and "tested another one" not in card

    # an older run that recorded a relative path: refused from elsewhere with a way out, fine with --shards
    (run_dir / "config.yaml").write_text(config.replace(f"shards: {fundus_shards}", f"shards: {fundus_shards.name}"))
    done = subprocess.run([TLTRAIN, "export", str(run_dir), "pkg2"], cwd=elsewhere, capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1 and "--shards" in done.stderr
    done = subprocess.run([TLTRAIN, "export", str(run_dir), "pkg2", "--shards", str(fundus_shards)], cwd=elsewhere,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_export_refuses_when_classes_and_head_disagree(trained_run, fundus_shards, tmp_path):
    manifest = json.loads((fundus_shards / "manifest.json").read_text())
    cases = {"more_classes": {**manifest, "num_classes": 6, "classes": manifest["classes"] + ["5"],
                              "class_names": manifest["class_names"] + ["extra"]},
             "names_short": {**manifest, "class_names": manifest["class_names"][:4]}}
    for name, content in cases.items():
        shards = tmp_path / name
        shards.mkdir()
        (shards / "manifest.json").write_text(json.dumps(content))
        done = subprocess.run([TLTRAIN, "export", str(trained_run), str(tmp_path / f"pkg_{name}"), "--shards",
                               str(shards)], capture_output=True, text=True)
        assert done.returncode == 2, (name, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "fc.weight has shape [5, 512]" in done.stderr
        assert not (tmp_path / f"pkg_{name}").exists()


def test_mismatched_weights_error_lists_keys_and_shapes(package, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(package, other)
    meta = json.loads((other / "tltrain.json").read_text())
    meta["architecture"] = "resnet18"
    (other / "tltrain.json").write_text(json.dumps(meta))
    _consistent_edit(other)
    with pytest.raises(DataError) as error:
        load_pretrained(other)
    message = str(error.value)
    assert "\n" not in message and "shape mismatches" in message
    assert "layer2.0.downsample.1.weight: file [128, 64, 1, 1] vs model [128]" in message
    assert "missing from the file: conv1.weight" in message and "59 more" in message


def test_evaluate_writes_per_image_predictions(trained_run, package, fundus_shards, tmp_path):
    from tltrain.metrics import read_predictions_csv

    metrics = evaluate(package, fundus_shards, "test", batch_size=4, out=tmp_path / "eval.json")
    keys, labels, probs = read_predictions_csv(tmp_path / "eval_predictions.csv")
    assert metrics["predictions"] == str(tmp_path / "eval_predictions.csv") and len(keys) == metrics["count"]
    assert probs.shape == (metrics["count"], 5) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    # the same weights and preprocessing as the run's own test pass: the same predictions per image
    run_keys, run_labels, run_probs = read_predictions_csv(trained_run / "predictions_test.csv")
    order = {k: i for i, k in enumerate(run_keys)}
    index = [order[k] for k in keys]
    assert sorted(keys) == sorted(run_keys) and np.array_equal(labels, run_labels[index])
    assert np.allclose(probs, run_probs[index], atol=1e-5)


def test_tensorboard_hparams_are_best_validation_and_test(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(trained_run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for tag, expected in (("hparam/test/kappa", metrics["test"]["kappa"]),
                          ("hparam/test/accuracy", metrics["test"]["accuracy"]),
                          ("hparam/best_val/kappa", metrics["best"]["val"]["kappa"]),
                          ("hparam/best_val/cross_entropy", metrics["best"]["val"]["cross_entropy"])):
        assert events.Scalars(tag)[-1].value == pytest.approx(expected, abs=1e-6), tag
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    names = {m.name.tag for m in experiment.metric_infos}
    assert {"hparam/test/kappa", "hparam/best_val/kappa"} <= names
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert session.session_start_info.hparams["schedule"].string_value == "finetune_all"


def test_non_five_class_run_with_referable_threshold_exports_its_referable_metrics(target_shards, tmp_path):
    """export follows the run's own referable rule (metrics.referable_threshold_for): a 2-class run with
    trainer.referable_threshold=1 reported referable metrics while training, and its package recorded none."""
    from conftest import tiny_run_overrides
    from tltrain.train_app import train_from_overrides

    run_dir = tmp_path / "run"
    result = train_from_overrides(tiny_run_overrides(target_shards, run_dir, "schedule.epochs_per_phase=1",
                                                     "trainer.referable_threshold=1"))
    assert result["status"] == "completed"
    trained = json.loads((run_dir / "metrics.json").read_text())
    assert "sensitivity" in trained["test"]
    meta = export_run(run_dir, tmp_path / "pkg")
    assert meta["num_classes"] == 2 and meta["referable_threshold"] == 1
    assert "referable sensitivity" in (tmp_path / "pkg" / "README.md").read_text()
