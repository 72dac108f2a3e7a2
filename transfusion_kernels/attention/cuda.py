"""CUDA C++ backend of hybrid attention (csrc/attention/), per the backend contract in
``transfusion_kernels/attention/__init__.py``.

Forward: a FlashAttention-2 style kernel on tensor cores (mma.sync m16n8k16, fp32 accumulators)
for fp16/bf16 and head dims 64 and 128: one block of 4 warps per (query tile of 64, query head),
key steps of 64 bounded by the mask's query-tile table, FULL steps without mask arithmetic, K/V
tiles copied with cp.async (V loads overlap Q K^T, the next K load overlaps P V).

The compiled extension has no backward kernel and no fp32 / other-head-dim forward yet; those
run on the Triton backend when triton can run (its tile tables are built in ``prepare``), else
on the reference backend. Both produce the same (out, lse) convention, so a forward from one
and a backward from the other compose.
"""
from __future__ import annotations

import torch

from transfusion_kernels.attention import reference
from transfusion_kernels.backends import BackendUnavailableError, _info, load_extension

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_HEAD_DIMS = (64, 128)


def _extension():
    ext, err = load_extension()
    if ext is None:
        raise BackendUnavailableError(err)
    return ext


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _triton_module(device):
    if _info("triton", torch.device(device)).available:
        from transfusion_kernels.attention import triton as tkt

        return tkt
    return None


def _kernel_supports(q) -> bool:
    return q.dtype in _DTYPE_NAMES and q.shape[-1] in _HEAD_DIMS


def prepare(mask, q, k):
    """tables = [query tiles for the CUDA forward, *Triton's tables]; blocks likewise."""
    ext = _extension()
    tables, blocks = [mask.query_tiles(ext.ATTENTION_BLOCK_M)], [ext.ATTENTION_BLOCK_M, ext.ATTENTION_BLOCK_N]
    tkt = _triton_module(q.device)
    if tkt is not None:
        t_tables, t_blocks = tkt.prepare(mask, q, k)
        tables += list(t_tables)
        blocks += list(t_blocks)
    return tables, blocks


def _fallback(q):
    """(module, takes_tables): where the work the kernels do not cover runs."""
    tkt = _triton_module(q.device)
    return (tkt, True) if tkt is not None else (reference, False)


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """The kernel copies rows with 16-byte cp.async: base and row/head strides 16-byte aligned."""
    if t.data_ptr() % 16 or t.stride(0) % 8 or t.stride(1) % 8:
        return t.contiguous()
    return t


def forward(q, k, v, kv_start, kv_end, tables, blocks, scale):
    ext = _extension()
    if not _kernel_supports(q):
        mod, takes_tables = _fallback(q)
        if takes_tables:
            return mod.forward(q, k, v, kv_start, kv_end, tables[1:], blocks[2:], scale)
        return mod.forward(q, k, v, kv_start, kv_end, [], [], scale)
    nq, hq, d = q.shape
    nk, hkv = k.shape[0], k.shape[1]
    q, k, v = _kernel_ready(q), _kernel_ready(k), _kernel_ready(v)
    out = _empty((nq, hq, d), q.dtype, q.device)
    lse = _empty((hq, nq), torch.float32, q.device)
    if nq:
        with torch.cuda.device(q.device):
            ext.attention_fwd(
                out.data_ptr(), lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                kv_start.data_ptr(), kv_end.data_ptr(), tables[0].data_ptr(), nq, nk, hq, hkv, d,
                (q.stride(0), q.stride(1)), (k.stride(0), k.stride(1)), (v.stride(0), v.stride(1)),
                float(scale), _DTYPE_NAMES[q.dtype], torch.cuda.current_stream(q.device).cuda_stream,
            )
    return out, lse


def backward(dout, q, k, v, out, lse, kv_start, kv_end, tables, blocks, scale):
    mod, takes_tables = _fallback(q)
    if takes_tables:
        return mod.backward(dout, q, k, v, out, lse, kv_start, kv_end, tables[1:], blocks[2:], scale)
    return mod.backward(dout, q, k, v, out, lse, kv_start, kv_end, [], [], scale)
