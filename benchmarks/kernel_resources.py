"""Registers, spills, shared memory and tensor-core instructions of every Ben Graham kernel configuration, from a
real ahead-of-time compile for a chosen GPU architecture. Needs no GPU: Triton lowers to PTX and its bundled ptxas
assembles it, so a CPU machine sees what a GPU would run (and catches errors the interpreter lets through, such
as non-constexpr globals).

  python benchmarks/kernel_resources.py --arch 90 --out benchmarks/results/kernel_resources_sm90.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources.py compiles kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tltrain.kernels import blur_direct, blur_dot  # noqa: E402

POINTERS = {"img_ptr": "*u8", "taps_ptr": "*fp32", "tmp_ptr": "*fp32", "geom_ptr": "*fp32", "norm_ptr": "*fp32",
            "yprof_ptr": "*fp32", "xprof_ptr": "*fp32", "flip_ptr": "*i32"}
FLOATS = ("gain", "offset")
OUT_TYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "uint8": "*u8"}


def compile_kernel(kernel, constexprs: dict, out_type: str, num_warps: int, arch: int):
    """triton.compile for a GPUTarget: every non-pointer, non-float argument is an i32, like a launch would see."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "out_ptr":
            signature[name] = OUT_TYPES[out_type]
        else:
            signature[name] = POINTERS.get(name, "fp32" if name in FLOATS else "i32")
    version = tuple(int(v) for v in triton.__version__.split(".")[:2])
    if version >= (3, 3):
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(k),): v for k, v in constexprs.items()})
    elif version == (3, 2):  # torch 2.6
        source = ASTSource(fn=kernel, signature=signature, constants=dict(constexprs))
    else:  # triton 3.0/3.1 (torch 2.4/2.5): signature by index without the constexprs
        source = ASTSource(fn=kernel, signature={i: t for i, t in enumerate(signature.values()) if t != "constexpr"},
                           constants={names.index(k): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers per thread and spill bytes, from ptxas -v on the kernel's PTX (the same assembler Triton uses)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(ptxas), f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(src) + ".cubin"],
                              capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"registers": registers, "spill_store_bytes": spills[0] if spills else 0,
            "spill_load_bytes": spills[1] if len(spills) > 1 else 0}


def configurations():
    """(name, kernel, constexprs, num_warps) for the dot tiles and the direct passes, fp16 output."""
    for block in blur_dot.BLOCKS:
        for span in blur_dot.SPANS:
            if span > block:
                for warps in (4, 8):
                    yield f"dot_b{block}_s{span}_w{warps}", blur_dot._ben_graham_dot_kernel, \
                        dict(NORMALIZE=True, BLOCK=block, SPAN=span), warps
    tile = dict(BLOCK_R=blur_direct.BLOCK_ROWS, BLOCK_C=blur_direct.BLOCK_COLS)
    yield "direct_rows", blur_direct._blur_rows_kernel, tile, 4
    yield "direct_cols_finish", blur_direct._blur_cols_finish_kernel, dict(NORMALIZE=True, **tile), 4


def compile_report(kernel, constexprs: dict, warps: int, arch: int) -> dict:
    compiled = compile_kernel(kernel, constexprs, "fp16", warps, arch)
    ptx = compiled.asm["ptx"]
    return {"num_warps": warps, "shared_bytes": compiled.metadata.shared, **ptxas_report(ptx, arch),
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync")}


def compile_isolated(name: str, arch: int) -> dict:
    """One configuration in a child process: some Triton versions abort (a C++ assertion, not an exception) on a
    tile they cannot lower, e.g. triton 3.0 on the sm_90 64/128 8-warp tile; that is a result, not the end."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        done = subprocess.run([sys.executable, __file__, "--arch", str(arch), "--only", name, "--out", str(out)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1][-400:]}
        return json.loads(out.read_text())["kernels"][name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10: 80 (A100), 90 (H100/H200)")
    parser.add_argument("--only", default="", help="substring of the configurations to compile (default: all)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    chosen = [c for c in configurations() if args.only in c[0]]
    rows = {}
    for name, kernel, constexprs, warps in chosen:
        rows[name] = r = (compile_report(kernel, constexprs, warps, args.arch) if len(chosen) == 1
                          else compile_isolated(name, args.arch))
        if "error" in r:
            print(f"{name:24s} failed: {r['error']}", flush=True)
            continue
        print(f"{name:24s} {r['registers']:4d} regs  spills {r['spill_store_bytes']:4d} B  shared "
              f"{r['shared_bytes']:6d} B  wgmma {r['wgmma']:3d}  mma.sync {r['mma_sync']:3d}", flush=True)
    result = {"arch": args.arch, "triton": triton.__version__, "kernels": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
