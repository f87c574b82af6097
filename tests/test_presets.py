"""Every preset a user can name runs for real, as shipped: each configs/model/*.yaml and each
configs/schedule/*.yaml trains from random init on real shards and is evaluated on the test split.

Found by this test: the shipped vit_small_patch16_224 preset failed at any loader.size but 224 (timm's ViT
asserts its one input size); fixed-size models are now built with dynamic_img_size (tltrain.models).
"""
import pytest

from conftest import ROOT
from tltrain.train_app import train_from_overrides

CONFIGS = ROOT / "configs"
MODEL_PRESETS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
SCHEDULE_PRESETS = sorted(p.stem for p in (CONFIGS / "schedule").glob("*.yaml"))


def test_the_preset_lists_hold_what_ships():
    """The globs above found the shipped presets (a wrong path would silently make the parametrized tests empty)."""
    assert {"resnet18", "resnet50", "densenet121", "efficientnet_b0", "vgg16",
            "vit_small_patch16_224"} <= set(MODEL_PRESETS)
    assert {"scratch", "finetune_all", "linear_probe", "layerwise", "swft", "features_svm",
            "features_logreg"} <= set(SCHEDULE_PRESETS)


def _run(shards, run_dir, *extra) -> dict:
    result = train_from_overrides([f"data.shards={shards}", "loader.size=32", "loader.batch_size=8",
                                   "loader.workers=0", "trainer=cpu", "trainer.progress=false",
                                   "schedule.epochs_per_phase=1", f"run_dir={run_dir}", *extra])
    assert result["status"] == "completed", result
    assert 0 <= result["test"]["accuracy"] <= 1 and result["test"]["count"] > 0
    return result


@pytest.mark.slow  # 6 architectures, ~3 min in all: the slow suite runs them
@pytest.mark.parametrize("preset", MODEL_PRESETS)
def test_every_model_preset_trains(preset, fundus_shards, tmp_path):
    _run(fundus_shards, tmp_path / "run", f"model={preset}", "schedule=finetune_all")


def test_vit_preset_at_another_size_exports_and_loads(fundus_shards, tmp_path):
    """The ViT trained at 32 px: its package loads in tltrain and in plain timm, and predicts at 32 px."""
    import timm
    import torch

    from tltrain.export import export_run, load_pretrained

    _run(fundus_shards, tmp_path / "run", "model=vit_small_patch16_224", "schedule=finetune_all")
    export_run(tmp_path / "run", tmp_path / "pkg")
    model, pre = load_pretrained(tmp_path / "pkg")
    assert pre.size == 32 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 5)
    plain = timm.create_model(f"local-dir:{tmp_path / 'pkg'}", pretrained=True).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(plain(x), model(x), atol=1e-5)


@pytest.mark.slow  # 10 schedules, ~4 min in all
@pytest.mark.parametrize("preset", SCHEDULE_PRESETS)
def test_every_schedule_preset_trains(preset, fundus_shards, tmp_path):
    _run(fundus_shards, tmp_path / "run", "model.arch=resnet10t", f"schedule={preset}")
