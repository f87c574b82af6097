"""The main job on bundled synthetic data: what `make demo` runs, end to end on a CPU in about ten minutes.

It asks the question of two-step heterogeneous transfer (THTL) and answers it with confidence intervals:
1. synthetic data: an EyePACS-style fundus set (5 DR grades, 800 eyes) and a target task on photographs of
   another camera graded for macular-oedema risk (tltrain/data/synth_dme.py; why it is a fair test:
   docs/transfer.md);
2. shards for both (the target with a large test split and nested training fractions 10 / 25 / 100 %);
3. step 1: resnet18 from random init on fundus with the layer-wise schedule (the intermediate domain);
4. step 2: the grid of configs/experiment/thtl.yaml, {scratch, step 1} x {last layer only, SWFT, fine-tune all}
   x {10, 25, 100 %} x 3 seeds = 54 runs, as one Hydra multirun through submitit's local executor (the launcher
   SLURM sweeps use; `hydra/launcher=slurm` runs the same grid on a cluster), two runs at a time, one thread each;
5. the report: mean ± 95 % CI per configuration, test kappa and AUC against training fraction, the comparisons,
   and one sentence stating the finding, printed at the end whatever it is;
6. the step-1 model exported as a pretrained package.
Every run is deterministic (same numbers on every fresh clone: seeded, one thread per run) and every step is
skipped when its output is already complete, so re-running continues where it stopped.
`--quick` runs the same steps at a smaller size and a 16-run grid (the slow test runs it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tltrain.run_folder import RunFolder

STEP1_KAPPA_GOAL = 0.7  # an intermediate domain worth transferring from (issue: synthetic fundus test kappa)


@dataclass(frozen=True)
class DemoSize:
    patients: int  # fundus patients (two eyes each)
    fundus_width: int
    target_per_class: int
    target_width: int
    image: int  # model input (px)
    step1_epochs_per_phase: int
    grid: tuple[str, ...]  # sweep overrides of the step-2 grid (empty: the experiment's full grid)
    target_val: float = 0.0572  # of each class: 20 of 350 (full size)
    target_test: float = 0.7143  # 250 of 350: a test split of 500 images


FULL = DemoSize(patients=400, fundus_width=256, target_per_class=350, target_width=192, image=96,
                step1_epochs_per_phase=3, grid=())
QUICK = DemoSize(patients=120, fundus_width=192, target_per_class=60, target_width=160, image=64,
                 step1_epochs_per_phase=1, grid=("schedule=linear_probe,swft", "data.fraction=0.25,1.0", "seed=0,1"),
                 target_val=0.1, target_test=0.5)
# Step 2 uses batches of 8 (10 % of the target is 16 images), validates every 3rd epoch (each run's fixed cost,
# ~5 s of imports and the 500-image test split, dominates the small fractions) and these epochs (the paper
# publishes none): last layer and fine-tune all 6 epochs, SWFT 2 epochs on the head then
# 1 per unfrozen group (7 in all for resnet18's 5 groups), so the three schedules cost about the same.
STEP2_EPOCHS = ("schedule.epochs_per_phase=6", "schedule.step_epochs=[2,1,1,1,1,1]")
RUNS_AT_ONCE = 2  # this machine's 2 cores: two single-threaded runs


def _header(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def _done(run_dir: Path) -> bool:
    return RunFolder(run_dir).read_status().get("state") == "completed"


def run_demo(out: Path, quick: bool = False) -> dict:
    from tltrain.config import compose, to_typed
    from tltrain.data import synth
    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.manifest import load_manifest
    from tltrain.data.summary import manifest_summary
    from tltrain.data.synth_dme import DME_CLASSES, generate_dme_target
    from tltrain.report import write_report
    from tltrain.train_app import train_from_overrides

    started = time.time()
    size = QUICK if quick else FULL
    out = Path(out).resolve()
    raw, shards, runs = out / "raw", out / "shards", out / "runs"
    timings: dict[str, float] = {}

    _header("1/7 synthetic data")
    mark = time.time()
    if not (raw / "fundus" / "trainLabels.csv").exists():
        summary = synth.generate_eyepacs(raw / "fundus", n_patients=size.patients, width=size.fundus_width, seed=0,
                                         min_per_class=8, progress=False)
        print(json.dumps({k: v for k, v in summary.items() if k not in ("paths", "truth")}, default=str))
    if not (raw / "target" / DME_CLASSES[-1]).exists():
        print(json.dumps(generate_dme_target(raw / "target", n_per_class=size.target_per_class,
                                             size=size.target_width, seed=1, progress=False)))
    print(f"fundus (intermediate domain): {raw / 'fundus'}\ntarget (camera B, macular-oedema risk): {raw / 'target'}")
    timings["synthetic data"] = time.time() - mark

    _header("2/7 prepare shards")
    mark = time.time()
    manifests = {}
    for name, overrides in (
        ("fundus", ["source=eyepacs", f"source.root={raw / 'fundus'}", "test_fraction=0.2"]),
        ("target", ["source=imagefolder", f"source.root={raw / 'target'}", f"source.classes=[{','.join(DME_CLASSES)}]",
                    f"val_fraction={size.target_val}", f"test_fraction={size.target_test}", "fractions=[0.1,0.25,1.0]",
                    "shard_samples=100"]),
    ):
        if (shards / name / "manifest.json").exists():
            manifests[name] = load_manifest(shards / name)
        else:
            manifests[name] = run_prepare(to_typed(compose("prepare", overrides + [
                f"out={shards / name}", "resize=radius:64", "progress=false"]), PrepareConfig, where="prepare"))
        print(manifest_summary(manifests[name]))
    timings["prepare"] = time.time() - mark

    common = [f"loader.size={size.image}", "loader.workers=1", "trainer=cpu", "trainer.progress=false"]
    step1 = runs / "step1_fundus_layerwise"
    _header("3/7 step 1: fundus (intermediate domain), resnet18 from random init, layer-wise schedule")
    mark = time.time()
    if _done(step1):
        print(f"{step1}: already completed")
    else:
        # loader.balanced: 73 % of the eyes are grade 0; without the sampler the model predicts grade 0 (Sallam et al.)
        result = train_from_overrides(
            ["data=synthetic_fundus", f"data.shards={shards / 'fundus'}", "schedule=layerwise",
             f"schedule.epochs_per_phase={size.step1_epochs_per_phase}", "schedule.groups_per_phase=2",
             "loader.batch_size=16", "loader.balanced=true", *common, f"run_dir={step1}"])
        if result.get("exit_code"):
            raise SystemExit(f"{step1}: run ended with status {result.get('status')}")
    step1_kappa = json.loads(RunFolder(step1).metrics.read_text())["test"]["kappa"]
    verdict = "meets" if step1_kappa >= STEP1_KAPPA_GOAL else "is BELOW"
    print(f"step 1 test kappa {step1_kappa:.3f}: {verdict} the goal of {STEP1_KAPPA_GOAL} for an intermediate domain")
    timings["step 1"] = time.time() - mark

    _header("4/7 step 2: the THTL grid on the target, one Hydra multirun (submitit local executor)")
    mark = time.time()
    grid_dir = runs / "step2_grid"
    _run_grid(grid_dir, step1, shards / "target", common, size)
    timings["step 2 grid"] = time.time() - mark

    _header("5/7 report")
    report = write_report(grid_dir)
    print(Path(report["markdown"]).read_text().split("\n## Runs")[0])
    print(f"plot: {report['plot']}")

    _header("6/7 what the networks look at: LayerCAM where the lesions are known")
    mark = time.time()
    analysis = _lesion_analysis(grid_dir, shards / "target", raw / "target", report)
    timings["LayerCAM"] = time.time() - mark

    _header("7/7 export of the step-1 fundus model")
    export_info = _export_step1(step1, out / "export" / "fundus_resnet18")
    timings["total"] = time.time() - started
    print("\ntimes: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print(f"results in {out}/  (report: {report['markdown']})")
    if analysis:
        print(f"\nLAYERCAM: {analysis['finding']}")
    print(f"\nFINDING: {report['finding'] or 'the grid did not complete enough runs to compare (see the report)'}")
    return {"report": report, "export": export_info, "manifests": manifests, "step1_kappa": step1_kappa,
            "timings": timings, "layercam": analysis}


def _lesion_analysis(grid_dir: Path, target_shards: Path, target_raw: Path, report: dict) -> dict | None:
    """tltrain.explain.thtl on the grid's whole-fraction runs: the report gets its figure, table and sentence;
    the runs' weights are removed afterwards (the grid keeps only metrics). A re-run reuses the saved results."""
    import shutil

    from tltrain import safe_io
    from tltrain.data.synth_dme import LESIONS_FILE
    from tltrain.explain.thtl import RESULTS, grid_runs, write_analysis

    if (grid_dir / RESULTS).exists() and (grid_dir / "lesion_maps.md").exists():
        markdown = (grid_dir / "lesion_maps.md").read_text()
        print(f"{grid_dir / RESULTS}: already measured")
    elif not (target_raw / LESIONS_FILE).exists() or not grid_runs(grid_dir):
        print(f"no LayerCAM measure: {target_raw / LESIONS_FILE} or the grid's kept weights are missing (a demo "
              "folder from an older tltrain: remove it to run everything again)")
        return None
    else:
        analysis = write_analysis(grid_dir, target_shards, target_raw, grid_dir)
        markdown = analysis["markdown"]
        safe_io.atomic_write_text(grid_dir / "lesion_maps.md", markdown)
        for run in grid_runs(grid_dir):
            shutil.rmtree(RunFolder(run["dir"]).checkpoints, ignore_errors=True)
    report_md = Path(report["markdown"])
    text = report_md.read_text()
    if markdown not in text:
        safe_io.atomic_write_text(report_md, text.rstrip("\n") + "\n\n" + markdown)
    finding = next((line.removeprefix("**Finding.** ") for line in markdown.splitlines()
                    if line.startswith("**Finding.**")), "")
    print(markdown.split("\n| weights")[0])
    return {"markdown": markdown, "finding": finding}


def _run_grid(grid_dir: Path, step1: Path, target_shards: Path, common: list[str], size: DemoSize) -> None:
    """`tltrain train -m +experiment=thtl` in a child process, exactly as a user would start it: the experiment's
    own sweep (initial weights from TLTRAIN_INTERMEDIATE), the local submitit launcher, RUNS_AT_ONCE runs at a time
    with one thread each (deterministic, and two single-threaded runs use two cores better than one run)."""
    if (grid_dir / "report.md").exists() or _grid_complete(grid_dir):
        print(f"{grid_dir}: already completed")
        return
    command = [sys.executable, "-m", "tltrain.cli", "train", "-m", "+experiment=thtl", "hydra/launcher=local",
               f"hydra.sweeper.max_batch_size={RUNS_AT_ONCE}", f"hydra.sweep.dir={grid_dir}", "data=synthetic_dme",
               f"data.shards={target_shards}", *common, "loader.batch_size=8", "trainer.eval_every=3", *STEP2_EPOCHS,
               # the grid is read for its metrics (54 weight files would be 2.4 GB): only the runs on the whole
               # training set keep their best weights, for the LayerCAM analysis, which then removes them
               "trainer.keep_after_run='${tltrain_best_if_whole:${data.fraction}}'",  # quoted: Hydra keeps it whole
               *size.grid]
    env = dict(os.environ, TLTRAIN_INTERMEDIATE=str(step1), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print("TLTRAIN_INTERMEDIATE=" + str(step1) + " " + " ".join(["tltrain", *command[3:]]), flush=True)
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the step-2 grid ended with exit code {done.returncode}; its failed runs are listed above "
                         f"and in `tltrain jobs {grid_dir}`")


def _grid_complete(grid_dir: Path) -> bool:
    """A previous demo ran the whole grid (multirun.yaml written, every run folder completed)."""
    runs = [p.parent for p in grid_dir.glob(f"*/{RunFolder.STATUS}")]
    return (grid_dir / "multirun.yaml").exists() and bool(runs) and all(_done(r) for r in runs)


def _export_step1(run_dir: Path, export_dir: Path) -> dict:
    """Export step 1 (the fundus model) as a pretrained package others can load."""
    from tltrain.export.package import export_run

    # force: a re-run of the demo re-exports into its own package (export refuses to replace one otherwise)
    info = export_run(run_dir, export_dir, force=True,
                      description="Synthetic-fundus intermediate-domain checkpoint from "
                      "`tltrain demo` (layer-wise schedule); a demonstration, not a clinical model.")
    print(f"pretrained fundus checkpoint: {export_dir}")
    print(f"load it with:  tltrain.load_pretrained('{export_dir}')  or plain timm (see {export_dir}/README.md)")
    return info
