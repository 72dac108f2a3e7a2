"""Compile the attention Triton kernels for sm_90a (H100) as the JIT specialises a real launch
(scripts/kernel_report.py: the package's own forward/backward, launches recorded and compiled
through the JIT), without a GPU; one JSON line per kernel variant with registers, spills and
shared memory from Triton's ptxas. Run in a process without TRITON_INTERPRET:

    python -m tests.attention.compile_triton            # every head dim and dtype
    python -m tests.attention.compile_triton 128 bf16   # only these head dims / dtypes

This catches what the interpreter does not check (non-constexpr globals, lowering errors) and
register spills, which the interpreter cannot show.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import kernel_report  # noqa: E402


def short_name(kernel: str) -> str:
    """_attn_fwd -> fwd, _attn_bwd_dkdv -> dkdv, _attn_bwd_dq -> dq, _bwd_delta -> delta."""
    name = kernel.lstrip("_")
    for prefix in ("attn_", "bwd_"):
        name = name.removeprefix(prefix)
    return name


def main(argv):
    dims = [int(a) for a in argv if a.isdigit()] or None
    dtypes = tuple(a for a in argv if a in kernel_report.TRITON_DTYPES) or kernel_report.TRITON_DTYPES
    for r in kernel_report.triton_rows(["90a"], dims, dtypes):
        print(json.dumps({"kernel": short_name(r["kernel"]), "d": r["d"], "dtype": r["dtype"], **r["config"],
                          "registers": r["registers"], "spill_stores": r["spill_stores"],
                          "spill_loads": r["spill_loads"], "shared_bytes": r["smem"]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
