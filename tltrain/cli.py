"""The `tltrain` command: one entry point, one subcommand per stage of the data flow.

Stages with many options (prepare, train) take Hydra overrides (`key=value`, `group=option`) composed from
configs/; small tools (verify, report, export, ...) take plain arguments. Errors the user can fix (bad input,
bad config) print as one clear message and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tltrain.errors import TltrainError


def _cmd_synth(args: argparse.Namespace) -> None:
    from tltrain.data import synth

    if args.target_domain:
        summary = synth.generate_target_domain(
            args.out, n_per_class=args.per_class, size=args.width, seed=args.seed, workers=args.workers
        )
    else:
        summary = synth.generate_eyepacs(
            args.out,
            n_patients=args.patients,
            width=args.width,
            height=args.height,
            seed=args.seed,
            workers=args.workers,
            min_per_class=args.min_per_class,
            defect_fraction=args.defect_fraction,
            exif_orientation=not args.no_exif,
        )
    print(json.dumps(summary, indent=2, default=str))


def _cmd_prepare(args: argparse.Namespace) -> None:
    from tltrain.config import compose_prepare, to_typed
    from tltrain.data.prepare import PrepareConfig, run_prepare
    from tltrain.data.summary import manifest_summary

    cfg = to_typed(compose_prepare(args.overrides), PrepareConfig, where="prepare")
    manifest = run_prepare(cfg)
    if manifest is None:  # phase=check or write: one task of a split prepare, no manifest yet
        print(f"prepare phase={cfg.phase} task={cfg.task}: done", flush=True)
    else:
        print(manifest_summary(manifest))


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (argparse prints the error and exits with status 2)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _cmd_verify(args: argparse.Namespace) -> None:
    from tltrain.data.verify import verify_shards

    report = verify_shards(args.shards, workers=args.workers)
    print(json.dumps(report, indent=2, default=str))


def _cmd_report(args: argparse.Namespace) -> int:
    from tltrain.report import write_report

    result = write_report(args.sweep_dir, args.out)
    print(result["markdown_text"])  # what was written, not a re-read of a file in a shared folder
    print(f"written: {result['csv']}, {result['markdown']}" + (f", {result['plot']}" if result["plot"] else ""))
    if result.get("finding"):
        print(f"\nFinding: {result['finding']}")
    if result.get("unreadable"):
        print(f"{result['unreadable']} run folder(s) could not be read (listed under 'Not completed')",
              file=sys.stderr)
        return 1
    return 0


def _cmd_export(args: argparse.Namespace) -> None:
    from tltrain.export.package import export_run

    meta = export_run(args.run_dir, args.out_dir, which=args.which, license=args.license,
                      description=args.description, shards=args.shards, force=args.force)
    checkpoint = meta["checkpoint"]
    print(f"exported {meta['architecture']} ({meta['num_classes']} classes) to {args.out_dir}: checkpoint "
          f"{checkpoint['name']} (step {checkpoint['step']}), {checkpoint['chosen_by']}")
    print(f"weights sha256 {meta['weights']['sha256']}")
    print(f"package digest {meta['digest']} (sha256 of SHA256SUMS: publish it beside the package)")
    print(f"load it with: tltrain.load_pretrained('{args.out_dir}')  (see {args.out_dir}/README.md)")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from tltrain.export.evaluation import default_evaluation_path, evaluate

    out = args.out or str(default_evaluation_path(args.checkpoint, args.shards, args.split))  # not in the package
    metrics = evaluate(args.checkpoint, args.shards, split=args.split, batch_size=args.batch_size,
                       device=args.device, out=out, backend=args.backend, digest=args.digest,
                       resamples=args.resamples)
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("confusion", "per_source")}, indent=2,
                     default=str))
    print("confusion (rows: true, columns: predicted):")
    for row in metrics["confusion"]:
        print("  " + " ".join(f"{v:6d}" for v in row))
    if metrics.get("per_source"):
        print(per_source_table(metrics["per_source"]))
    print(f"package digest {metrics['package_digest'] or '(none: no SHA256SUMS)'}")
    print(f"saved: {out} and per-image predictions {metrics['predictions']}")


def per_source_table(per_source: dict) -> str:
    """Each source's metrics as a table (evaluate, report): count, accuracy, kappa, AUC, referable AUC."""
    columns = ("count", "accuracy", "kappa", "auc", "referable_auc")
    lines = ["per source:", f"  {'source':<14}" + "".join(f"{c:>15}" for c in columns)]
    for name, part in per_source.items():
        cells = [f"{part[c]:>15d}" if c == "count" else f"{part[c]:>15.4f}" if isinstance(part.get(c), float)
                 else f"{'-':>15}" for c in columns]
        lines.append(f"  {str(name)[:13]:<14}" + "".join(cells))
    return "\n".join(lines)


def _cmd_explain(args: argparse.Namespace) -> None:
    from tltrain.explain.command import explain
    from tltrain.safe_io import printable

    layers = [name.strip() for name in args.layers.split(",") if name.strip()] if args.layers else None
    result = explain(args.model, args.images, args.out, layers=layers, target=args.target, device=args.device,
                     batch_size=args.batch_size)
    print(f"{result['explained']} images explained at layers {', '.join(result['layers'])} -> {result['out']} "
          "(contact_sheet.png, explain.csv, per image <key>.png, <key>.npz, <key>_photo.jpg)")
    for item in result["skipped"]:
        print(f"  skipped {printable(item['file'], 500)}: {printable(item['reason'], 500)}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from tltrain.export.prediction import predict
    from tltrain.safe_io import printable

    result = predict(args.checkpoint, args.image_dir, args.out, batch_size=args.batch_size, device=args.device,
                     digest=args.digest)
    print(f"{result['predicted']} images predicted -> {result['csv']} (package digest "
          f"{result['package_digest'] or '(none: no SHA256SUMS)'})")
    if result["skipped"]:
        print(f"{len(result['skipped'])} images skipped:")
        for item in result["skipped"]:
            print(f"  - {printable(item['file'], 500)}: {printable(item['reason'], 500)}")


def _cmd_convert_weights(args: argparse.Namespace) -> None:
    from safetensors.torch import save

    from tltrain.engine.checkpoint import atomic_write_bytes
    from tltrain.errors import ConfigError
    from tltrain.models import read_state_dict

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: the output must be a .safetensors file")
    state = read_state_dict(args.weights, trust_pickle=args.trust_pickle)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}  # no shared storage
    atomic_write_bytes(out, save(tensors, metadata={"format": "pt", "converted_from": Path(args.weights).name}))
    print(f"wrote {len(tensors)} tensors to {out}" + (" (read with plain pickle: --trust-pickle)"
                                                      if args.trust_pickle else ""))


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from tltrain.pipeline.config import compose_pipeline
    from tltrain.pipeline.run import run_pipeline

    cfg = compose_pipeline(args.config, args.overrides)
    return run_pipeline(cfg, local=args.local, wait=args.wait, dry_run=args.dry_run)


def _cmd_demo(args: argparse.Namespace) -> None:
    from tltrain.demo import run_demo

    run_demo(Path(args.out), quick=args.quick)


# Hydra's flags that take no value, and those that take one; moved before the overrides (argparse would
# otherwise reject `tltrain train model=resnet50 -m seed=0,1` as "unrecognized arguments").
_HYDRA_FLAGS = {"-m", "--multirun", "-r", "--run", "--resolve", "--hydra-help", "-h", "--help", "--version",
                "--shell-completion", "-sc"}
_HYDRA_FLAGS_WITH_VALUE = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
                           "-cd", "--config-dir", "--experimental-rerun"}


def _hydra_argv(args: list[str]) -> list[str]:
    flags, overrides = [], []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _HYDRA_FLAGS_WITH_VALUE and i + 1 < len(args):
            flags += [arg, args[i + 1]]
            i += 2
            continue
        (flags if arg in _HYDRA_FLAGS or arg.startswith("--info") else overrides).append(arg)
        i += 1
    return flags + overrides


def _train(args: list[str]) -> int:
    """`tltrain train`: Hydra owns the command line (multirun, launchers, sweeps); its errors become one line.

    HYDRA_FULL_ERROR makes Hydra raise instead of printing its multi-line report, so the composition errors
    (unknown option, unknown key, unparsable value) reach config_error_line. A sweep's failed runs were listed
    by tltrain.launch.summary; the command then exits 1.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tltrain.config import config_error_line
    from tltrain.launch import summary
    from tltrain.train_app import hydra_main

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    sys.argv = [f"{Path(sys.argv[0]).name} train", *_hydra_argv(args)]
    try:
        hydra_main()
    except SystemExit as exc:  # a single run's own exit status (its error line is already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except TltrainError as exc:
        print_error(exc)
        return 2
    except (HydraException, OmegaConfBaseException) as exc:
        print_error(config_error_line(exc))
        return 2
    except (OSError, ValueError) as exc:  # Hydra creating the run folder or its log file: read-only, full, ...
        cause = exc if isinstance(exc, OSError) else exc.__cause__
        if not isinstance(cause, OSError):
            raise
        from tltrain.errors import os_error

        print_error(os_error(cause, "starting the run"))
        return 2
    if summary.last_summary and summary.last_summary["failed"]:
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tltrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic fundus dataset (EyePACS layout) or target domain")
    p.add_argument("out", help="output folder")
    p.add_argument("--patients", type=int, default=100, help="number of patients (two eyes each)")
    p.add_argument("--width", type=int, default=512, help="image width in pixels (target domain: square size)")
    p.add_argument("--height", type=int, default=None, help="image height (default: camera aspect 3:4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--min-per-class", type=int, default=0, help="guarantee at least this many images per grade")
    p.add_argument("--defect-fraction", type=float, default=0.3,
                   help="share of eyes with defects of real photographs (cuts, frames, notches, legends, EXIF)")
    p.add_argument("--no-exif", action="store_true", help="no EXIF orientation tags among the defects")
    p.add_argument("--target-domain", action="store_true", help="write the ImageFolder target domain instead")
    p.add_argument("--per-class", type=int, default=100, help="target domain: images per class")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="turn a dataset into WebDataset shards (Hydra overrides, configs/prepare.yaml)")
    p.add_argument("overrides", nargs="*", help="e.g. source=eyepacs source.root=/data/eyepacs out=/shards")
    p.set_defaults(func=_cmd_prepare)

    sub.add_parser("train", help="train one run or a sweep (Hydra: overrides, -m, hydra/launcher=slurm; "
                   "see configs/config.yaml)", add_help=False)

    sub.add_parser("submit", help="submit a run or a two-step chain to SLURM without blocking (local executor "
                   "without SLURM); `tltrain submit --help`", add_help=False)
    sub.add_parser("jobs", help="submitted runs with SLURM state, progress, last metrics, failures with log tail",
                   add_help=False)

    p = sub.add_parser("verify", help="re-read shards: checksums, decoding, counts vs manifest")
    p.add_argument("shards", help="folder with manifest.json and the shards")
    p.add_argument("--workers", type=_non_negative_int, default=0,
                   help="processes checking shards in parallel (default 0: every core this process may use)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("report", help="aggregate a sweep's runs into CSV, Markdown and a metric-vs-fraction plot")
    p.add_argument("sweep_dir")
    p.add_argument("--out", default=None, help="output folder (default: the sweep folder)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("export", help="write a run's weights as a pretrained package (safetensors + metadata + card)")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="checkpoint to export")
    p.add_argument("--license", default="CC-BY-4.0")
    p.add_argument("--description", default="")
    p.add_argument("--shards", default=None, help="the run's shard folder, if it moved since the run")
    p.add_argument("--force", action="store_true",
                   help="replace the package already in out_dir (atomically; stale files do not survive)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("evaluate", help="metrics of a pretrained package on a prepared split")
    p.add_argument("checkpoint", help="package folder written by `tltrain export`")
    p.add_argument("shards")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=["torch", "dali"], default="torch")
    p.add_argument("--out", default=None, help="JSON file (default: <shards>/evaluation_<split>_<package name>.json, "
                   "never inside the package); per-image predictions go beside it as <name>_predictions.csv")
    p.add_argument("--digest", default=None, help="the package digest its publisher announced; refused if different")
    p.add_argument("--resamples", type=_non_negative_int, default=0,
                   help="bootstrap resamples for 95 %% intervals of the split and of each source (0: none)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="grade probabilities for every image in a folder, as CSV")
    p.add_argument("checkpoint")
    p.add_argument("image_dir")
    p.add_argument("--out", default="predictions.csv", help="CSV file (its folder is created)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--digest", default=None, help="the package digest its publisher announced; refused if different")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("explain", help="LayerCAM maps of every stage for images (PNG rows, .npz maps, maps on the "
                       "photo, a contact sheet, a predictions CSV)")
    p.add_argument("model", help="package folder (tltrain export) or run folder (its best checkpoint)")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layers", default=None, help="comma-separated module names (default: the output of every "
                   "stage, from timm's feature_info)")
    p.add_argument("--target", default="predicted", help="predicted | true | a class index (default: predicted)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser("convert-weights", help="rewrite weights (a .pth/.pt/.bin file, run folder or package) as "
                       "one .safetensors file that loads without running code")
    p.add_argument("weights", help="weights file, tltrain run folder or export package")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read a legacy file that holds pickled Python objects with plain pickle; loading it can run "
                        "code, so only for files whose author you trust")
    p.set_defaults(func=_cmd_convert_weights)

    p = sub.add_parser("pipeline", help="prepare -> step 1 -> export -> evaluate -> step-2 grid -> report -> package "
                       "as one SLURM DAG (local executor without SLURM); re-run to continue",
                       description="Run a pipeline config (configs/pipeline/NAME.yaml or a YAML file) as dependent "
                       "jobs. Run it again and finished stages are skipped by their records; failed ones are "
                       "submitted again. Follow it with `tltrain jobs OUT`.")
    p.add_argument("config", help="a shipped pipeline (e.g. demo) or a YAML file")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. out=/scratch/p sources.eyepacs.tasks=16")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", dest="local", action="store_true", default=None,
                       help="submitit's local executor even where SLURM is available")
    where.add_argument("--slurm", dest="local", action="store_false", help="fail unless SLURM is available")
    p.add_argument("--wait", action="store_true", help="SLURM: follow the DAG until it ends; exit 1 if a stage failed")
    p.add_argument("--dry-run", action="store_true", help="list the stages and their tasks; submit nothing")
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("demo", help="the main job end to end on bundled synthetic data")
    p.add_argument("--out", default="demo", help="working folder (default: ./demo)")
    p.add_argument("--quick", action="store_true", help="smallest sizes, for smoke tests")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from tltrain.engine.signals import install_early

        install_early()  # before the slow imports: a SIGTERM/USR2 during start-up becomes a clean preemption
        return _train(argv[1:])
    if argv and argv[0] in ("submit", "jobs"):
        # the launcher parses its own options (SLURM resources, then Hydra overrides)
        from tltrain.launch import cli_jobs, cli_submit

        try:
            if argv[0] == "jobs":  # a pipeline's folder: its DAG first (tltrain.pipeline.dag)
                from tltrain.pipeline.dag import pipeline_jobs

                code = pipeline_jobs(argv[1:])
                if code is not None:
                    return code
            return (cli_submit if argv[0] == "submit" else cli_jobs)(argv[1:])
        except TltrainError as exc:
            print_error(exc)
            return 2
    if argv and argv[0] == "pipeline":  # its options are flags: let them come after the overrides too
        argv = ["pipeline"] + [a for a in argv[1:] if a.startswith("--")] + [a for a in argv[1:]
                                                                           if not a.startswith("--")]
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except TltrainError as exc:
        print_error(exc)
        return 2
    return code or 0


def print_error(error) -> None:
    """The error on stderr (one line, except for reports built as lists, such as verify's); text that came from
    files (names, values, error text in status.json) is shown with terminal control characters escaped (ESC, CR,
    bidi overrides as \\xNN), never executed."""
    from tltrain.safe_io import printable

    print(f"error: {printable(error, None, keep_newlines=True)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
