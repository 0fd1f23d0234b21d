"""Compile the forward prefill kernel for Hopper (sm_90a) on a host without a GPU, and report what ptxas says.

Why: GPU time is scarce, and a kernel variant that fails to compile (or spills) for sm_90 should be
found before it is lent. Triton compiles ahead of time for a named target (frontend, MLIR passes, PTX),
and the ptxas it ships turns the PTX into SASS with ``-v``: registers per thread, spills, and the
shared memory Triton allotted. Nothing runs; speed is not predicted.

Variants: the default configs of ``_prefill_config`` for bf16 at D = 128 (128x128 / 8 warps and the
64x64 / 4 warps of L <= ~2048) and D = 64 (128x64 / 4 warps), TMA loads, causal, with lse, each with
the ALiBi window off and on. Usage: PYTHONPATH=. python tools/compile_sm90.py
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from alibi_export.kernels import triton_alibi as ka  # noqa: E402

CONFIGS = [((128, 128, 8, 3), 128), ((64, 64, 4, 3), 128), ((128, 64, 4, 3), 64)]


def compile_forward(cfg, head_dim, *, window, tma=True, dtype="bf16") -> dict:
    """One variant of ka._alibi_fwd_kernel compiled for sm_90a: ptxas's registers and spills, Triton's
    shared memory."""
    fn = ka._alibi_fwd_kernel
    const = dict(CAUSAL=True, BLOCK_M=cfg[0], BLOCK_N=cfg[1], HEAD_DIM=head_dim, WARP_SPEC=False, USE_TMA=tma,
                 DOT_PREC="tf32", ORDER=0, MERGE=False, STORE_LSE=True, WINDOW=window, DATA_BOUND=True,
                 COUNT=False)
    ptrs = {n: f"*{dtype}" for n in ("Q", "K", "V", "O")} | {n: "*fp32" for n in ("Slopes", "LSE", "KN", "VN", "CNT")}
    sig = {n: ptrs.get(n) or ("constexpr" if n in const else "fp32" if n in ("qk_scale", "gap") else "i32")
           for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": cfg[2], "num_stages": cfg[3]})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        info = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"config": list(cfg), "D": head_dim, "window": window, "tma": tma,
            "registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None,
            "shared_bytes": kernel.metadata.shared, "wgmma": "wgmma" in kernel.asm["ptx"]}


def main() -> None:
    for cfg, d in CONFIGS:
        for window in (False, True):
            print(json.dumps(compile_forward(cfg, d, window=window)), flush=True)


if __name__ == "__main__":
    main()
