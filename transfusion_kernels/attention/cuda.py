"""CUDA C++ backend of hybrid attention (csrc/attention/), per the backend contract in
``transfusion_kernels/attention/__init__.py``.

Kernels (fp16 / bf16, head dims 64 and 128, GQA, any row/head strides):

* forward, two implementations of the same algorithm (FlashAttention-2 style online softmax over
  the key tiles of each query tile's ``[kv_lo, kv_hi)``, FULL tiles without mask arithmetic):

  - ``"wgmma"``: warpgroup MMA with TMA loads of K/V tiles and an mbarrier pipeline
    (``attention_fwd_sm90.cu``), query tiles of ``ATTENTION_SM90_BLOCK_M`` (128). Runs on devices
    of compute capability 9.0 (H100/H200) when the extension was built with sm_90a;
  - ``"mma"``: mma.sync m16n8k16 with cp.async (``attention_fwd.cu``), query tiles of
    ``ATTENTION_BLOCK_M`` (128, 32 rows per warp), on every device from sm_80.

  ``"wgmma"`` runs where it can, else ``"mma"``; the environment variable
  ``TRANSFUSION_CUDA_ATTENTION_FWD`` (``auto`` | ``mma`` | ``wgmma``, read by ``prepare`` and
  ``forward``) forces one (``wgmma`` where it cannot run raises ``ValueError``). ``blocks[0]`` is
  the chosen forward's block size (``forward`` checks it).
* backward on mma.sync (``attention_bwd.cu``): delta = rowsum(dO * O), then dk/dv per key tile
  of 64 over the key table's query range (summed over the GQA group in registers) and dq per
  query tile of 64: deterministic, no atomics. On sm_90a devices, the wgmma backward
  (``attention_bwd_sm90.cu``) instead: dk/dv per key tile with each step's dQ share summed in
  fp32 in a fixed order (deterministic), no second P recomputation.

``tables`` = [forward query tiles, dq query tiles (64), dk/dv key tiles (64)] + the order in which
each kernel's blocks take those tiles (``masks.heaviest_first``: longest first, so that the long
tiles do not end in the last wave; block i of a head processes tile order[i]); ``blocks`` =
[forward block_m, 64, 64].

Inputs the kernels do not cover (float32, head dims other than 64 and 128): ``supports`` names
them, and ``backends.select`` runs the op on the next backend. Set
``TRANSFUSION_CUDA_ATTENTION_FALLBACK=0`` (read at call time) to get a ``ValueError`` naming the
unsupported dtype / head dim instead. ``prepare``, ``forward`` and ``backward`` called directly
with such inputs raise that ``ValueError``.

Inputs whose base address or row/head strides are not 16-byte multiples are copied to a
contiguous layout first (the kernels move 16-byte chunks). Outputs are newly allocated and
contiguous.
"""
from __future__ import annotations

import os

import torch

from transfusion_kernels.backends import require_extension
from transfusion_kernels.masks import heaviest_first

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_HEAD_DIMS = (64, 128)
FWD_ENV = "TRANSFUSION_CUDA_ATTENTION_FWD"
FALLBACK_ENV = "TRANSFUSION_CUDA_ATTENTION_FALLBACK"


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# what runs where
# ----------------------------------------------------------------------------------------------
def kernel_supports(q: torch.Tensor) -> bool:
    """Whether the compiled kernels cover q's dtype and head dim (fp16/bf16, D 64 or 128)."""
    return q.dtype in _DTYPE_NAMES and q.shape[-1] in _HEAD_DIMS


def _uncovered(q) -> str:
    return (f"the cuda attention kernels need float16 or bfloat16 q/k/v with head dim 64 or 128, got {q.dtype} "
            f"with head dim {q.shape[-1]}")


def supports(q: torch.Tensor, scale: float) -> str | None:
    """Why the kernels do not cover q (None when they do; any scale is covered). With
    TRANSFUSION_CUDA_ATTENTION_FALLBACK=0 an uncovered input is a ValueError instead."""
    if kernel_supports(q):
        return None
    if os.environ.get(FALLBACK_ENV, "1").strip().lower() in ("0", "false", "off", "no"):
        raise ValueError(f"{_uncovered(q)} (set {FALLBACK_ENV}=1 to run such inputs on triton or reference)")
    return f"{q.dtype} with head dim {q.shape[-1]} (its kernels take float16/bfloat16 with head dim 64 or 128)"


def _check_covered(q) -> None:
    if not kernel_supports(q):
        raise ValueError(f"{_uncovered(q)}; call hybrid_attention, which runs them on another backend")


_SM90: dict[int, bool] = {}


def sm90_supported(device) -> bool:
    """Whether the wgmma forward can run on ``device`` (compute capability 9.0, sm_90a build)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM90:
        with torch.cuda.device(index):
            _SM90[index] = bool(require_extension().attention_sm90_supported(index))
    return _SM90[index]


def forward_kernel(device) -> str:
    """The forward implementation ``prepare`` picks for ``device``: "wgmma" or "mma"."""
    choice = os.environ.get(FWD_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "mma", "wgmma"):
        raise ValueError(f"{FWD_ENV} must be 'auto', 'mma' or 'wgmma', got {os.environ[FWD_ENV]!r}")
    if choice == "mma":
        return "mma"
    ok = sm90_supported(device)
    if choice == "wgmma" and not ok:
        raise ValueError(
            f"{FWD_ENV}=wgmma needs a device of compute capability 9.0 and an extension built for sm_90a; "
            f"{torch.device(device)} cannot run it"
        )
    return "wgmma" if ok else "mma"


# ----------------------------------------------------------------------------------------------
# argument plumbing
# ----------------------------------------------------------------------------------------------
def _strides(t: torch.Tensor) -> tuple[int, int]:
    """(row, head) strides in elements; a size-1 dimension's stride is never used: 0."""
    return (0 if t.shape[0] == 1 else t.stride(0), 0 if t.shape[1] == 1 else t.stride(1))


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """The kernels copy 16-byte chunks: base and row/head strides 16-byte aligned, unit last stride."""
    rs, hs = _strides(t)
    if t.numel() and (t.data_ptr() % 16 or rs % 8 or hs % 8 or t.stride(2) != 1):
        return t.contiguous()
    return t


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """TMA tensor maps (the wgmma forward) describe [rows, heads, D] as nested dimensions: heads
    within a row or rows within a head; other stride patterns are copied to contiguous first."""
    rs, hs = _strides(t)
    n, h = t.shape[0], t.shape[1]
    if n > 1 and h > 1 and not (hs * h <= rs or rs * n <= hs):
        return t.contiguous()
    return t


def _check_table(t: torch.Tensor, n: int, block: int, device, what: str) -> None:
    rows = -(-n // block)
    if t.dim() != 2 or t.shape[0] != rows or t.shape[1] != 4 or t.dtype != torch.int32 or t.device != device:
        raise ValueError(
            f"tables: {what} must be int32 [{rows}, 4] on {device} for {n} tokens and block {block}, got "
            f"{t.dtype} {list(t.shape)} on {t.device}; build it with prepare(mask, q, k)"
        )


def _table_and_order(tables: list, i: int, n: int, block: int, device, what: str):
    """tables[i] checked against n tokens and the block size, and its tile order (tables[i + 3]
    when prepare's 6 tensors are given, else built here)."""
    if len(tables) not in (3, 6):
        raise ValueError(f"tables must be the list prepare(mask, q, k) returns (6 tensors), got {len(tables)}")
    t = tables[i]
    _check_table(t, n, block, device, what)
    order = tables[i + 3] if len(tables) == 6 else heaviest_first(t)
    rows = t.shape[0]
    if order.shape != (rows,) or order.dtype != torch.int32 or order.device != device or not order.is_contiguous():
        raise ValueError(
            f"tables[{i + 3}]: the tile order of {what} must be contiguous int32 [{rows}] on {device}, got "
            f"{order.dtype} {list(order.shape)} on {order.device}; build it with prepare(mask, q, k)"
        )
    return t, order


def _ints(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.int32).contiguous()


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# ----------------------------------------------------------------------------------------------
# the backend contract
# ----------------------------------------------------------------------------------------------
def prepare(mask, q, k):
    """Kernel inputs: tables [forward query tiles, dq query tiles, dk/dv key tiles, and their
    tile orders] and block sizes."""
    ext = require_extension()
    _check_covered(q)
    fwd_bm = ext.ATTENTION_SM90_BLOCK_M if forward_kernel(q.device) == "wgmma" else ext.ATTENTION_BLOCK_M
    blocks = [fwd_bm, ext.ATTENTION_BWD_BLOCK_M, ext.ATTENTION_BWD_BLOCK_N]
    tables = [mask.query_tiles(blocks[0]), mask.query_tiles(blocks[1]), mask.key_tiles(blocks[2])]
    tables = [t.to(device=q.device, dtype=torch.int32).contiguous() for t in tables]
    return tables + [heaviest_first(t) for t in tables], blocks


def forward(q, k, v, kv_start, kv_end, tables, blocks, scale):
    ext = require_extension()
    _check_covered(q)
    nq, hq, d = q.shape
    nk, hkv = k.shape[0], k.shape[1]
    kernel = forward_kernel(q.device)
    sm90 = kernel == "wgmma"
    block_m = ext.ATTENTION_SM90_BLOCK_M if sm90 else ext.ATTENTION_BLOCK_M
    if blocks[0] != block_m:
        raise ValueError(
            f"blocks[0] must be {block_m} (the {kernel} forward's query tile on {q.device}), got {blocks[0]}; "
            "build tables and blocks with prepare(mask, q, k)"
        )
    q_tiles, q_order = _table_and_order(tables, 0, nq, blocks[0], q.device, "tables[0] (forward query tiles)")
    q, k, v = (_kernel_ready(t) for t in (q, k, v))
    if sm90:
        if scale < 0:  # the wgmma forward takes scale >= 0: softmax(scale q.k) = softmax(-scale (-q).k)
            q, scale = -q, -scale
        q, k, v = (_tma_ready(t) for t in (q, k, v))
    out = _empty((nq, hq, d), q.dtype, q.device)
    lse = _empty((hq, nq), torch.float32, q.device)
    if nq:
        with torch.cuda.device(q.device):
            (ext.attention_fwd_sm90 if sm90 else ext.attention_fwd)(
                out.data_ptr(), lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                _ints(kv_start).data_ptr(), _ints(kv_end).data_ptr(), q_tiles.data_ptr(), nq, nk, hq, hkv, d,
                _strides(q), _strides(k), _strides(v), float(scale), _DTYPE_NAMES[q.dtype], _stream(q.device),
                q_order.data_ptr(),
            )
    return out, lse


def backward(dout, q, k, v, out, lse, kv_start, kv_end, tables, blocks, scale):
    ext = require_extension()
    _check_covered(q)
    nq, hq, d = q.shape
    nk, hkv = k.shape[0], k.shape[1]
    if list(blocks[1:3]) != [ext.ATTENTION_BWD_BLOCK_M, ext.ATTENTION_BWD_BLOCK_N]:
        raise ValueError(
            f"blocks[1:3] must be [{ext.ATTENTION_BWD_BLOCK_M}, {ext.ATTENTION_BWD_BLOCK_N}], got {list(blocks[1:3])}; "
            "build tables and blocks with prepare(mask, q, k)"
        )
    q_tiles, q_order = _table_and_order(tables, 1, nq, blocks[1], q.device, "tables[1] (dq query tiles)")
    k_tiles, k_order = _table_and_order(tables, 2, nk, blocks[2], q.device, "tables[2] (dk/dv key tiles)")
    q, k, v, out, dout = (_kernel_ready(t) for t in (q, k, v, out, dout))
    lse = lse.to(torch.float32).contiguous()
    dq = _empty((nq, hq, d), q.dtype, q.device)
    dk = _empty((nk, hkv, d), k.dtype, k.device)
    dv = _empty((nk, hkv, d), v.dtype, v.device)
    scratch = torch.empty((2, hq, nq), dtype=torch.float32, device=q.device)  # delta, lse * log2(e)
    # The wgmma backward's workspace (sm_90a devices): fp32 dQ [nq, hq, D], then int32 semaphores.
    workspace = None
    if nq and sm90_supported(q.device):
        workspace = torch.empty(nq * hq * d + hq * -(-nq // ext.ATTENTION_BWD_BLOCK_M), dtype=torch.float32,
                                device=q.device)
    if nq or nk:
        with torch.cuda.device(q.device):
            ext.attention_bwd(
                dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), scratch.data_ptr(), dout.data_ptr(), q.data_ptr(),
                k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), _ints(kv_start).data_ptr(),
                _ints(kv_end).data_ptr(), q_tiles.data_ptr(), k_tiles.data_ptr(), nq, nk, hq, hkv, d,
                _strides(q), _strides(k), _strides(v), _strides(out), _strides(dout), float(scale),
                _DTYPE_NAMES[q.dtype], _stream(q.device), q_order.data_ptr(), k_order.data_ptr(),
                dq_workspace=0 if workspace is None else workspace.data_ptr(),
            )
    return dq, dk, dv
