"""Compile the diffusion Triton kernels for NVIDIA targets without a GPU (Triton's own ptxas),
and report registers and stack (spill) bytes. Run as a module in a process without TRITON_INTERPRET:

    python -m tests.diffusion.compile_triton     # prints one JSON line per kernel variant

This catches what the interpreter does not check (e.g. non-constexpr globals, libdevice calls,
type errors in the lowering) on machines with no GPU.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from transfusion_kernels.diffusion import triton as tkt

CUOBJDUMP = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    """Registers and spill/stack bytes of the cubin Triton built (its bundled cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    usage = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"registers": int(usage.group(1)), "stack_bytes": int(usage.group(2))}


def compile_kernel(fn, signature, constexprs, arch):
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})


def variants():
    for arch in (80, 90):
        for dtype in ("fp32", "bf16", "fp16"):
            ptr = f"*{dtype}"
            sig = {
                "sample_ptr": ptr,
                "mo_ptr": ptr,
                "coef_ptr": "*fp32",
                "noise_ptr": ptr,
                "out_ptr": ptr,
                "noise_out_ptr": ptr,
                "R": "i32",
                "L": "i32",
                "seed_lo": "i64",
                "seed_hi": "i64",
                "clip": "fp32",
            }
            # the noise-in variant also writes the flow velocity (a superset of the plain step's code)
            for name, draw, block in (("affine_draw", True, 512), ("affine_noise_in_velocity", False, 2048)):
                flags = dict(
                    HAS_MO=True,
                    NOISE_IN=not draw,
                    DRAW=draw,
                    STORE_NOISE=draw,
                    VELOCITY=not draw,
                    CLIP=True,
                    ACCURATE=True,
                    BLOCK_R=1,
                    BLOCK_L=block,
                )
                yield name, arch, dtype, tkt._affine_kernel, {**sig, **{k: "constexpr" for k in flags}}, flags
            sig = {
                "pred_ptr": ptr,
                "target_ptr": ptr,
                "minus_ptr": ptr,
                "w_ptr": "*fp32",
                "partial_ptr": "*fp32",
                "grad_ptr": ptr,
                "P": "i32",
                "C": "i32",
            }
            flags = dict(MINUS=True, GRAD=True, BLOCK_P=8, BLOCK_C=128)  # with the flow loss's minus operand
            yield "loss_minus", arch, dtype, tkt._loss_kernel, {**sig, **{k: "constexpr" for k in flags}}, flags


def main():
    for name, arch, dtype, fn, sig, flags in variants():
        kernel = compile_kernel(fn, sig, flags, arch)
        print(json.dumps({"kernel": name, "arch": arch, "dtype": dtype, **resource_usage(kernel.asm["cubin"])}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
