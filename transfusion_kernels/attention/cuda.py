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
  ``forward``) forces one (``wgmma`` where it cannot run raises ``ValueError``).
  ``plan.config.fwd_block_m`` is the chosen forward's block size (``forward`` checks it).
* backward on mma.sync (``attention_bwd.cu``): delta = rowsum(dO * O), then dk/dv per key tile
  of 64 over the key table's query range (summed over the GQA group in registers) and dq per
  query tile of 64: deterministic, no atomics. On sm_90a devices, the wgmma backward
  (``attention_bwd_sm90.cu``) instead: dk/dv per key tile with each step's dQ share summed in
  fp32 in a fixed order (deterministic), no second P recomputation.

``Plan``: the tile tables of the forward (query tiles), dq (query tiles of 64) and dk/dv (key
tiles of 64), each with the order in which the kernel's blocks take them (``plan.heaviest_first``:
longest first, so that the long tiles do not end in the last wave; block i of a head processes
tile order[i]), and the block sizes. Unions of up to ``MAX_INTERVALS`` intervals per query: the
query tables hold one run per interval slot (``plan.query_runs``), the kernels are compiled for
K = 1, 2 and 4 (a mask of 3 gets an empty fourth slot); more are named by ``supports``. Softcap
(``c * tanh(s / c)``) costs one ``tanh.approx`` per score, forward and backward.

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
from dataclasses import dataclass

import torch


from transfusion_kernels.attention.plan import KernelPlan, heaviest_first, key_tiles, query_runs
from transfusion_kernels.backends import require_extension

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_HEAD_DIMS = (64, 128)
MAX_INTERVALS = 4
_KERNEL_K = {1: 1, 2: 2, 3: 4, 4: 4}  # the mask's K -> the compiled kernels' K (empty slots added)
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
    return (
        f"the cuda attention kernels need float16 or bfloat16 q/k/v with head dim 64 or 128, got {q.dtype} "
        f"with head dim {q.shape[-1]}"
    )


def supports(q: torch.Tensor, scale: float, softcap: float = 0.0, num_intervals: int = 1) -> str | None:
    """Why the kernels do not cover q and the mask's intervals (None when they do; any scale and
    softcap are covered). With TRANSFUSION_CUDA_ATTENTION_FALLBACK=0 an uncovered dtype or head
    dim is a ValueError instead."""
    if num_intervals > MAX_INTERVALS:
        return (
            f"masks of {num_intervals} intervals per query (the cuda kernels take up to {MAX_INTERVALS}; "
            "more run on triton or the reference)"
        )
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


def _check_table(
    t: torch.Tensor, order: torch.Tensor, n: int, block: int, device, what: str, runs: int | None = None
) -> None:
    """A key table [tiles, 4], or with ``runs`` a query table [tiles, runs, 4] ([tiles, 4] for one run)."""
    rows = -(-n // block)
    shape = [rows, 4] if runs is None else [rows, runs, 4]
    ok_shape = list(t.shape) == shape or (runs == 1 and list(t.shape) == [rows, 4])
    if not ok_shape or t.dtype != torch.int32 or t.device != device or not t.is_contiguous():
        raise ValueError(
            f"plan.{what} must be contiguous int32 {shape} on {device} for {n} tokens and block {block}, got "
            f"{t.dtype} {list(t.shape)} on {t.device}; build the plan with prepare(mask, q, k)"
        )
    if order.shape != (rows,) or order.dtype != torch.int32 or order.device != device or not order.is_contiguous():
        raise ValueError(
            f"the tile order of plan.{what} must be contiguous int32 [{rows}] on {device}, got "
            f"{order.dtype} {list(order.shape)} on {order.device}; build the plan with prepare(mask, q, k)"
        )


def _kernel_k(k: int) -> int:
    if k not in _KERNEL_K:
        raise ValueError(
            f"the cuda kernels take 1 to {MAX_INTERVALS} intervals per query, got {k}; use backend='triton'"
        )
    return _KERNEL_K[k]


def _pad_runs(x: torch.Tensor, k: int) -> torch.Tensor:
    """Intervals [Nq, K] or query runs [tiles, K, 4] with empty slots (zeros) up to k."""
    pad = k - x.shape[1]
    if pad:
        x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], 1)
    return x


def _intervals(starts: torch.Tensor, ends: torch.Tensor):
    """((kv_start, kv_end), K): the intervals as int32 [Nq, K] contiguous with the kernels' K
    (unused slots empty; the caller keeps them alive across the launch: the kernels get their
    addresses)."""
    if starts.dim() == 1:
        starts, ends = starts[:, None], ends[:, None]
    k = _kernel_k(starts.shape[1])
    return tuple(_pad_runs(x.to(torch.int32), k).contiguous() for x in (starts, ends)), k


def _stream(device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# ----------------------------------------------------------------------------------------------
# the backend contract
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockSizes:
    fwd_block_m: int  # the chosen forward's query tile (wgmma or mma)
    bwd_block_m: int  # dq query tile
    bwd_block_n: int  # dk/dv key tile

    def to_list(self) -> list[int]:
        return [self.fwd_block_m, self.bwd_block_m, self.bwd_block_n]


@dataclass(frozen=True)
class Plan(KernelPlan):
    """The cuda kernels' view of one mask: block sizes, and per kernel its tile table and the
    order in which its blocks take the tiles (heaviest first)."""

    config: BlockSizes
    fwd_tiles: torch.Tensor  # [Nq / fwd_block_m, K, 4] query runs (K: the kernels', 1, 2 or 4)
    fwd_order: torch.Tensor
    dq_tiles: torch.Tensor  # [Nq / bwd_block_m, K, 4]
    dq_order: torch.Tensor
    dkdv_tiles: torch.Tensor  # [Nk / bwd_block_n, 4] key tiles
    dkdv_order: torch.Tensor

    @classmethod
    def config_from(cls, ints):
        if len(ints) != 3:
            raise ValueError(
                f"cuda plan block sizes are 3 ints, got {list(ints)}; build the plan with prepare(mask, q, k)"
            )
        return BlockSizes(*(int(x) for x in ints))


def prepare(mask, q, k) -> Plan:
    """The mask's plan: tile tables and block sizes of the forward and backward kernels."""
    ext = require_extension()
    _check_covered(q)
    k = _kernel_k(mask.num_intervals)
    fwd_bm = ext.ATTENTION_SM90_BLOCK_M if forward_kernel(q.device) == "wgmma" else ext.ATTENTION_BLOCK_M
    sizes = BlockSizes(fwd_bm, ext.ATTENTION_BWD_BLOCK_M, ext.ATTENTION_BWD_BLOCK_N)
    fwd, dq = (
        _pad_runs(query_runs(mask, bm), k).to(device=q.device, dtype=torch.int32).contiguous()
        for bm in (fwd_bm, sizes.bwd_block_m)
    )
    kv = key_tiles(mask, sizes.bwd_block_n).to(device=q.device, dtype=torch.int32).contiguous()
    return Plan(sizes, fwd, heaviest_first(fwd), dq, heaviest_first(dq), kv, heaviest_first(kv))


def forward(q, k, v, starts, ends, plan: Plan, scale, softcap=0.0):
    ext = require_extension()
    _check_covered(q)
    nq, hq, d = q.shape
    nk, hkv = k.shape[0], k.shape[1]
    kernel = forward_kernel(q.device)
    sm90 = kernel == "wgmma"
    block_m = ext.ATTENTION_SM90_BLOCK_M if sm90 else ext.ATTENTION_BLOCK_M
    if plan.config.fwd_block_m != block_m:
        raise ValueError(
            f"plan.config.fwd_block_m must be {block_m} (the {kernel} forward's query tile on {q.device}), got "
            f"{plan.config.fwd_block_m}; build the plan with prepare(mask, q, k)"
        )
    (kv_start, kv_end), runs = _intervals(starts, ends)
    _check_table(plan.fwd_tiles, plan.fwd_order, nq, block_m, q.device, "fwd_tiles", runs)
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
                out.data_ptr(),
                lse.data_ptr(),
                q.data_ptr(),
                k.data_ptr(),
                v.data_ptr(),
                kv_start.data_ptr(),
                kv_end.data_ptr(),
                plan.fwd_tiles.data_ptr(),
                nq,
                nk,
                hq,
                hkv,
                d,
                _strides(q),
                _strides(k),
                _strides(v),
                float(scale),
                _DTYPE_NAMES[q.dtype],
                _stream(q.device),
                plan.fwd_order.data_ptr(),
                num_intervals=runs,
                softcap=float(softcap),
            )
    return out, lse


def backward(dout, q, k, v, out, lse, starts, ends, plan: Plan, scale, softcap=0.0):
    ext = require_extension()
    _check_covered(q)
    nq, hq, d = q.shape
    nk, hkv = k.shape[0], k.shape[1]
    if [plan.config.bwd_block_m, plan.config.bwd_block_n] != [ext.ATTENTION_BWD_BLOCK_M, ext.ATTENTION_BWD_BLOCK_N]:
        raise ValueError(
            f"plan.config's backward blocks must be [{ext.ATTENTION_BWD_BLOCK_M}, {ext.ATTENTION_BWD_BLOCK_N}], got "
            f"{[plan.config.bwd_block_m, plan.config.bwd_block_n]}; build the plan with prepare(mask, q, k)"
        )
    (kv_start, kv_end), runs = _intervals(starts, ends)
    _check_table(plan.dq_tiles, plan.dq_order, nq, plan.config.bwd_block_m, q.device, "dq_tiles", runs)
    _check_table(plan.dkdv_tiles, plan.dkdv_order, nk, plan.config.bwd_block_n, q.device, "dkdv_tiles")
    q, k, v, out, dout = (_kernel_ready(t) for t in (q, k, v, out, dout))
    lse = lse.to(torch.float32).contiguous()
    dq = _empty((nq, hq, d), q.dtype, q.device)
    dk = _empty((nk, hkv, d), k.dtype, k.device)
    dv = _empty((nk, hkv, d), v.dtype, v.device)
    scratch = torch.empty((2, hq, nq), dtype=torch.float32, device=q.device)  # delta, lse * log2(e)
    # The wgmma backward's workspace (sm_90a devices): fp32 dQ [nq, hq, D], then int32 semaphores.
    workspace = None
    if nq and sm90_supported(q.device):
        workspace = torch.empty(
            nq * hq * d + hq * -(-nq // ext.ATTENTION_BWD_BLOCK_M), dtype=torch.float32, device=q.device
        )
    if nq or nk:
        with torch.cuda.device(q.device):
            ext.attention_bwd(
                dq.data_ptr(),
                dk.data_ptr(),
                dv.data_ptr(),
                scratch.data_ptr(),
                dout.data_ptr(),
                q.data_ptr(),
                k.data_ptr(),
                v.data_ptr(),
                out.data_ptr(),
                lse.data_ptr(),
                kv_start.data_ptr(),
                kv_end.data_ptr(),
                plan.dq_tiles.data_ptr(),
                plan.dkdv_tiles.data_ptr(),
                nq,
                nk,
                hq,
                hkv,
                d,
                _strides(q),
                _strides(k),
                _strides(v),
                _strides(out),
                _strides(dout),
                float(scale),
                _DTYPE_NAMES[q.dtype],
                _stream(q.device),
                plan.dq_order.data_ptr(),
                plan.dkdv_order.data_ptr(),
                dq_workspace=0 if workspace is None else workspace.data_ptr(),
                num_intervals=runs,
                softcap=float(softcap),
            )
    return dq, dk, dv
