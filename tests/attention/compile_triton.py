"""Compile the attention Triton kernels for sm_90a (H100) with their GPU configs, without a GPU,
and report registers, spills and shared memory from ptxas. Run in a process without
TRITON_INTERPRET:

    python -m tests.attention.compile_triton            # one JSON line per kernel variant
    python -m tests.attention.compile_triton 128 bf16   # only these head dims / dtypes

This catches what the interpreter does not check (non-constexpr globals, lowering errors) and
register spills, which the interpreter cannot show.
"""
import inspect
import json
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from transfusion_kernels.attention import triton as tkt

TYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
POINTERS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes, from ptxas -v with the flags Triton itself uses."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm}", f.name, "-o", "/dev/null"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def variants(dims=(32, 64, 128, 256), dtypes=("bf16", "fp16", "fp32")):
    for dtype in dtypes:
        for d in dims:
            cfg = tkt.GPU_CONFIGS[(d, TYPES[dtype])]
            prec = "tf32x3" if dtype == "fp32" else "tf32"
            for name, fn, bm, bn, warps, stages in (
                ("fwd", tkt._attn_fwd, cfg.block_m, cfg.block_n, cfg.fwd_warps, cfg.fwd_stages),
                ("dkdv", tkt._attn_bwd_dkdv, cfg.kv_block_m, cfg.kv_block_n, cfg.kv_warps, cfg.kv_stages),
                ("dq", tkt._attn_bwd_dq, cfg.dq_block_m, cfg.dq_block_n, cfg.dq_warps, cfg.dq_stages),
                ("delta", tkt._bwd_delta, tkt.DELTA_BLOCK, None, 4, 3),  # launched with the defaults
            ):
                consts = {"GROUP": 4, "D": d, "DP": d, "BM": bm, "BN": bn, "PREC": prec, "I64": False}
                params = inspect.signature(fn.fn).parameters
                consts = {k: v for k, v in consts.items() if k in params}
                sig = {}
                for p in params:
                    if p in consts:
                        sig[p] = "constexpr"
                    elif p in POINTERS:
                        sig[p] = f"*{dtype}"
                    elif p in ("KVS", "KVE", "TAB", "ORDER"):
                        sig[p] = "*i32"
                    elif p in ("LSE", "DELTA"):
                        sig[p] = "*fp32"
                    elif p in ("qk_scale", "scale"):
                        sig[p] = "fp32"
                    else:
                        sig[p] = "i32"
                yield {"kernel": name, "d": d, "dtype": dtype, "bm": bm, "bn": bn, "warps": warps, "stages": stages}, fn, sig, consts


def main(argv):
    dims = tuple(int(a) for a in argv if a.isdigit()) or (32, 64, 128, 256)
    dtypes = tuple(a for a in argv if a in TYPES) or ("bf16", "fp16", "fp32")
    for info, fn, sig, consts in variants(dims, dtypes):
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": info["warps"], "num_stages": info["stages"]})
        info.update(ptxas_report(kernel.asm["ptx"], 90), shared_bytes=kernel.metadata.shared)
        print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
