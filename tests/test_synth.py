"""The synthetic fundus set: layout, determinism, class mix, fundus look, and a learnable grade signal."""
import csv
import hashlib

import numpy as np
from PIL import Image

from tltrain.data.synth import EYEPACS_CLASS_MIX, generate_eyepacs, generate_target_domain, render_fundus


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.jp*g"))}


def test_layout_and_labels(fundus_raw):
    rows = list(csv.DictReader(open(fundus_raw / "trainLabels.csv")))
    assert rows and set(rows[0]) == {"image", "level"}
    files = {p.stem for p in (fundus_raw / "train").glob("*.jpeg")}
    assert {r["image"] for r in rows} == files
    assert all(r["image"].endswith(("_left", "_right")) and r["level"] in "01234" for r in rows)
    counts = np.bincount([int(r["level"]) for r in rows], minlength=5)
    assert counts.min() >= 6  # min_per_class honoured


def test_deterministic_across_worker_counts(tmp_path):
    generate_eyepacs(tmp_path / "a", n_patients=6, width=96, seed=11, workers=1, progress=False)
    generate_eyepacs(tmp_path / "b", n_patients=6, width=96, seed=11, workers=2, progress=False)
    generate_eyepacs(tmp_path / "c", n_patients=6, width=96, seed=12, workers=1, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_class_mix_follows_eyepacs(tmp_path):
    summary = generate_eyepacs(tmp_path, n_patients=300, width=32, seed=0, progress=False)
    share = np.array(list(summary["per_grade"].values())) / summary["images"]
    assert abs(share[0] - EYEPACS_CLASS_MIX[0]) < 0.06  # 600 eyes: a few points of sampling noise
    assert share[0] > share[2] > share[4]


def test_fundus_look_black_surround_bright_disc():
    img = render_fundus(1, 0, 256).astype(float)
    corners = np.concatenate([img[:8, :8], img[:8, -8:], img[-8:, :8], img[-8:, -8:]]).mean()
    centre = img[96:160, 96:160].mean()
    assert corners < 10 and centre > 60


def _lesion_pixels(img):
    r, g, b = img[..., 0].astype(int), img[..., 1].astype(int), img[..., 2].astype(int)
    dark_red = (r > 60) & (g < 35) & (r > 3 * g)
    yellow = (r > 180) & (g > 160) & (b < 150)
    return int(dark_red.sum() + yellow.sum())


def test_lesions_grow_with_grade():
    grade0 = np.mean([_lesion_pixels(render_fundus(s, 0, 256)) for s in range(8)])
    grade3 = np.mean([_lesion_pixels(render_fundus(s, 3, 256)) for s in range(8)])
    assert grade3 > 1.5 * grade0 + 50


def test_grade_is_learnable_from_simple_features():
    """Colour histograms of 64 px thumbnails + logistic regression: kappa well above chance (0).

    300 images, 5 grades, balanced; a threshold of 0.3 leaves room for noise yet fails for a signal-free set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import cohen_kappa_score

    def features(img):
        small = np.asarray(Image.fromarray(img).resize((64, 48)))
        return np.concatenate([np.histogram(small[..., c], bins=16, range=(0, 256))[0] for c in range(3)])

    labels = np.arange(300) % 5
    x = np.stack([features(render_fundus(1000 + i, g, 192)) for i, g in enumerate(labels)])
    model = LogisticRegression(max_iter=3000).fit(x[:200], labels[:200])
    kappa = cohen_kappa_score(labels[200:], model.predict(x[200:]), weights="quadratic")
    assert kappa > 0.3


def test_target_domain_layout(tmp_path):
    info = generate_target_domain(tmp_path, n_per_class=5, size=64, seed=0, workers=1, progress=False)
    assert info["images"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benign", "malignant"]
    assert len(list((tmp_path / "malignant").glob("*.jpg"))) == 5


def test_large_camera_resolution():
    img = render_fundus(3, 4, 2592, 1944)
    assert img.shape == (1944, 2592, 3) and img.dtype == np.uint8


def test_defect_share_is_configurable_and_recorded(tmp_path):
    """~30 % of eyes carry defects by default, none with defect_fraction=0, and truth.json says which."""
    import json

    from tltrain.data.synth import DEFECTS

    summary = generate_eyepacs(tmp_path / "d", n_patients=100, width=48, seed=4, workers=1, progress=False)
    truth = json.loads(open(summary["truth"]).read())
    share = summary["with_defects"] / summary["images"]
    assert 0.2 < share < 0.4 and len(truth) == summary["images"]
    seen = {kind for info in truth.values() for kind in info["defects"]}
    assert seen == set(DEFECTS), seen
    tagged = [stem for stem, info in truth.items() if info["orientation"] != 1]
    assert tagged and all("exif" in truth[stem]["defects"] for stem in tagged)
    clean = generate_eyepacs(tmp_path / "c", n_patients=10, width=48, seed=4, workers=1, progress=False,
                             defect_fraction=0.0)
    assert clean["with_defects"] == 0
    no_exif = generate_eyepacs(tmp_path / "n", n_patients=100, width=48, seed=4, workers=1, progress=False,
                               exif_orientation=False)
    assert all(info["orientation"] == 1 for info in json.loads(open(no_exif["truth"]).read()).values())


def test_defective_eyes_show_their_true_disc(fundus_raw):
    """Every eye of the session's synthetic set, EXIF-oriented as a viewer shows it, has its disc where
    truth.json says (cuts, frames, notches and legends included), and the EXIF-tagged files really are turned."""
    import json

    from PIL import ImageOps

    from tltrain.data.disc import find_disc

    truth = json.loads((fundus_raw / "truth.json").read_text())
    assert any(info["orientation"] in (5, 6, 7, 8) for info in truth.values())
    for stem, info in truth.items():
        with Image.open(fundus_raw / "train" / f"{stem}.jpeg") as img:
            assert (img.getexif().get(0x0112, 1)) == info["orientation"]
            oriented = ImageOps.exif_transpose(img).convert("RGB")
        assert oriented.size == (160, 120), stem
        fit = find_disc(np.asarray(oriented))
        error = max(abs(a - b) for a, b in zip(fit.disc, info["disc"])) / info["disc"][2]
        assert error < 0.015, (stem, info, fit)
