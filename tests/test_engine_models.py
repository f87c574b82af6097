"""timm models by name and weights from local files only, with the head reset to the task's classes."""
import pytest
import torch
from safetensors.torch import save_file

from tltrain.errors import ConfigError, DataError
from tltrain.models import create_model, load_weights


def test_unknown_arch_names_similar_models():
    with pytest.raises(ConfigError, match="resnet18"):
        create_model("resnet18x", 5)


def test_weights_transfer_to_a_new_head(tmp_path):
    source = create_model("test_resnet", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "imagenet.pth")
    target = create_model("test_resnet", num_classes=5, weights=str(tmp_path / "imagenet.pth"))
    report = target.tltrain_load_report
    assert {k for k, _, _ in report.mismatched} == {"fc.weight", "fc.bias"}
    assert report.new == ["fc.weight", "fc.bias"] and not report.unused
    assert target.fc.out_features == 5
    source_state = source.state_dict()
    for key, value in target.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, source_state[key]), key
    with torch.no_grad():
        assert target(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_weights_from_tltrain_checkpoint_and_safetensors(tmp_path):
    model = create_model("test_resnet", num_classes=5)
    torch.save({"model": model.state_dict(), "trainer": {"step": 3}}, tmp_path / "step.pt")
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    for path in (tmp_path / "step.pt", tmp_path / "model.safetensors", tmp_path):
        fresh = create_model("test_resnet", num_classes=5)
        report = load_weights(fresh, path)
        assert not report.new and not report.mismatched
        for key, value in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[key], value), key


def test_bad_weight_files_name_the_file(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.pth: cannot read weights"):
        create_model("test_resnet", 5, weights=str(tmp_path / "junk.pth"))
    torch.save(create_model("resnet10t", 5).state_dict(), tmp_path / "other.pth")
    with pytest.raises(DataError, match="do not fit this architecture"):
        create_model("test_resnet", 5, weights=str(tmp_path / "other.pth"))
    with pytest.raises(DataError, match="not found"):
        create_model("test_resnet", 5, weights=str(tmp_path / "missing.pth"))
    torch.save({"backbone.conv1.weight": torch.zeros(1), "backbone.fc.bias": torch.zeros(5)}, tmp_path / "prefixed.pth")
    with pytest.raises(DataError, match=r"prefixed.pth: none of its 2 tensors is a tensor of test_resnet \(file keys "
                                        r"backbone.conv1.weight, backbone.fc.bias, ...; model keys conv1.0.weight"):
        create_model("test_resnet", 5, weights=str(tmp_path / "prefixed.pth"))  # not a silent random init
