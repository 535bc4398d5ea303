"""Compile every Triton kernel here for an NVIDIA architecture, on a machine without a GPU.

Triton's interpreter (how the tests run the kernels on CPU) executes the Python of a kernel and
so accepts things the compiler rejects; this runs the real pipeline (Triton IR -> LLVM -> PTX ->
ptxas, all shipped inside the triton wheel) with no driver, for each kernel under the flag
combinations it is launched with, and reports registers and spills.

Run: python -m kernels.triton.compile_check [--arch 80 90] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time


def _signature(fn, consts: dict, dtype: str, low: set[str]) -> dict:
    """Pointer arguments named *_ptr: those in `low` in `dtype`, seq_idx int32, the rest float32."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "seq_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in low else "*fp32"
        else:
            sig[name] = "i32"
    return sig


def _cases(quick: bool):
    from kernels.triton import conv1d, selective_scan, ssd

    scan_low = {"u_ptr", "delta_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "dz_ptr", "B_ptr", "C_ptr"}
    conv_low = {"x_ptr", "y_ptr", "dy_ptr", "init_ptr", "dx_ptr", "dinit_ptr"}
    ssd_low = {"x_ptr", "B_ptr", "C_ptr", "dx_ptr"}
    on_off = [True] if quick else [True, False]
    for dtype, flag in itertools.product(["bf16"] if quick else ["bf16", "fp32", "fp16"], on_off):
        scan = dict(HAS_D=flag, HAS_Z=flag, HAS_BIAS=flag, SOFTPLUS=flag, HAS_SEQ=flag, K=64, BLOCK_N=16)
        for block in [16] if quick else [8, 16, 32]:
            yield selective_scan._scan_fwd.fn, dict(scan, SAVE_CKPT=True, BLOCK_D=block), dtype, scan_low, 4
            yield selective_scan._scan_bwd.fn, dict(scan, HAS_DLAST=True, BLOCK_D=block), dtype, scan_low, 4
        conv = dict(W=4, HAS_SEQ=flag, HAS_INIT=flag, BLOCK_D=16, BLOCK_L=64)
        for backward in (False, True):
            consts = dict(conv, HAS_BIAS=flag, SILU=flag, BACKWARD=backward)
            yield conv1d._conv_fwd, consts, dtype, conv_low, 8
        yield conv1d._conv_bwd_x, conv, dtype, conv_low, 8
        # Mamba-2 shapes: headdim 64, dstate 128
        tile = dict(HAS_SEQ=flag, Q=ssd.CHUNK, BP=64, BN=128)
        prec = "ieee" if dtype == "fp32" else "tf32"
        yield ssd._ssd_chunk_state, dict(tile, PREC=prec), dtype, ssd_low, 8
        yield ssd._ssd_pass_fwd, dict(HAS_INIT=flag, BLOCK=1024), dtype, ssd_low, 4
        yield ssd._ssd_pass_bwd, dict(BLOCK=1024), dtype, ssd_low, 4
        for backward in (False, True):
            yield ssd._ssd_chunk_out, dict(tile, BACKWARD=backward, PREC=prec), dtype, ssd_low, 8
        yield ssd._ssd_chunk_bwd, dict(tile, PREC=prec), dtype, ssd_low, 8


def _ptxas_usage(ptx: str, arch: int) -> str:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", path,
                              "-o", os.devnull], capture_output=True, text=True)
    lines = [ln.split(":", 1)[-1].strip() for ln in out.stderr.splitlines()
             if "registers" in ln or "spill" in ln]
    return "; ".join(lines[-2:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 = A100)")
    ap.add_argument("--quick", action="store_true", help="one flag combination per kernel (bf16)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter builds no compilable kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for arch in args.arch:
        target = GPUTarget("cuda", arch, 32)
        for fn, consts, dtype, low, warps in _cases(args.quick):
            start = time.perf_counter()
            kernel = triton.compile(ASTSource(fn, _signature(fn, consts, dtype, low), consts), target=target,
                                    options=dict(num_warps=warps, num_stages=2))
            flags = ",".join(k for k, v in consts.items() if v is True)
            sizes = ",".join(f"{k}={v}" for k, v in consts.items() if v is not True and v is not False)
            sizes += f",warps={warps}"
            print(f"sm_{arch} {fn.__name__} {dtype} [{flags}] {sizes}: {time.perf_counter() - start:.1f} s; "
                  f"{_ptxas_usage(kernel.asm['ptx'], arch)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
