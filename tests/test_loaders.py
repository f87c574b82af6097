"""Loader backends against the torch reference, across 2 real ranks, and with damaged samples.

Parity tolerance, in grey levels of the filtered [0, 255] image: mean <= 0.1, 99th percentile <= 1 (a looser
bound, mean <= 0.5 and p99 <= 3, when the filter runs at a radius R other than size / 2 and a second resize
follows). Loaders run their defaults (no draft decode). Both backends decode with libjpeg-turbo (identical
pixels) and crop the same integer box; what differs is the antialiased resize kernel (DALI's linear vs torch's
bilinear, a grey level at sharp edges) and rounding ties, which the x4 gain of the filter amplifies at the disc
rim: hence a tight mean and percentile, no max.
Everything runs on real shards written by `tltrain prepare` (conftest), real DALI CPU pipelines, real processes.
"""
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tltrain import preprocess as P
from tltrain.data.loaders import LoaderConfig, build_loader, filtering
from tltrain.data.loaders.plan import sample_refs, select_shards
from tltrain.errors import DataError

SIZE = 64


def _eval_outputs(backend, shards, size=SIZE, **kw):
    cfg = LoaderConfig(backend=backend, batch_size=8, size=size, workers=1, **kw)
    out = {}
    for batch in build_loader(cfg, shards, "val", train=False):
        for i, key in enumerate(batch.keys):
            if batch.valid[i]:
                out[key] = (batch.images[i].float(), int(batch.labels[i]))
    return out


def _reference(shards, out_size=SIZE, pre=None):
    _, shard_list = select_shards(shards, "val")
    out = {}
    for ref in sample_refs(shards, shard_list):
        with open(ref.tar, "rb") as f:
            blobs = {}
            for ext in ("jpg", "disc", "lbl"):
                offset, size, _ = ref.members[ext]
                f.seek(offset)
                blobs[ext] = f.read(size)
        image = torch.from_numpy(np.asarray(Image.open(io.BytesIO(blobs["jpg"])).convert("RGB")).copy())
        disc = np.frombuffer(blobs["disc"], "<f4").tolist()
        out[ref.key] = (P.reference([image], [disc], out_size, pre or P.PreprocessConfig())[0],
                        int.from_bytes(blobs["lbl"], "little"))
    return out


def _grey_diffs(outputs, reference):
    """Per-pixel |difference| in grey levels (undo the std normalisation)."""
    assert set(outputs) == set(reference)
    assert all(outputs[k][1] == reference[k][1] for k in reference)  # labels travel with their keys
    grey = torch.tensor(P.IMAGENET_STD).view(3, 1, 1) * 255
    return torch.stack([(outputs[k][0] - reference[k][0]).abs() * grey for k in reference]).flatten()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_eval_parity_with_reference(backend, fundus_shards):
    diffs = _grey_diffs(_eval_outputs(backend, fundus_shards), _reference(fundus_shards))
    assert diffs.mean() <= 0.1 and diffs.quantile(0.99) <= 1.0


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_parity_when_filter_radius_differs_from_model_size(backend, fundus_shards):
    pre = P.PreprocessConfig(radius=40)  # filter on an 80 px disc square, then resize to 48 px
    diffs = _grey_diffs(_eval_outputs(backend, fundus_shards, size=48, preprocess=pre),
                        _reference(fundus_shards, out_size=48, pre=pre))
    assert diffs.mean() <= 0.5 and diffs.quantile(0.99) <= 3.0


def test_dali_kernel_option_falls_back_to_torch_reference_on_cpu(fundus_shards):
    filtering._warn_no_cuda.cache_clear()  # warned once per process: make this test see it
    with pytest.warns(RuntimeWarning, match="filter_kernel=triton needs CUDA"):
        outputs = _eval_outputs("dali", fundus_shards, filter_kernel="triton")
    diffs = _grey_diffs(outputs, _reference(fundus_shards))
    assert diffs.mean() <= 0.1 and diffs.quantile(0.99) <= 1.0


def test_dtype_layout_and_filter_off(fundus_shards):
    cfg = LoaderConfig(batch_size=4, size=SIZE, workers=0, dtype="bf16", channels_last=True)
    batch = next(iter(build_loader(cfg, fundus_shards, "val", train=False)))
    assert batch.images.dtype == torch.bfloat16 and batch.images.is_contiguous(memory_format=torch.channels_last)
    off = LoaderConfig(batch_size=4, size=SIZE, workers=0, preprocess=P.PreprocessConfig(enabled=False))
    raw = next(iter(build_loader(off, fundus_shards, "val", train=False))).images
    corner_grey = (raw[:, :, 0, 0] * torch.tensor(P.IMAGENET_STD).view(1, 3) + torch.tensor(P.IMAGENET_MEAN)) * 255
    assert corner_grey.max() < 20  # unfiltered: black surround stays black (filtered it would be 128)


def test_evaluation_deterministic_and_training_reshuffles(fundus_shards):
    cfg = LoaderConfig(batch_size=8, size=32, workers=0)
    first = [b.keys for b in build_loader(cfg, fundus_shards, "val", train=False)]
    second = [b.keys for b in build_loader(cfg, fundus_shards, "val", train=False)]
    assert first == second
    train = build_loader(cfg, fundus_shards, "train", train=True, seed=1)
    epoch0 = [k for b in train for k in b.keys]
    train.set_epoch(1)
    epoch1 = [k for b in train for k in b.keys]
    assert epoch0 != epoch1 and len(epoch0) == len(epoch1) == len(train) * 8
    again = build_loader(cfg, fundus_shards, "train", train=True, seed=1)
    assert [k for b in again for k in b.keys] == epoch0  # same seed, same epoch: same draws


def test_torch_workers_give_same_evaluation_as_main_process(fundus_shards):
    make = lambda workers: LoaderConfig(batch_size=5, size=32, workers=workers)  # noqa: E731
    main = [(b.keys, b.images) for b in build_loader(make(0), fundus_shards, "val", train=False)]
    two = [(b.keys, b.images) for b in build_loader(make(2), fundus_shards, "val", train=False)]
    assert len(main) == len(two) == 3  # 12 samples, batches of 5: the last one padded
    assert sorted(k for keys, _ in main for k in keys if k) == sorted(k for keys, _ in two for k in keys if k)
    by_key = lambda batches: {k: img for keys, imgs in batches for k, img in zip(keys, imgs) if k}  # noqa: E731
    assert all(torch.equal(by_key(main)[k], by_key(two)[k]) for k in by_key(main))


def test_evaluation_keeps_its_workers_between_passes(fundus_shards):
    """loader.persistent_workers (the default): a validation loader iterated every epoch starts its worker
    processes once and gives the same batches each pass; off, each pass starts new ones."""
    cfg = LoaderConfig(batch_size=5, size=32, workers=2)
    loader = build_loader(cfg, fundus_shards, "val", train=False)
    passes, pids = [], []
    for _ in range(3):
        passes.append([(b.keys, b.images) for b in loader])
        pids.append(sorted(w.pid for w in loader._persistent._iterator._workers))
    assert pids[0] == pids[1] == pids[2] and all(pid != os.getpid() for pid in pids[0])
    for later in passes[1:]:
        assert [keys for keys, _ in later] == [keys for keys, _ in passes[0]]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(later, passes[0]))
    fresh = build_loader(LoaderConfig(batch_size=5, size=32, workers=2, persistent_workers=False), fundus_shards,
                         "val", train=False)
    assert [b.keys for b in fresh] == [keys for keys, _ in passes[0]] and fresh._persistent is None
    train = build_loader(cfg, fundus_shards, "train", train=True)
    list(train)
    assert train._persistent is None  # a training epoch has a new plan: its workers are not kept


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_parts_read_each_sample_once(fundus_shards, workers):
    """Each DataLoader worker reads an equal contiguous part of the rank's block: an evaluation pass gives every
    sample once, a training epoch (no class balancing) every sample of its block once, whatever the workers."""
    cfg = LoaderConfig(batch_size=4, size=16, workers=workers)
    evaluation = build_loader(cfg, fundus_shards, "val", train=False)
    keys = [k for b in evaluation for k in b.keys if k]
    assert sorted(keys) == sorted(evaluation.index.keys.tolist())
    for batch in (1, 3):  # every whole batch of the block once (the samples past them sit this epoch out)
        train = build_loader(LoaderConfig(batch_size=batch, size=16, workers=workers), fundus_shards, "train",
                             train=True)
        keys = [k for b in train for k in b.keys]
        assert len(keys) == len(set(keys)) == len(train) * batch >= len(train.block) - batch * workers
        assert set(keys) <= set(train.index.keys[train.block].tolist())


def test_training_ranks_stay_in_step_with_fewer_shards_than_ranks(fundus_shards):
    cfg = LoaderConfig(batch_size=2, size=16, workers=0)
    ranks = [build_loader(cfg, fundus_shards, "train", train=True, rank=r, world_size=2, fraction=0.1)
             for r in range(2)]
    keys = [[k for b in loader for k in b.keys] for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 2 and len(keys[0]) == len(keys[1]) == 4
    assert not set(keys[0]) & set(keys[1])


def test_fraction_selects_nested_shards(fundus_shards):
    manifest = json.loads((fundus_shards / "manifest.json").read_text())
    cfg = LoaderConfig(batch_size=1, size=32, workers=0, augment=P.AugmentConfig(rotate_deg=0))
    small = build_loader(cfg, fundus_shards, "train", train=True, fraction=0.2)
    assert len(small) == manifest["fractions"]["0.2"]["count"]


def test_balanced_sampling_draws_classes_evenly(fundus_shards):
    plain = dict(batch_size=8, size=16, workers=0, augment=P.AugmentConfig(rotate_deg=0, brightness=0, contrast=0,
                                                                            saturation=0))
    loader = build_loader(LoaderConfig(balanced=True, **plain), fundus_shards, "train", train=True)
    counts = Counter()
    for epoch in range(8):
        loader.set_epoch(epoch)
        counts.update(label for b in loader for label in b.labels.tolist())
    share = np.array([counts[c] for c in range(5)]) / sum(counts.values())
    natural = np.array(loader.class_counts) / sum(loader.class_counts)
    assert natural.max() - natural.min() > 0.25  # the synthetic set is imbalanced like EyePACS
    assert share.max() - share.min() < 0.12 and share.min() > 0.12


def _corrupt_one(shards, tmp_path):
    copy = tmp_path / "bad"
    shutil.copytree(shards, copy)
    _, shard_list = select_shards(copy, "val")
    ref = sample_refs(copy, shard_list)[2]
    offset, size, _ = ref.members["jpg"]
    with open(ref.tar, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    return copy, ref.key


def test_decode_error_skipped_and_counted_or_fails(fundus_shards, tmp_path):
    copy, bad_key = _corrupt_one(fundus_shards, tmp_path)
    cfg = LoaderConfig(batch_size=8, size=32, workers=0)
    loader = build_loader(cfg, copy, "val", train=False)
    valid_keys = [k for b in loader for k, v in zip(b.keys, b.valid.tolist()) if v]
    assert bad_key not in valid_keys and len(valid_keys) == len(set(valid_keys))
    assert loader.stats()["decode_errors"] == 1 and bad_key in loader.decode_errors[0]
    failing = build_loader(LoaderConfig(batch_size=8, size=32, workers=0, on_decode_error="fail"), copy, "val",
                           train=False)
    with pytest.raises(DataError, match=bad_key):
        list(failing)


def test_dali_decode_error_names_the_shards(fundus_shards, tmp_path):
    copy, _ = _corrupt_one(fundus_shards, tmp_path)
    cfg = LoaderConfig(backend="dali", batch_size=8, size=32, workers=1, on_decode_error="fail")
    with pytest.raises(DataError, match="(?s)val-all-000000.tar.*tltrain verify"):  # DALI fails while prefetching
        list(build_loader(cfg, copy, "val", train=False))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_gpu_filter_kernel_matches_reference(backend, fundus_shards):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = LoaderConfig(backend=backend, batch_size=8, size=SIZE, workers=1, filter_kernel="triton")
    outputs = {}
    for batch in build_loader(cfg, fundus_shards, "val", train=False, device="cuda"):
        assert batch.images.is_cuda
        outputs.update({k: (img.float().cpu(), int(lbl)) for k, img, lbl, v in
                        zip(batch.keys, batch.images, batch.labels, batch.valid.tolist()) if v})
    diffs = _grey_diffs(outputs, _reference(fundus_shards))
    assert diffs.mean() <= 0.2 and diffs.quantile(0.99) <= 2.0


RANK_SCRIPT = r"""
import json, sys
from tltrain.data.loaders import LoaderConfig, build_loader
shards, backend, rank, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
cfg = LoaderConfig(backend=backend, batch_size=4, size=32, workers=1)
ev = build_loader(cfg, shards, "val", train=False, rank=rank, world_size=2)
keys = [k for b in ev for k, v in zip(b.keys, b.valid.tolist()) if v]
tr = build_loader(cfg, shards, "train", train=True, rank=rank, world_size=2, seed=3)
train_batches = sum(1 for _ in tr)
json.dump({"keys": keys, "eval_batches": len(ev), "train_batches": train_batches, "train_len": len(tr)}, open(out, "w"))
"""


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_two_ranks_disjoint_and_complete(backend, fundus_shards, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(fundus_shards), backend, str(r),
                               str(tmp_path / f"{r}.json")], env={**os.environ, "PYTHONWARNINGS": "ignore"})
             for r in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    manifest = json.loads((fundus_shards / "manifest.json").read_text())
    keys = results[0]["keys"] + results[1]["keys"]
    assert not set(results[0]["keys"]) & set(results[1]["keys"])
    assert len(keys) == len(set(keys)) == manifest["splits"]["val"]["count"]
    assert results[0]["eval_batches"] == results[1]["eval_batches"]
    assert results[0]["train_batches"] == results[1]["train_batches"] == results[0]["train_len"]
