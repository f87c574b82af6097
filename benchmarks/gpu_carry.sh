#!/usr/bin/env bash
# Run it in the session's main checkout (the device tool sends that one). Prepares the wheels that benchmarks/gpu_all.sh needs on the lent GPU machine (Python 3.12, x86_64, which has torch,
# triton, timm and tensorboard but not DALI, DeepSpeed, webdataset, Hydra or submitit). Run here, in the repo root:
#   bash benchmarks/gpu_carry.sh
# It writes the small wheels to .whl/ (carried with `carry: [".whl"]`, under the 64 MiB a call) and splits the DALI
# and nvJPEG wheels (~245 MB) into .devcarry/ parts with ../shared/tools/device-carry, which prints the back-to-back device
# calls that copy them to /tmp/devcarry there; gpu_all.sh installs both into /tmp/site. Versions: constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { grep -i "^$1==" constraints.txt | head -1; }
platforms=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
exclude=$(git rev-parse --git-path info/exclude)
for d in .whl .devcarry; do grep -qx "/$d/" "$exclude" 2>/dev/null || echo "/$d/" >> "$exclude"; done
rm -rf .whl /tmp/tltrain-dali-wheels && mkdir -p .whl /tmp/tltrain-dali-wheels

# binary wheels (compiled or universal) for the device's Python
small=(webdataset braceexpand hydra-core omegaconf submitit hydra-submitit-launcher cloudpickle hjson ninja msgpack
       py-cpuinfo psutil pydantic pydantic_core annotated-types typing-inspection einops astunparse gast makefun
       nvtx optree libcst
       numba llvmlite  # the CPU kernels (tltrain/preprocess_cpu.py; llvmlite ~45 MB; without them the torch code runs)
       typing_extensions)  # pydantic_core 2.50 imports typing_extensions.Sentinel (4.14+); the image's may be older
for name in "${small[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" -d .whl "$(pin "$name")"
done
# source-only packages on PyPI: build a pure-Python wheel here (no compiled parts; DeepSpeed compiles its ops JIT)
for name in deepspeed antlr4-python3-runtime; do
    python3 -m pip wheel -q --no-deps -w .whl "$(pin "$name")"
done
# with DALI, not in .whl: every wheel with files under nvidia/ must go in ONE pip install, since a later
# `pip install --target --upgrade` replaces the whole nvidia/ folder. nvidia-nvjpeg: libnvjpeg.so.13 for
# nvImageCodec's GPU JPEG decoder (not in the image's package list; found at nvidia/cu13/lib by its RPATH).
for name in nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13 nvidia-nvjpeg; do
    python3 -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" -d /tmp/tltrain-dali-wheels "$(pin "$name")"
done
du -sh .whl /tmp/tltrain-dali-wheels
"${SHARED_DIR:-../shared}/tools/device-carry" /tmp/tltrain-dali-wheels
echo 'In the last call above, <your command> can be `true`. Then, at once (the machine keeps /tmp only while warm):'
echo '  carry [".whl"], command: bash benchmarks/gpu_all.sh "$OUT", timeout_s 570 (the script ends by 525 s);'
echo '  then: python benchmarks/render_gpu_results.py <files_at folder> && git add benchmarks/RESULTS.md'
