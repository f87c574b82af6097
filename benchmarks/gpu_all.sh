#!/usr/bin/env bash
# Every GPU figure of tltrain in one device call (<= 9 min on an H100/H200), each part under its own time budget
# and writing one JSON file to OUT_DIR even when a later part fails or runs out of time:
#   a gpu_tests.json      pytest -m gpu (kernels, the DALI GPU pipeline, loaders on CUDA)
#   b kernels.json        Triton exact + tensor-core kernels vs the torch reference and copy bandwidth (512^2, b256)
#   c loaders.json        DALI GPU full preprocessing vs a plain DALI decode+resize chain vs a PIL DataLoader
#   d input_pipeline.json training img/s with the real loader vs synthetic GPU tensors (resnet50@224, resnet18@512)
#   e trainer.json        engine vs a bare loop, same model and data (overhead)
#   f strategies.json     DDP (NCCL) and DeepSpeed ZeRO-2 bf16 smoke runs, world size 1, with img/s
# Then `python benchmarks/render_gpu_results.py OUT_DIR` fills the GPU section of benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_all.sh OUT_DIR            on a machine with a GPU (the device tool: OUT_DIR="$OUT")
#   bash benchmarks/gpu_all.sh --dry-run OUT_DIR  every part on the CPU at tiny sizes (CI runs this)
#
# The lent GPU machine has torch, triton, timm and tensorboard but not DALI, DeepSpeed, webdataset, Hydra or
# submitit: carry them as wheels. Here: `bash benchmarks/gpu_carry.sh` downloads them into .whl/ (and splits the
# DALI wheels with ../shared/tools/device-carry into .devcarry/ parts); this script installs whatever it finds in
# .whl/ or /tmp/devcarry/ into /tmp/site before the first part (DALI only when device-carry's last call did not).
# The whole run ends by GPU_ALL_TOTAL_S (525) seconds after its start, inside one 9-minute device call.
# Quiet rule (benchmarks/quiet.py): on the GPU every benchmark part waits up to 20 s for the load average to fall
# below 0.75 x cores (the previous part's workers raise it) and exits 3 when its figure is refused (load above that
# when it started, or other processes busy while it measured): the part's JSON keeps its figures with "recorded":
# false and the reason, and part() marks it "refused". The dry run passes --smoke: CI's loaded machine never fails it.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:?usage: gpu_all.sh [--dry-run] OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
started=$(date +%s)

# --- install what the device image lacks (no-op here: the venv has everything) ---------------------------
# A call earlier in the same lease (device-carry's last call, or a first try of this script) may have filled
# /tmp/site already: use it rather than unpacking the ~250 MB of DALI wheels again.
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
wheels=()
[ -d .whl ] && wheels+=(.whl/*.whl)
[ ! -d /tmp/site/nvidia/dali ] && ls /tmp/devcarry/*.whl >/dev/null 2>&1 && wheels+=(/tmp/devcarry/*.whl)
if [ ${#wheels[@]} -gt 0 ] && ! $PY -c "import nvidia.dali, deepspeed, webdataset, hydra, submitit" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
        || echo "wheel install failed: the parts that need the missing packages will say so"
    case ":${PYTHONPATH:-}:" in *:/tmp/site:*) ;; *) export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ;; esac
fi
if ! $PY -c "import tltrain.kernels" 2>/dev/null; then
    # always from this tree: pip --target keeps an existing copy, so a rerun after a fix would test the old code
    rm -rf /tmp/tltrain-site
    $PY -m pip install -q --no-deps --no-build-isolation --target /tmp/tltrain-site . || exit 1
    export PYTHONPATH=/tmp/tltrain-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}

if [ $dry = 1 ]; then
    device=cpu
    export DS_ACCELERATOR=cpu TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
    device=cuda
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv > "$out/gpu.txt" 2>&1
fi
$PY - "$out/environment.json" "$device" <<'PYEOF'
import json, sys
sys.path.insert(0, "benchmarks")
from gpu_common import provenance
json.dump({**provenance(sys.argv[2]), "dry_run": sys.argv[2] == "cpu"}, open(sys.argv[1], "w"), indent=1, default=str)
PYEOF

# part NAME BUDGET_S COMMAND...: runs COMMAND (which writes $out/NAME.json) under `timeout BUDGET_S`; when it did not
# write its JSON (failure, time-out, crash) a JSON with the exit status and the log tail takes its place. A command
# that fails keeps the JSON it wrote, with status "failed" ("timeout" on a time-out; "refused" for exit 3 with
# "recorded": false in the JSON: a benchmark that measured but refused its figure, benchmarks/quiet.py).
status=0
part() {
    local name=$1 budget=$2
    shift 2
    local t0=$(date +%s)
    # the whole run must end by $deadline: a part gets what is left, less 15 s for the kill grace and its JSON
    local left=$(( deadline - t0 - 15 ))
    if [ $left -lt 5 ]; then
        status=1
        $PY -c 'import json, sys; json.dump({"part": sys.argv[2], "status": "skipped", "seconds": 0, "budget_s": 0,
    "planned_budget_s": int(sys.argv[3]), "reason": "no time left before the run deadline"}, open(sys.argv[1], "w"), indent=1)' \
            "$out/$name.json" "$name" "$budget"
        echo "=== part $name: skipped (no time left before the deadline)"
        return
    fi
    [ $left -lt $budget ] && budget=$left
    echo "=== part $name (budget ${budget}s): $*"
    timeout --kill-after=10 "$budget" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ $rc -ne 0 ] || [ ! -s "$out/$name.json" ]; then
        status=1
        $PY - "$out/$name.json" "$name" "$rc" "$took" "$budget" "$out/$name.log" <<'PYEOF'
import json, os, sys
path, name, rc, took, budget, log = sys.argv[1:7]
previous = {}
if os.path.exists(path):
    try:
        previous = json.load(open(path))
    except ValueError:
        pass
tail = open(log, errors="replace").read()[-3000:] if os.path.exists(log) else ""
state = ("timeout" if rc in ("124", "137") else
         "refused" if rc == "3" and previous.get("recorded") is False else "failed")
json.dump({**previous, "part": name, "status": state, "exit_code": int(rc), "seconds": int(took), "budget_s": int(budget),
           "log_tail": tail}, open(path, "w"), indent=1)
PYEOF
        echo "    part $name: rc=$rc after ${took}s (see $name.log)"
    else
        $PY - "$out/$name.json" "$took" "$budget" <<'PYEOF'
import json, sys
path, took, budget = sys.argv[1:4]
data = json.load(open(path))
data.update({"status": data.get("status", "ok"), "seconds": int(took), "budget_s": int(budget)})
json.dump(data, open(path, "w"), indent=1)
PYEOF
        echo "    part $name: ok in ${took}s"
    fi
}

# The GPU run is one device call of at most 9 minutes: everything, install included, ends by started + 525 s.
deadline=$(( started + ${GPU_ALL_TOTAL_S:-$( [ $dry = 1 ] && echo 3600 || echo 525 )} ))
# the benchmarks' quiet rule: the dry run passes --smoke (a loaded machine, CI, does not fail a part; the JSON still
# says whether the figure was quiet); the GPU run does not, so a refused figure exits 3 and its part says "refused"
if [ $dry = 1 ]; then quiet_args=(--smoke --quiet-wait 5); else quiet_args=(--quiet-wait 20); fi

if [ $dry = 1 ]; then
    part gpu_tests 300 $PY benchmarks/pytest_json.py "$out/gpu_tests.json" tests -m gpu  # the GPU command: collects all
    part kernels 300 $PY benchmarks/bench_kernels.py --device cpu --small "${quiet_args[@]}" --out "$out/kernels.json"
    part loaders 300 $PY benchmarks/bench_gpu_loaders.py --device cpu --images 8 --sources 256 640 --model-size 64 \
        --batch 4 --workers 1 --epochs 1 "${quiet_args[@]}" --out "$out/loaders.json"
    part input_pipeline 300 $PY benchmarks/bench_input_pipeline.py --device cpu --small "${quiet_args[@]}" \
        --out "$out/input_pipeline.json"
    part trainer 300 $PY benchmarks/bench_trainer.py --small --no-compile "${quiet_args[@]}" \
        --out "$out/trainer.json"
    part strategies 900 $PY benchmarks/bench_strategies.py --device cpu --small "${quiet_args[@]}" \
        --out "$out/strategies.json"
else
    # budgets add up to 8 min; the deadline above trims the last ones if the install or a part ran long.
    # No --smoke: a part whose figure is refused exits 3 and is marked "refused" (its JSON keeps the figures).
    part gpu_tests 75 $PY benchmarks/pytest_json.py "$out/gpu_tests.json" tests -m gpu
    part kernels 75 $PY benchmarks/bench_kernels.py --device cuda --batch 256 --size 512 "${quiet_args[@]}" \
        --out "$out/kernels.json"
    part loaders 120 $PY benchmarks/bench_gpu_loaders.py --device cuda --images 1024 --sources 512 2592 \
        --model-size 512 --batch 256 --workers 16 "${quiet_args[@]}" --out "$out/loaders.json"
    # 3 rounds of each feed in turns at 20 + 5 steps: about 1.5x the steps of the old single 40 + 8 per feed
    part input_pipeline 90 $PY benchmarks/bench_input_pipeline.py --device cuda --steps 20 --warmup 5 \
        "${quiet_args[@]}" --out "$out/input_pipeline.json"
    part trainer 45 $PY benchmarks/bench_trainer.py --arch resnet50 --image-size 224 --batch-size 128 --steps 30 \
        --no-compile "${quiet_args[@]}" --out "$out/trainer.json"
    part strategies 75 $PY benchmarks/bench_strategies.py --device cuda --timeout 35 "${quiet_args[@]}" \
        --out "$out/strategies.json"
fi
echo "gpu_all: $(( $(date +%s) - started ))s in all; results in $out (status $status)"
exit $status
