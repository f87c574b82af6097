"""A real 2-process DeepSpeed ZeRO-2 run through the CLI (torchrun + Hydra), exported: the package holds exactly
DeepSpeed's own consolidation of the ZeRO partitions."""
import os
import subprocess

import pytest
import torch

from conftest import TORCHRUN, free_port, tiny_run_overrides


@pytest.mark.slow
def test_deepspeed_zero2_run_exports_its_consolidated_weights(fundus_shards, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from tltrain.export import export_run, load_pretrained

    run_dir = tmp_path / "ds"
    overrides = tiny_run_overrides(fundus_shards, run_dir, "trainer.strategy=deepspeed", "trainer.precision=bf16",
                                   "trainer.deepspeed.zero_stage=2")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                           "tltrain.cli", "train", *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '"state": "completed"' in (run_dir / "status.json").read_text()

    package = tmp_path / "pkg"
    export_run(run_dir, package, which="latest")
    exported = load_file(str(package / "model.safetensors"))
    import json

    latest = json.loads((run_dir / "checkpoints" / "index.json").read_text())["latest"]
    reference = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=latest)
    reference = {k.removeprefix("module."): v for k, v in reference.items()}
    floats = {k for k, v in reference.items() if v.is_floating_point()}
    assert floats and floats <= set(exported)
    assert all(torch.equal(exported[k], reference[k].float()) for k in floats)
    model, _ = load_pretrained(package)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
