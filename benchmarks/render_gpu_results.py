"""Fill the GPU section of benchmarks/RESULTS.md from the JSON files of `benchmarks/gpu_all.sh OUT_DIR`.

  python benchmarks/render_gpu_results.py OUT_DIR [--results benchmarks/RESULTS.md] [--print]

The section sits between the markers below and is replaced as a whole, so a later GPU session re-renders it.
A dry run (gpu_all.sh --dry-run, CPU, tiny sizes) renders the same tables labelled as such.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

BEGIN, END = "<!-- gpu_all:begin -->", "<!-- gpu_all:end -->"
PARTS = ["gpu_tests", "kernels", "loaders", "input_pipeline", "trainer", "strategies"]


def _load(folder: Path, name: str) -> dict:
    try:
        return json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {"status": "missing"}


def _num(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _quiet(d: dict) -> str:
    """The quiet-machine verdict of a part: load before/after, other processes' cores, refused and why."""
    if "recorded" not in d:
        return "-"
    text = f"load {_num(d.get('load_before'), 2)} -> {_num(d.get('load_after'), 2)}, others " \
        f"{_num(d.get('foreign_cores'), 2)} cores"
    return text + ("" if d["recorded"] else f"; REFUSED: {str(d.get('refused'))[:120]}")


def render(folder: Path) -> str:
    env = _load(folder, "environment")
    data = {name: _load(folder, name) for name in PARTS}
    dry = env.get("dry_run", False)
    dry_note = " — DRY RUN on the CPU at tiny sizes, not GPU figures" if dry else ""
    title = "GPU figures (`benchmarks/gpu_all.sh`)" + dry_note
    lines = [BEGIN, f"## {title}", "",
             f"Device: {env.get('gpu') or 'CPU (no GPU)'}; date {env.get('date', '?')}; torch {env.get('torch')}, "
             f"triton {env.get('triton')}, DALI {env.get('dali')}, DeepSpeed {env.get('deepspeed')}, "
             f"timm {env.get('timm')}, Python {env.get('python')}.", "",
             "| part | status | seconds (budget) | quiet machine (benchmarks/quiet.py) |", "|---|---|---|---|"]
    for name in PARTS:
        d = data[name]
        lines.append(f"| {name} | {d.get('status')} | {_num(d.get('seconds'))} ({_num(d.get('budget_s'))}) | "
                     f"{_quiet(d)} |")
    refused = [name for name in PARTS if data[name].get("recorded") is False]
    if refused:
        lines += ["", f"**Refused (not figures: the machine was not quiet): {', '.join(refused)}.** Their numbers "
                      "below are shown only to debug the run; measure them again."]

    t = data["gpu_tests"]
    failing = f"; failing: {', '.join(t['failed_tests'])}" if t.get("failed_tests") else ""
    lines += ["", f"**a. GPU tests**: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                  f"{t.get('skipped', 0)} skipped" + failing]

    k = data["kernels"]
    if "variants" in k:
        lines += ["", f"**b. Kernels** (batch {k.get('batch')}, {k.get('size')}², {k.get('taps')} taps, fp16 out; copy "
                      f"bandwidth {_num(k.get('copy_bandwidth_GB_per_s'), 0)} GB/s; "
                      "goal >= 20x the torch reference)", "",
                  "| variant | images/s | x torch reference | % of copy bandwidth | max grey error |",
                  "|---|---|---|---|---|"]
        for name, r in k["variants"].items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'][:80]} | | | |")
            else:
                lines.append(f"| {name} | {_num(r['images_per_s'], 0)} | "
                             f"{_num(r.get('speedup_vs_torch_reference'), 2)} | "
                             f"{_num(100 * r['fraction_of_copy_bandwidth'], 2)} | "
                             f"{_num(r.get('max_grey_error_vs_reference'))} |")

    lo = data["loaders"]
    if lo.get("results"):
        lines += ["", f"**c. Loaders** (model size {lo.get('model_size')}, batch {lo.get('batch')}, "
                      f"{lo.get('workers')} workers; goal: full preprocessing >= 1.0x the plain DALI chain)", "",
                  "| source | PIL DataLoader | plain DALI decode+resize | DALI full Ben Graham | full / plain "
                  "| full / PIL |",
                  "|---|---|---|---|---|---|"]
        for r in lo["results"]:
            lines.append(f"| {r['source']} | {_num(r['pil_dataloader_img_s'])} | {_num(r['dali_plain_img_s'])} | "
                         f"{_num(r['dali_full_img_s'])} | {_num(r['dali_full_vs_plain'], 2)} | "
                         f"{_num(r['dali_full_vs_pil'], 2)} |")

    ip = data["input_pipeline"]
    if ip.get("results"):
        lines += ["", f"**d. Input-pipeline efficiency** ({ip.get('precision')}, channels_last; goal >= 0.95)", "",
                  "| model | batch | backend | synthetic img/s | with the loader | efficiency |",
                  "|---|---|---|---|---|---|"]
        for r in ip["results"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['backend']} | {_num(r['synthetic_img_s'])} | "
                         f"{_num(r['loader_img_s'])} | {_num(r['efficiency'], 3)} |")

    tr = data["trainer"]
    if "engine_over_bare" in tr:
        lines += ["", f"**e. Trainer overhead** ({tr.get('arch')} @{tr.get('image_size')}, "
                      f"batch {tr.get('batch_size')}, {tr.get('precision')}): "
                      f"engine {_num(tr['engine_images_per_s'])} img/s vs bare loop "
                      f"{_num(tr['bare_images_per_s'])} img/s = {_num(tr['engine_over_bare'], 3)} (goal >= 0.97)"]

    st = data["strategies"]
    if st.get("results"):
        lines += ["", "**f. Shipped presets, world size 1** (torchrun; NCCL on a GPU, gloo on the CPU)", "",
                  "| preset | exit | images/s (last epoch) | wall s |", "|---|---|---|---|"]
        for r in st["results"]:
            lines.append(f"| {r['preset']} | {r['exit_code']} | {_num(r.get('images_per_s'))} | "
                         f"{_num(r.get('wall_s'))} |")
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    parser.add_argument("--print", action="store_true", help="print the section instead of writing RESULTS.md")
    args = parser.parse_args()
    section = render(Path(args.folder))
    if args.print:
        print(section)
        return
    path = Path(args.results)
    text = path.read_text() if path.exists() else "# Measured results\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    print(f"{path}: GPU section rendered from {args.folder}")


if __name__ == "__main__":
    main()
