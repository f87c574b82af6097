"""One run, assembled: manifest -> model (timm, optional local weights) -> schedule -> loaders -> engine.

Kept apart from the Hydra app so that the demo, the SLURM launcher and tests call the same assembly. The
frozen-features + SVM/logistic-regression schedules take their own path here: no gradient steps, a
scikit-learn classifier on cached features, and the same metrics files as a trained run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from tltrain.errors import DataError, os_error
from tltrain.run_folder import RunFolder
from tltrain.safe_io import atomic_write_json, atomic_write_text, csv_cell


def read_manifest(shards, weights=None):
    """The shards' manifest.json (several folders: their combined manifest, tltrain.data.shard_set), read bounded
    and validated (tltrain.data.manifest) before a model is built: the run's one read of it (the loaders and the
    checksum check are handed this one)."""
    from tltrain.data.shard_set import load_shard_set

    try:
        return load_shard_set(shards, weights)
    except OSError as exc:
        raise os_error(exc, "reading the manifest") from None


def shard_root(shards) -> str:
    """The folder the loaders join shard entries to: the one folder, or (several folders, whose combined entries
    hold absolute paths) the first, which then only names the data in messages."""
    from tltrain.data.shard_set import shard_folders

    return shard_folders(shards)[0]


def _log(is_main: bool, message: str) -> None:
    if is_main:
        print(message, flush=True)


def run_transfer(cfg) -> dict:
    """Train (or resume) and evaluate one run described by a validated RunConfig."""
    from tltrain.data.loaders import build_loader
    from tltrain.engine import distributed as D
    from tltrain.engine.losses import model_outputs
    from tltrain.engine.reproducibility import configure_determinism, seed_everything
    from tltrain.engine.trainer import train
    from tltrain.models import create_model
    from tltrain.transfer.schedule import build_schedule

    # Seed before anything random happens: the initial weights (random init, new heads) come from cfg.seed, the
    # same on every rank; the trainer then re-seeds its own streams with seed + rank.
    seed_everything(cfg.seed)
    configure_determinism(cfg.trainer.deterministic)
    run_dir = Path(cfg.run_dir)
    env = D.read_env()
    device = D.device_for(env, cfg.device)
    manifest = read_manifest(cfg.data.shards, cfg.data.weights)
    if cfg.data.verify_checksums:  # before the first epoch: a shard changed since prepare stops the run (exit 2)
        _check_shard_checksums(cfg, env, device, manifest)
    num_classes = int(manifest["num_classes"])
    model = create_model(cfg.model.arch, model_outputs(cfg.trainer, num_classes), cfg.model.weights,
                         trust_pickle=cfg.model.trust_pickle, input_size=cfg.loader.size,
                         drop_rate=cfg.model.drop_rate)
    report = getattr(model, "tltrain_load_report", None)
    if report is not None:
        _log(env.is_main, f"weights {cfg.model.weights}: {report.summary()}")
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(RunFolder(run_dir).weights_report, dataclasses.asdict(report))

    def loader(split: str, train_mode: bool, fraction: float | None = None):
        """Training loaders read the chosen nested fraction; evaluation loaders a whole split (or `fraction`)."""
        return build_loader(cfg.loader, shard_root(cfg.data.shards), split, train=train_mode, rank=env.rank,
                            world_size=env.world_size, device=str(device), seed=cfg.seed,
                            fraction=cfg.data.fraction if train_mode else fraction, manifest=manifest)

    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    if cfg.schedule.name in ("features_svm", "features_logreg"):
        return _run_features(cfg, model, loader, manifest, run_dir, env, device, config_yaml)

    schedule = build_schedule(cfg.schedule, model)
    hparams = {"arch": cfg.model.arch, "schedule": cfg.schedule.name, "fraction": cfg.data.fraction,
               "data": cfg.data.name, "weights": cfg.model.weights or "none", "seed": cfg.seed}
    test_loader = loader(cfg.data.test_split, False) if cfg.data.test_split else None
    cfg.trainer.seed = cfg.seed
    return train(cfg.trainer, model, loader(cfg.data.train_split, True), loader(cfg.data.val_split, False), run_dir,
                 schedule, device=str(device), num_classes=num_classes, batch_size=cfg.loader.batch_size,
                 config_to_save=cfg, hparams=hparams, test_loader=test_loader)


def _run_features(cfg, model, loader, manifest, run_dir: Path, env, device, config_yaml: str) -> dict:
    """Li et al. method 3: the pretrained CNN as a fixed feature extractor, a scikit-learn classifier on top."""
    from tltrain.engine.logging import own_folder
    from tltrain.metrics import compute_metrics, write_predictions_csv
    from tltrain.transfer.features import extract_features, fit_classifier

    started = time.time()
    folder = RunFolder(run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder.config, config_yaml)
        folder.write_status("running", step=0, epoch=0)
    model = model.to(device).eval()
    cache = own_folder(folder.features, "feature cache folder")
    kind = "svm" if cfg.schedule.name == "features_svm" else "logreg"
    splits = {"train": cfg.data.train_split, "val": cfg.data.val_split}
    if cfg.data.test_split:
        splits["test"] = cfg.data.test_split
    feats = {}
    manifest_hash = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    for name, split in splits.items():
        # every image once, unaugmented: frozen features are a deterministic function of the image
        fraction = cfg.data.fraction if name == "train" else None
        data_key = f"{manifest_hash}:{split}:{fraction}:{cfg.loader.size}"
        feats[name] = extract_features(model, loader(split, False, fraction=fraction), device,
                                       cache_dir=cache / name, data_key=data_key)
    n_images = sum(len(f[1]) for f in feats.values())
    classifier = fit_classifier(feats["train"][0], feats["train"][1], kind=kind, C=cfg.schedule.svm_c,
                                seed=cfg.seed, kernel=cfg.schedule.svm_kernel)
    results = {}
    for name in ("val", "test"):
        if name in feats:
            probs = classifier.predict_proba(feats[name][0], num_classes=int(manifest["num_classes"]))
            results[name] = compute_metrics(probs, feats[name][1], cfg.trainer.referable_threshold)
            if name == "test" and env.is_main:
                keys = [csv_cell(key) for key in feats[name][2]]  # from the shards: no spreadsheet formulas
                write_predictions_csv(folder.predictions_test, keys, feats[name][1], probs)
    perf = {"images_per_s": n_images / max(time.time() - started, 1e-9), "wall_time_s": time.time() - started}
    if env.is_main:
        classifier.save(run_dir / "classifier")  # classifier.safetensors + classifier.json: data, not pickle
        atomic_write_json(folder.metrics, {"final": results.get("val", {}), "history": [],
                                           "test": results.get("test", {}), "perf": perf})
        folder.write_status("completed", step=0, epoch=0,
                            metrics={k: v for k, v in results.get("val", {}).items() if k != "confusion"})
    _log(env.is_main, f"{kind} on frozen {cfg.model.arch} features: " + ", ".join(
        f"{split} kappa {m['kappa']:.3f} acc {m['accuracy']:.3f}" for split, m in results.items()))
    return {"status": "completed", "exit_code": 0, "step": 0, "epoch": 0, "run_dir": str(run_dir),
            "final": results.get("val", {}), "test": results.get("test", {}), "perf": perf}


def _check_shard_checksums(cfg, env, device, manifest) -> None:
    """Each rank hashes its slice of the run's shards (tltrain.data.integrity); every rank raises the same
    DataError on any mismatch (train_app.run marks the run failed, the CLI exits 2)."""
    import torch.distributed as dist

    from tltrain.data.integrity import check_checksums, checksum_error, run_shards
    from tltrain.engine import distributed as D

    splits = [s for s in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split) if s]
    shards = run_shards(shard_root(cfg.data.shards), splits, cfg.data.fraction, manifest)
    started = time.time()
    D.init_process_group(env, device)  # the trainer's own call then finds the group joined
    problems = check_checksums(shard_root(cfg.data.shards), shards, env.rank, env.world_size)
    if D.is_distributed():
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, problems)
        problems = sorted(p for rank_problems in gathered for p in rank_problems)
    if problems:
        raise DataError(checksum_error(problems))
    _log(env.is_main, f"checked size and sha256 of {len(shards)} shards against manifest.json "
                      f"({time.time() - started:.1f} s; data.verify_checksums=false skips this)")
