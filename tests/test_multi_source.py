"""Several sources in one dataset: `tltrain prepare 'sources=[eyepacs,aptos2019,messidor2]' ...` on mini-copies of
the three downloads. Checked: every sample's source in its .json and the manifest's counts, keys and patients that
never meet across sources, EyePACS' official test split kept while the others are carved by patient, splits
stratified by source, byte-identical copies found across sources (computed here independently) and left out, label
sets mapped onto one (or refused in one line), and the refusals of a wrong command."""
import hashlib
import json
import shutil
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tltrain.cli import main as cli_main
from tltrain.config import compose_prepare, to_typed
from tltrain.data.prepare import PrepareConfig, run_prepare
from tltrain.data.shards import iter_tar_samples
from tltrain.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_layout_eyepacs_aptos import _make_aptos, _make_eyepacs  # noqa: E402
from test_layout_messidor2_idrid import _make_messidor2  # noqa: E402

SOURCES = ("eyepacs", "aptos2019", "messidor2")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    """The three mini-copies, plus one EyePACS photo copied into APTOS under a new id with another grade (the
    cross-source duplicate a user would not see). The mini-copies' generator also draws some identical images."""
    base = tmp_path_factory.mktemp("downloads")
    _make_eyepacs(base / "eyepacs", with_test=True, with_solution=True)
    _make_aptos(base / "aptos")
    _make_messidor2(base / "messidor2")
    shutil.copy(base / "eyepacs" / "train" / "13_left.jpeg", base / "aptos" / "train_images" / "ffff00001111.jpeg")
    with open(base / "aptos" / "train.csv", "a") as f:
        f.write("ffff00001111,4\n")
    return base


def _overrides(base: Path, out: Path, *more: str) -> list[str]:
    return ["sources=[eyepacs,aptos2019,messidor2]", f"sources.eyepacs.root={base / 'eyepacs'}",
            f"sources.aptos2019.root={base / 'aptos'}", f"sources.messidor2.root={base / 'messidor2'}",
            f"out={out}", "workers=1", "progress=false", "shard_samples=16", *more]


def _prepare(base: Path, out: Path, *more: str) -> dict:
    return run_prepare(to_typed(compose_prepare(_overrides(base, out, *more)), PrepareConfig, where="prepare"))


def _samples(out: Path) -> list[tuple[str, dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    return [(shard["split"], json.loads(sample["json"]))
            for shard in manifest["shards"] for sample in iter_tar_samples(out / shard["tar"])]


@pytest.fixture(scope="module")
def combined(downloads, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("combined") / "fundus3"
    return _prepare(downloads, out), out


def test_every_sample_names_its_source_and_the_manifest_counts_them(combined):
    manifest, out = combined
    samples = _samples(out)
    by_source = Counter(meta["dataset"] for _, meta in samples)
    assert set(by_source) == set(SOURCES) and list(manifest["sources"]) == list(SOURCES)
    for name in SOURCES:
        info = manifest["sources"][name]
        assert info["written"] == by_source[name] == sum(info["splits"].values()) == sum(info["class_counts"])
        assert sum(manifest["splits"][split]["sources"][name] for split in manifest["splits"]) == by_source[name]
    for _, meta in samples:
        assert meta["key"].startswith(f"{meta['dataset']}-") and meta["patient"].startswith(f"{meta['dataset']}:")
    assert manifest["sources"]["messidor2"]["ungradable"] == manifest["ungradable"]["count"] == 2
    assert manifest["source"]["kind"] == "multi" and set(manifest["source"]["sources"]) == set(SOURCES)


def test_official_splits_are_kept_per_source_and_others_carved_by_patient(combined):
    manifest, out = combined
    samples = _samples(out)
    split_of_patient: dict[str, str] = {}
    for split, meta in samples:
        assert split_of_patient.setdefault(meta["patient"], split) == split, f"{meta['patient']} in two splits"
    eyepacs_test = {meta["name"] for split, meta in samples if meta["dataset"] == "eyepacs" and split == "test"}
    assert eyepacs_test and all(meta.get("usage") or meta.get("Usage") for split, meta in samples
                                if meta["dataset"] == "eyepacs" and split == "test")
    assert all(name.split("_")[0] in {"1", "2", "3", "4", "5", "6", "7", "8", "9", "11"} for name in eyepacs_test)
    origins = manifest["split_origin"]["sources"]
    assert origins["eyepacs"]["test"].startswith("official") and origins["eyepacs"]["val"].startswith("carved")
    assert origins["aptos2019"]["test"].startswith("patient-level")
    # stratified by source: every source has samples in every split (APTOS and Messidor-2 get their own test)
    for split in ("train", "val", "test"):
        assert all(manifest["splits"][split]["sources"][name] > 0 for name in SOURCES), split


def test_byte_identical_copies_across_sources_are_found_and_left_out(combined, downloads):
    manifest, out = combined
    by_digest = defaultdict(list)
    for folder in ("eyepacs/train", "eyepacs/test", "aptos/train_images", "messidor2/IMAGES"):
        for path in sorted((downloads / folder).iterdir()):
            by_digest[hashlib.sha256(path.read_bytes()).hexdigest()].append(path)
    expected = sum(len(paths) - 1 for paths in by_digest.values())
    assert expected >= 2  # at least the planted copy and one the generator drew
    duplicates = manifest["duplicates"]
    assert duplicates["count"] == duplicates["left_out"] == expected
    planted = next(d for d in duplicates["samples"] if d["file"].endswith("ffff00001111.jpeg"))
    assert planted["same_as"].endswith("eyepacs/train/13_left.jpeg") and planted["same_as_dataset"] == "eyepacs"
    assert planted["label"] == "4" and not planted["agree"] and not planted["kept"]
    written = Counter(hashlib.sha256(Path(meta["source"]).read_bytes()).hexdigest() for _, meta in _samples(out))
    assert max(written.values()) == 1  # no photograph written twice
    assert sum(info["duplicates_left_out"] for info in manifest["sources"].values()) == expected


def test_nested_fractions_keep_every_source(combined):
    manifest, out = combined
    smallest = min(manifest["fractions"], key=float)
    names = set(manifest["fractions"][smallest]["shards"])
    sources = {meta["dataset"] for shard in manifest["shards"] if shard["name"] in names
               for meta in (json.loads(s["json"]) for s in iter_tar_samples(out / shard["tar"]))}
    assert sources == set(SOURCES)


def test_label_sets_are_mapped_onto_one_or_refused_in_one_line(downloads, tmp_path):
    with pytest.raises(ConfigError, match=r"sources\.messidor2: its classes 0 \(no DME\), 1 \(DME\) are not the "
                                          r"dataset's .*give sources\.messidor2\.label_map"):
        _prepare(downloads, tmp_path / "x", "sources.messidor2.label_set=dme")
    with pytest.raises(ConfigError, match=r"sources\.eyepacs\.label_map: no mapping for its class\(es\) 4"):
        _prepare(downloads, tmp_path / "x", "classes=[0,1]", "sources.eyepacs.label_map={0:0,1:0,2:1,3:1}")
    referable = "{0:0,1:0,2:1,3:1,4:1}"
    manifest = _prepare(downloads, tmp_path / "referable", "classes=[0,1]", f"sources.eyepacs.label_map={referable}",
                        f"sources.aptos2019.label_map={referable}", "sources.messidor2.label_set=dme",
                        "sources.messidor2.label_map={0:0,1:null}")
    assert manifest["classes"] == ["0", "1"] and manifest["num_classes"] == 2
    for split, meta in _samples(tmp_path / "referable"):
        assert meta["label"] == (1 if meta["dataset"] != "messidor2" and int(meta["grade_name"]) >= 1 else 0) or \
            meta["dataset"] == "messidor2"
    left_out = manifest["sources"]["messidor2"]["left_out"]
    assert left_out == manifest["left_out"]["count"] > 0
    assert all("mapped to null by sources.messidor2.label_map" in p["reason"] for p in manifest["left_out"]["samples"])
    assert all(meta["label"] == 0 for _, meta in _samples(tmp_path / "referable") if meta["dataset"] == "messidor2")


def test_wrong_commands_are_one_line_before_any_image_is_read(downloads, tmp_path):
    with pytest.raises(ConfigError, match=r"sources\.aptos2019\.root is required"):
        to_typed(compose_prepare(["sources=[eyepacs,aptos2019]", f"sources.eyepacs.root={downloads}",
                                  f"out={tmp_path}"]), PrepareConfig, where="prepare")
    with pytest.raises(ConfigError, match="give one source .* or several .* not both"):
        compose_prepare(["sources=[eyepacs]", f"sources.eyepacs.root={downloads}", f"source.root={downloads}",
                         f"out={tmp_path}"])
    with pytest.raises(ConfigError, match="a source name is 1-24 letters"):
        run_prepare(to_typed(compose_prepare([f"+sources.my-set={{kind: aptos2019, root: {downloads / 'aptos'}}}",
                                              f"out={tmp_path / 'y'}"]), PrepareConfig, where="prepare"))
    assert not (tmp_path / "y").exists()


def test_a_source_of_any_kind_joins_by_its_own_name(downloads, tmp_path, capsys):
    """`+sources.<name>={...}`: a source the configs/sources/ group does not name (here a second APTOS copy as
    kind csv), from the command line, in one command; the summary prints a line per source."""
    code = cli_main(["prepare", "sources=[aptos2019]", f"sources.aptos2019.root={downloads / 'aptos'}",
                     f"+sources.local={{kind: csv, root: {downloads / 'aptos'}, labels_csv: train.csv, "
                     "image_dir: train_images, key_column: id_code, label_column: diagnosis}",
                     "duplicates=keep", f"out={tmp_path / 'out'}", "workers=1", "progress=false"])
    assert code in (0, None)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["sources"]["local"]["written"] == manifest["sources"]["aptos2019"]["written"] == 21
    assert manifest["duplicates"]["count"] == 21 and manifest["duplicates"]["left_out"] == 0
    printed = capsys.readouterr().out
    assert "aptos2019" in printed and "local" in printed and "byte-identical copies: 21" in printed


def test_evaluate_gives_test_metrics_per_source_of_the_three_downloads(combined, trained_run, tmp_path, capsys):
    """The acceptance of issue 25: a package (here the session's tiny run on the synthetic set) scored on the
    official and carved test splits of EyePACS + APTOS 2019 + Messidor-2 prepared as one dataset."""
    manifest, out = combined
    assert cli_main(["export", str(trained_run), str(tmp_path / "pkg")]) in (0, None)
    assert cli_main(["evaluate", str(tmp_path / "pkg"), str(out), "--out", str(tmp_path / "eval.json"),
                     "--resamples", "200"]) in (0, None)
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    per_source = evaluation["per_source"]
    assert list(per_source) == sorted(SOURCES)
    for name in SOURCES:
        assert per_source[name]["count"] == manifest["splits"]["test"]["sources"][name]
        ci = per_source[name]["ci"]  # each source's own 95 % interval (the pipeline's card shows them)
        assert ci["resamples"] == 200 and ci["auc"]["low"] <= per_source[name]["auc"] <= ci["auc"]["high"]
    assert evaluation["count"] == manifest["splits"]["test"]["count"]
    printed = capsys.readouterr().out
    assert "per source:" in printed and all(name in printed for name in SOURCES)
