"""Triton interval-mask attention (FlashAttention-2 style), forward and backward.

Query i sees keys ``kv_start[i] <= j < kv_end[i]``. The mask's tile tables tell each program
which key (or query) blocks to visit and which of them every row sees in full:

* forward and dq, one program per (query head, query tile): key blocks outside
  ``[kv_lo, kv_hi)`` are never loaded; blocks inside ``[full_lo, full_hi)`` (FULL) run without
  any mask arithmetic; the few blocks in between (PARTIAL) apply the interval test.
* dk/dv, one program per (kv head, key tile): query blocks come from the key table's
  ``[q_lo, q_hi)``, FULL inside ``[qfull_lo, qfull_hi)``; the program loops over the query heads
  of its GQA group, so dk/dv are summed without atomics (deterministic) and K/V are never copied.
* delta = rowsum(dout * out) is a small preprocessing kernel.

The FULL run of blocks is anchored at ``full_lo`` (not at a multiple of the block size), so a
document that starts mid-tile still gets unmasked blocks; the PARTIAL blocks before it end
exactly at ``full_lo`` and may start below ``kv_lo``. Rows outside the visited range are clamped
into it rather than masked: loads need no predicates, and the clamped duplicates fail the
interval test of PARTIAL blocks (FULL blocks never contain any). With the TMA flag (Hopper) the
forward and dq read K/V through a tensor descriptor over the run's rows ``[kv_lo, kv_hi)``
only, which reads every row outside as 0: the same guarantee, no row outside is ever read.

Hopper configs (configs.json, benchmarks/results/static/triton-sm90a.md): TMA loads, 128 x 128
forward tiles, and at head dims 64 and 256 dk/dv accumulated transposed (``KT``) so that no
wgmma is split to 16 columns or issued twice. Triton 3.9's automatic warp specialisation is not
used: it leaves a loop whose body branches (the PARTIAL masking) unpartitioned.

Softmax runs in fp32 in base 2 (``log2(e)`` folded into the scale); ``lse`` is stored in natural
log, ``-inf`` for a query that sees nothing (its output and gradients are 0). Head dims up to
256 are padded to a power of two inside the kernels; any N; any strides with a unit last one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from transfusion_kernels.attention.ops import _tokens
from transfusion_kernels.attention.plan import KernelPlan, heaviest_first, key_tiles, query_runs

_LOG2E = 1.4426950408889634
# kernels may only read globals that are constexpr
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# Block configuration
# ----------------------------------------------------------------------------------------------
# KernelConfig.flags bits
TMA = 1  # the forward's and dq's K/V tiles come in through TMA
KT = 2  # dk/dv: scores [queries, keys] and dk^T, dv^T [D, keys] += Q^T, dO^T x dS, P: the wide
# head dim is the GEMMs' M, shared by the warpgroups, so no GEMM is split to 16 columns or issued twice


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of one kernel: ``block_m`` query rows and ``block_n`` key
    rows per tile or loop step (which of the two is the program's tile depends on the kernel),
    and ``flags`` (``TMA``: the loop's tiles are loaded through tensor descriptors, on Hopper,
    and the interpreter, whenever the inputs allow it; pointer loads otherwise; ``KT``: the dk/dv
    kernel accumulates transposed)."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    flags: int = 0

    def to_list(self) -> list[int]:
        """block_m, block_n, warps, stages, then flags when set (flags < 16 <= any block size)."""
        return [self.block_m, self.block_n, self.warps, self.stages] + ([self.flags] if self.flags else [])

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            b = getattr(self, name)
            if not isinstance(b, int) or b < 16 or b & (b - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {b!r}")
        if not isinstance(self.warps, int) or self.warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"warps must be 1, 2, 4, 8 or 16, got {self.warps!r}")
        if not isinstance(self.stages, int) or not 1 <= self.stages <= 8:
            raise ValueError(f"stages must be in [1, 8], got {self.stages!r}")
        if not isinstance(self.flags, int) or self.flags & ~(TMA | KT):
            raise ValueError(f"flags must be a combination of TMA ({TMA}) and KT ({KT}), got {self.flags!r}")


@dataclass(frozen=True)
class AttentionConfig:
    """The three kernels' configs. The program tiles (and so the mask's tile tables) are
    ``fwd.block_m`` query rows, ``dkdv.block_n`` key rows and ``dq.block_m`` query rows; the other
    block size of each kernel is the step of its loop."""

    fwd: KernelConfig
    dkdv: KernelConfig
    dq: KernelConfig

    def to_list(self) -> list[int]:
        """12 ints (fwd, dkdv, dq; each block_m, block_n, warps, stages), each kernel's four
        followed by its flags when it has any: the ``blocks`` that ``prepare`` hands to
        ``forward``/``backward`` through the custom ops."""
        return [x for c in (self.fwd, self.dkdv, self.dq) for x in c.to_list()]

    @classmethod
    def from_list(cls, values) -> "AttentionConfig":
        values = [int(x) for x in values]
        kernels, i = [], 0
        while i + 4 <= len(values) and len(kernels) < 3:
            n = 5 if i + 4 < len(values) and values[i + 4] < 16 else 4  # a flags int, not a block size
            kernels.append(values[i : i + n])
            i += n
        if len(kernels) != 3 or i != len(values):
            raise ValueError(
                f"a triton attention config is 12 ints (fwd, dkdv, dq: block_m, block_n, warps, "
                f"stages; each kernel's optionally followed by its flags), got {len(values)}; build "
                f"it with prepare(mask, q, k)"
            )
        return cls(*(KernelConfig(*k) for k in kernels))


DELTA_BLOCK = 32  # rows per program of the delta = rowsum(dout * out) kernel

# Small tiles under the interpreter: fast enough on a CPU, and every test layout spans several
# programs on each grid axis; the flags as on Hopper (the interpreter reads tensor descriptors);
# tests that pass their own tiles (flags 0) run the pointer loads and the untransposed dk/dv.
INTERPRET_CONFIG = AttentionConfig(
    fwd=KernelConfig(32, 16, 1, 1, TMA), dkdv=KernelConfig(16, 32, 1, 1, KT), dq=KernelConfig(32, 16, 1, 1, TMA)
)

# GPU configs: the shipped defaults (configs.json, next to this file; chosen from compiled code,
# not timed), optionally overridden by a file of measured winners from ``python -m
# benchmarks.tune`` named by TRANSFUSION_KERNELS_TUNED. Keyed by (device name, arch such as
# "sm_90", or "*"; padded head dim; dtype name); nothing is tuned at import or call time.
SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs.json")
TUNED_ENV = "TRANSFUSION_KERNELS_TUNED"
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_OVERRIDES: dict[tuple[int, str], AttentionConfig] = {}


def load_configs(path: str) -> dict[tuple[str, int, str], AttentionConfig]:
    """{(device, padded head dim, dtype): config} from a config file (the shipped one or one that
    benchmarks.tune wrote); any problem raises ValueError in one line that names the file."""
    try:
        with open(path) as f:
            data = json.load(f)
        table = {}
        for e in data["configs"]:
            if e["dtype"] not in _DTYPE_NAMES.values():
                raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES.values())}, got {e['dtype']!r}")
            if e["head_dim"] not in (32, 64, 128, 256):
                raise ValueError(f"head_dim must be 32, 64, 128 or 256, got {e['head_dim']!r}")
            cfg = AttentionConfig(*(KernelConfig(*e[k]) for k in ("fwd", "dkdv", "dq")))
            table[(str(e["device"]), e["head_dim"], e["dtype"])] = cfg
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        what = (
            f"missing field {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else type(e).__name__
        )
        raise ValueError(
            f"{path}: not a usable triton attention config file ({what}); "
            f"fix or regenerate it (python -m benchmarks.tune --out FILE)"
        ) from None
    return table


@functools.cache
def _config_tables() -> tuple[dict, ...]:
    """The user's tuned table (if TRANSFUSION_KERNELS_TUNED is set), then the shipped one; read
    once per process."""
    tuned = os.environ.get(TUNED_ENV)
    return tuple(load_configs(p) for p in ((tuned,) if tuned else ()) + (SHIPPED_CONFIGS,))


def set_config(head_dim: int, dtype: torch.dtype, config: AttentionConfig | None) -> None:
    """Use ``config`` for this head dim and dtype on every GPU of this process (None: back to the
    config files); for benchmarks that compare configs."""
    key = (_gpu_head_dim(head_dim), _dtype_name(dtype))
    if config is None:
        _OVERRIDES.pop(key, None)
    else:
        _OVERRIDES[key] = config


def config_for(device_name: str, head_dim: int, dtype: torch.dtype, arch: str = "*") -> AttentionConfig:
    """The GPU config for a device (by name, and arch such as "sm_90"), head dim and dtype: an
    override, else the tuned file's entry, else the shipped one; in each file the entry for the
    device name first, then for its arch, then for any device ("*")."""
    key = (_gpu_head_dim(head_dim), _dtype_name(dtype))
    if key in _OVERRIDES:
        return _OVERRIDES[key]
    for table in _config_tables():
        for device in (device_name, arch, "*"):
            if (device, *key) in table:
                return table[(device, *key)]
    raise ValueError(f"no triton attention config for head dim {head_dim} and {dtype} in {SHIPPED_CONFIGS}")


def _padded_head_dim(d: int) -> int:
    if not 1 <= d <= 256:
        raise ValueError(f"head dim must be in [1, 256] for the triton backend, got {d}")
    return max(16, triton.next_power_of_2(d))


def _gpu_head_dim(d: int) -> int:
    return max(_padded_head_dim(d), 32)  # 16 shares the 32 configs


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"q must be float16, bfloat16 or float32 for the triton backend, got {dtype}")
    return _DTYPE_NAMES[dtype]


def pick_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> AttentionConfig:
    _dtype_name(dtype)
    _padded_head_dim(head_dim)
    device = torch.device(device)
    if device.type != "cuda":  # the interpreter
        return INTERPRET_CONFIG
    index = device.index if device.index is not None else torch.cuda.current_device()
    return AttentionConfig.from_list(_gpu_config(index, head_dim, _dtype_name(dtype)))


def supports(q: torch.Tensor, scale: float, softcap: float = 0.0, num_intervals: int = 1) -> str | None:
    """Why the kernels do not cover q (None when they do: any scale, softcap and K)."""
    try:
        pick_config(q.shape[-1], q.dtype, q.device)
    except (ValueError, TypeError) as e:
        return f"{q.dtype} with head dim {q.shape[-1]} ({e})"
    return None


@torch.compiler.assume_constant_result  # torch.compile: looked up once at trace time, no graph break
def _gpu_config(index: int, head_dim: int, dtype_name: str) -> tuple[int, ...]:
    dtype = next(t for t, n in _DTYPE_NAMES.items() if n == dtype_name)
    major, minor = torch.cuda.get_device_capability(index)
    return tuple(config_for(torch.cuda.get_device_name(index), head_dim, dtype, f"sm_{major}{minor}").to_list())


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
# Addressing: a per-head int64 base pointer plus int32 row offsets recomputed in every loop step
# (row * stride + column). Loop-carried pointer tensors or hoisted offset tensors cost registers
# and made the sm_90 build spill; I64 (constexpr) switches the row offsets to int64 when
# N * row stride could pass 2**31.
@triton.jit
def _ptrs(base, rows, stride, offs_d, I64: tl.constexpr, BATCHED: tl.constexpr, seq, bstride):
    """Row pointers: token row r of a [tokens, ...] tensor, or of a batched [B, seq, ...] one
    (r = b * seq + n, read through the batch stride: strided batched inputs are not copied)."""
    if BATCHED:
        b = (rows // seq).to(tl.int64)
        p = base + (b * bstride + (rows - b * seq).to(tl.int64) * stride)[:, None] + offs_d[None, :]
    elif I64:
        p = base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    else:
        p = base + rows[:, None] * stride + offs_d[None, :]
    return p


@triton.jit
def _phases(lo, hi, full_lo, full_hi, B: tl.constexpr):
    """Split the visit range [lo, hi) into PARTIAL [start, f_start), FULL [f_start, f_end) (whole
    blocks of B anchored at full_lo) and PARTIAL [f_end, hi). Without a whole FULL block, the
    entire range is PARTIAL."""
    n_full = tl.maximum(full_hi - full_lo, 0) // B
    has_full = n_full > 0
    f_start = tl.where(has_full, full_lo, hi)
    f_end = f_start + n_full * B
    # PARTIAL blocks before the FULL run end exactly at f_start
    start = tl.where(has_full, f_start - ((f_start - lo + B - 1) // B) * B, lo)
    return start, f_start, f_end


@triton.jit
def _load(ptrs, rows, lo, hi, offs_d, D: tl.constexpr, DP: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a [rows, DP] tile; rows outside [lo, hi) and padded head-dim columns read 0."""
    if CHECK_ROWS:
        if DP != D:
            x = tl.load(ptrs, mask=((rows >= lo) & (rows < hi))[:, None] & (offs_d < D)[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=((rows >= lo) & (rows < hi))[:, None], other=0.0)
    else:
        if DP != D:
            x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _cast(x, dtype, PREC: tl.constexpr):
    """x.to(dtype). Under "upcast" the interpreter's fp32 -> bf16 conversion truncates; round to
    nearest even by hand instead, as the GPU does, and keep the (bf16-exact) value in fp32."""
    if PREC == "upcast":
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        y = b.to(tl.float32, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _store(ptrs, x, row_ok, offs_d, D: tl.constexpr, DP: tl.constexpr, PREC: tl.constexpr):
    """Store an fp32 [rows, DP] tile in the buffer's dtype, skipping padded rows and columns."""
    y = _cast(x, ptrs.dtype.element_ty, PREC).to(ptrs.dtype.element_ty)
    if DP != D:
        tl.store(ptrs, y, mask=row_ok[:, None] & (offs_d < D)[None, :])
    else:
        tl.store(ptrs, y, mask=row_ok[:, None])


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    """tl.dot with fp32 accumulation. PREC "upcast" (bf16 under the interpreter, which has no
    bf16 matmul): the operands go to fp32 first; bf16 x bf16 products are exact in fp32, so the
    numerics are those of the GPU's bf16 dot."""
    if PREC == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc, input_precision=PREC)
    return c


@triton.jit
def _tanh(x):
    """tanh in fp32 to a few ulp (the interpreter has no libdevice): the exp form, and its
    Taylor series where 1 - exp(-2|x|) would cancel."""
    a = tl.abs(x)
    e = tl.math.exp2(a * (-2.0 * LOG2E))
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _visible(cols, S, E, rows, row_ok, NI: tl.constexpr):
    """[len(cols), len(rows)]: whether query rows see key cols through any of their NI intervals;
    rows with row_ok False see nothing."""
    for r in tl.static_range(NI):
        s = tl.load(S + rows * NI + r, mask=row_ok, other=0)
        e = tl.load(E + rows * NI + r, mask=row_ok, other=0)
        v = (cols[:, None] >= s[None, :]) & (cols[:, None] < e[None, :])
        if r == 0:
            vis = v
        else:
            vis = vis | v
    return vis


@triton.jit
def _run_desc(base, lo, hi, stride, D: tl.constexpr, B: tl.constexpr, DP: tl.constexpr):
    """A TMA descriptor over rows [lo, hi) of a [tokens, D] head (row lo at coordinate 0): a
    block of B rows reads the rows outside as 0, and padded head-dim columns too."""
    return tl.make_tensor_descriptor(base + lo.to(tl.int64) * stride, [tl.maximum(hi - lo, 1), D], [stride, 1], [B, DP])


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    KVS,
    KVE,
    TAB,
    ORDER,
    s_qn,
    s_qh,
    s_kn,
    s_kh,
    s_vn,
    s_vh,
    s_on,
    s_oh,
    s_lh,
    s_qb,
    s_kb,
    s_vb,
    s_ob,
    seq_q,
    seq_k,
    Nq,
    qk_scale,
    cap_in,
    cap_out,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    NI: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    PREC: tl.constexpr,
    I64: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BATCHED: tl.constexpr,
    SCALE_FIRST: tl.constexpr,
    TMA: tl.constexpr,
):
    h = tl.program_id(0)
    tile = tl.load(ORDER + tl.program_id(1))  # heaviest tiles first
    h64 = h.to(tl.int64)
    kvh = (h // GROUP).to(tl.int64)

    offs_m = tile * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    row_ok = offs_m < Nq
    q = _load(
        _ptrs(Q + h64 * s_qh, offs_m, s_qn, offs_d, I64, BATCHED, seq_q, s_qb), offs_m, 0, Nq, offs_d, D, DP, True
    )
    k_base = K + kvh * s_kh
    v_base = V + kvh * s_vh

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)
    # One run of key blocks per interval slot r; inside run r only slot r's interval is tested,
    # so each (query, key) pair is counted once even where two runs overlap.
    for r in tl.static_range(NI):
        kv_lo = tl.load(TAB + (tile * NI + r) * 4)
        kv_hi = tl.load(TAB + (tile * NI + r) * 4 + 1)
        full_lo = tl.load(TAB + (tile * NI + r) * 4 + 2)
        full_hi = tl.load(TAB + (tile * NI + r) * 4 + 3)
        # the slot's intervals, read once for all of its PARTIAL blocks; padded rows: empty
        kvs = tl.load(KVS + offs_m * NI + r, mask=row_ok, other=0)
        kve = tl.load(KVE + offs_m * NI + r, mask=row_ok, other=0)
        start, f_start, f_end = _phases(kv_lo, kv_hi, full_lo, full_hi, BN)
        if TMA:  # the run's rows only: TMA reads the rows outside [kv_lo, kv_hi) as 0
            k_desc = _run_desc(k_base, kv_lo, kv_hi, s_kn, D, BN, DP)
            v_desc = _run_desc(v_base, kv_lo, kv_hi, s_vn, D, BN, DP)
        # One loop over key blocks (one software pipeline); only PARTIAL blocks branch into the
        # interval test. Without TMA, key rows are clamped into [kv_lo, kv_hi): nothing outside
        # is ever read, the loads need no predicates, and the clamped duplicates fail the
        # interval test.
        for n0 in range(start, kv_hi, BN):
            cols = n0 + offs_n
            if TMA:
                k = k_desc.load([n0 - kv_lo, 0])
                v = v_desc.load([n0 - kv_lo, 0])
            else:
                kc = tl.minimum(tl.maximum(cols, kv_lo), kv_hi - 1)
                k = _load(_ptrs(k_base, kc, s_kn, offs_d, I64, BATCHED, seq_k, s_kb), kc, 0, 0, offs_d, D, DP, False)
                v = _load(_ptrs(v_base, kc, s_vn, offs_d, I64, BATCHED, seq_k, s_vb), kc, 0, 0, offs_d, D, DP, False)
            qk = _dot(q, tl.trans(k), None, PREC)
            if SOFTCAP or SCALE_FIRST:  # base-2 logits, masked after the cap or the scale (<= 0)
                if SOFTCAP:  # cap * tanh(scale * qk / cap) * log2(e)
                    z = _tanh(qk * cap_in) * cap_out
                else:
                    z = qk * qk_scale
                if (n0 < f_start) | (n0 >= f_end):  # PARTIAL block
                    vis = (cols[None, :] >= kvs[:, None]) & (cols[None, :] < kve[:, None])
                    z = tl.where(vis, z, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(z, 1))
            else:
                if (n0 < f_start) | (n0 >= f_end):  # PARTIAL block
                    vis = (cols[None, :] >= kvs[:, None]) & (cols[None, :] < kve[:, None])
                    qk = tl.where(vis, qk, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # a row that has seen nothing yet keeps m = -inf; subtract 0 instead (p = 0, no NaN)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            if SOFTCAP or SCALE_FIRST:
                p = tl.math.exp2(z - m_sub[:, None])
            else:
                p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
            alpha = tl.math.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = _dot(_cast(p, v.dtype, PREC), v, acc, PREC)
            m_i = m_new

    empty = l_i == 0.0  # the query sees no key: output 0, lse -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    _store(_ptrs(O + h64 * s_oh, offs_m, s_on, offs_d, I64, BATCHED, seq_q, s_ob), out, row_ok, offs_d, D, DP, PREC)
    tl.store(LSE + h64 * s_lh + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_delta(
    O,
    DO,
    DELTA,
    s_on,
    s_oh,
    s_don,
    s_doh,
    s_dh,
    s_ob,
    s_dob,
    seq_q,
    Nq,
    D: tl.constexpr,
    DP: tl.constexpr,
    BM: tl.constexpr,
    I64: tl.constexpr,
    BATCHED: tl.constexpr,
):
    """delta[h, i] = sum_d dout[i, h, d] * out[i, h, d] (fp32)."""
    h64 = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    o = _load(
        _ptrs(O + h64 * s_oh, offs_m, s_on, offs_d, I64, BATCHED, seq_q, s_ob), offs_m, 0, Nq, offs_d, D, DP, True
    )
    do = _load(
        _ptrs(DO + h64 * s_doh, offs_m, s_don, offs_d, I64, BATCHED, seq_q, s_dob), offs_m, 0, Nq, offs_d, D, DP, True
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h64 * s_dh + offs_m, delta, mask=offs_m < Nq)


@triton.jit
def _probs(qk, lse2, qk_scale, cap_in, cap_out, SOFTCAP: tl.constexpr):
    """The softmax probabilities from the raw scores and the base-2 lse, and the softcap's
    derivative factor 1 - tanh^2 (unused without softcap)."""
    if SOFTCAP:
        t = _tanh(qk * cap_in)
        p = tl.math.exp2(t * cap_out - lse2)
        dcap = 1.0 - t * t
    else:
        p = tl.math.exp2(qk * qk_scale - lse2)
        dcap = 1.0
    return p, dcap


@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    KVS,
    KVE,
    TAB,
    ORDER,
    DK,
    DV,
    s_qn,
    s_qh,
    s_kn,
    s_kh,
    s_vn,
    s_vh,
    s_don,
    s_doh,
    s_dkn,
    s_dkh,
    s_dvn,
    s_dvh,
    s_lh,
    s_qb,
    s_kb,
    s_vb,
    s_dob,
    s_dkb,
    s_dvb,
    seq_q,
    seq_k,
    Nq,
    Nk,
    qk_scale,
    scale,
    cap_in,
    cap_out,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    NI: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    PREC: tl.constexpr,
    I64: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BATCHED: tl.constexpr,
    KT: tl.constexpr,
):
    kvh = tl.program_id(0)
    kvh64 = kvh.to(tl.int64)
    tile = tl.load(ORDER + tl.program_id(1))  # heaviest tiles first
    q_lo = tl.load(TAB + tile * 4)
    q_hi = tl.load(TAB + tile * 4 + 1)
    qf_lo = tl.load(TAB + tile * 4 + 2)
    qf_hi = tl.load(TAB + tile * 4 + 3)

    cols = tile * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    # Rows past the end are clamped (not masked): their dk/dv rows are never stored, and no
    # other row depends on them, so every load in the loop below is unpredicated.
    kc = tl.minimum(cols, Nk - 1)
    k = _load(_ptrs(K + kvh64 * s_kh, kc, s_kn, offs_d, I64, BATCHED, seq_k, s_kb), kc, 0, Nk, offs_d, D, DP, False)
    v = _load(_ptrs(V + kvh64 * s_vh, kc, s_vn, offs_d, I64, BATCHED, seq_k, s_vb), kc, 0, Nk, offs_d, D, DP, False)
    if KT:
        dk = tl.zeros([DP, BN], tl.float32)
        dv = tl.zeros([DP, BN], tl.float32)
    else:
        dk = tl.zeros([BN, DP], tl.float32)
        dv = tl.zeros([BN, DP], tl.float32)

    # Query blocks: masked ones before f_start, FULL ones in [f_start, f_end), masked ones up to
    # q_hi; one flat loop over (query head of the group, query block) with a per-block branch
    # for the interval test (separate loops per phase and head made the sm_90 build spill).
    start, f_start, f_end = _phases(q_lo, q_hi, qf_lo, qf_hi, BM)
    nb = (q_hi - start + BM - 1) // BM
    for it in range(0, GROUP * nb):
        g = it // nb
        m0 = start + (it - g * nb) * BM
        rows = m0 + offs_m
        rc = tl.minimum(tl.maximum(rows, 0), Nq - 1)  # clamped: masked blocks may pass 0 or Nq
        h = (kvh * GROUP + g).to(tl.int64)
        q = _load(_ptrs(Q + h * s_qh, rc, s_qn, offs_d, I64, BATCHED, seq_q, s_qb), rc, 0, Nq, offs_d, D, DP, False)
        do = _load(
            _ptrs(DO + h * s_doh, rc, s_don, offs_d, I64, BATCHED, seq_q, s_dob), rc, 0, Nq, offs_d, D, DP, False
        )
        lse = tl.load(LSE + h * s_lh + rc)
        # rows that see nothing have lse = -inf: flip it so that p = exp2(-inf) = 0
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        delta = tl.load(DELTA + h * s_lh + rc)
        if KT:  # [BM, BN] scores; dk^T, dv^T [DP, BN] += Q^T / dO^T [DP, BM] x dS / P [BM, BN]
            qk = _dot(q, tl.trans(k), None, PREC)
            p, dcap = _probs(qk, lse2[:, None], qk_scale, cap_in, cap_out, SOFTCAP)
            if (m0 < f_start) | (m0 >= f_end):  # PARTIAL block: the union test (clamped rows see nothing)
                p = tl.where(tl.trans(_visible(cols, KVS, KVE, rc, rows == rc, NI)), p, 0.0)
            dv = _dot(tl.trans(do), _cast(p, do.dtype, PREC), dv, PREC)
            dp = _dot(do, tl.trans(v), None, PREC)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * dcap
            dk = _dot(tl.trans(q), _cast(ds, q.dtype, PREC), dk, PREC)
        else:
            qkT = _dot(k, tl.trans(q), None, PREC)  # [BN, BM]
            pT, dcapT = _probs(qkT, lse2[None, :], qk_scale, cap_in, cap_out, SOFTCAP)
            if (m0 < f_start) | (m0 >= f_end):  # PARTIAL block: the union test (clamped rows see nothing)
                pT = tl.where(_visible(cols, KVS, KVE, rc, rows == rc, NI), pT, 0.0)
            dv = _dot(_cast(pT, do.dtype, PREC), do, dv, PREC)
            dpT = _dot(v, tl.trans(do), None, PREC)
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                dsT = dsT * dcapT
            dk = _dot(_cast(dsT, q.dtype, PREC), q, dk, PREC)
    if KT:
        dk = tl.trans(dk)
        dv = tl.trans(dv)

    col_ok = cols < Nk
    _store(
        _ptrs(DK + kvh64 * s_dkh, cols, s_dkn, offs_d, I64, BATCHED, seq_k, s_dkb),
        dk * scale,
        col_ok,
        offs_d,
        D,
        DP,
        PREC,
    )
    _store(_ptrs(DV + kvh64 * s_dvh, cols, s_dvn, offs_d, I64, BATCHED, seq_k, s_dvb), dv, col_ok, offs_d, D, DP, PREC)


@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    KVS,
    KVE,
    TAB,
    ORDER,
    DQ,
    s_qn,
    s_qh,
    s_kn,
    s_kh,
    s_vn,
    s_vh,
    s_don,
    s_doh,
    s_dqn,
    s_dqh,
    s_lh,
    s_qb,
    s_kb,
    s_vb,
    s_dob,
    s_dqb,
    seq_q,
    seq_k,
    Nq,
    qk_scale,
    scale,
    cap_in,
    cap_out,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    NI: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    PREC: tl.constexpr,
    I64: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BATCHED: tl.constexpr,
    TMA: tl.constexpr,
):
    h = tl.program_id(0)
    h64 = h.to(tl.int64)
    kvh = (h // GROUP).to(tl.int64)
    tile = tl.load(ORDER + tl.program_id(1))  # heaviest tiles first

    offs_m = tile * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    row_ok = offs_m < Nq
    q = _load(
        _ptrs(Q + h64 * s_qh, offs_m, s_qn, offs_d, I64, BATCHED, seq_q, s_qb), offs_m, 0, Nq, offs_d, D, DP, True
    )
    do = _load(
        _ptrs(DO + h64 * s_doh, offs_m, s_don, offs_d, I64, BATCHED, seq_q, s_dob), offs_m, 0, Nq, offs_d, D, DP, True
    )
    lse = tl.load(LSE + h64 * s_lh + offs_m, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # empty rows: p = 0
    delta = tl.load(DELTA + h64 * s_lh + offs_m, mask=row_ok, other=0.0)
    k_base = K + kvh * s_kh
    v_base = V + kvh * s_vh

    dq = tl.zeros([BM, DP], tl.float32)
    for r in tl.static_range(NI):  # as in the forward: one run per interval slot
        kv_lo = tl.load(TAB + (tile * NI + r) * 4)
        kv_hi = tl.load(TAB + (tile * NI + r) * 4 + 1)
        full_lo = tl.load(TAB + (tile * NI + r) * 4 + 2)
        full_hi = tl.load(TAB + (tile * NI + r) * 4 + 3)
        kvs = tl.load(KVS + offs_m * NI + r, mask=row_ok, other=0)  # once for every PARTIAL block
        kve = tl.load(KVE + offs_m * NI + r, mask=row_ok, other=0)
        start, f_start, f_end = _phases(kv_lo, kv_hi, full_lo, full_hi, BN)
        if TMA:
            k_desc = _run_desc(k_base, kv_lo, kv_hi, s_kn, D, BN, DP)
            v_desc = _run_desc(v_base, kv_lo, kv_hi, s_vn, D, BN, DP)
        for n0 in range(start, kv_hi, BN):  # as in the forward: one loop, TMA or clamped key rows
            cols = n0 + offs_n
            if TMA:
                k = k_desc.load([n0 - kv_lo, 0])
                v = v_desc.load([n0 - kv_lo, 0])
            else:
                kc = tl.minimum(tl.maximum(cols, kv_lo), kv_hi - 1)
                k = _load(_ptrs(k_base, kc, s_kn, offs_d, I64, BATCHED, seq_k, s_kb), kc, 0, 0, offs_d, D, DP, False)
                v = _load(_ptrs(v_base, kc, s_vn, offs_d, I64, BATCHED, seq_k, s_vb), kc, 0, 0, offs_d, D, DP, False)
            qk = _dot(q, tl.trans(k), None, PREC)
            p, dcap = _probs(qk, lse2[:, None], qk_scale, cap_in, cap_out, SOFTCAP)
            if (n0 < f_start) | (n0 >= f_end):  # PARTIAL block
                vis = (cols[None, :] >= kvs[:, None]) & (cols[None, :] < kve[:, None])
                p = tl.where(vis, p, 0.0)
            dp = _dot(do, tl.trans(v), None, PREC)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * dcap
            dq = _dot(_cast(ds, k.dtype, PREC), k, dq, PREC)
    _store(
        _ptrs(DQ + h64 * s_dqh, offs_m, s_dqn, offs_d, I64, BATCHED, seq_q, s_dqb),
        dq * scale,
        row_ok,
        offs_d,
        D,
        DP,
        PREC,
    )


# ----------------------------------------------------------------------------------------------
# Backend functions (the contract of transfusion_kernels.attention)
# ----------------------------------------------------------------------------------------------
# The kernels read batched [B, N, H, D] views through their strides (the other backends get the
# tokens flattened by the op).
BATCHED_INPUTS = True
# triton.jit picks the interpreter when the module is imported, not when a kernel runs.
_INTERPRETED = type(_attn_fwd).__name__ == "InterpretedFunction"


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(
            f"the triton attention kernels need CUDA tensors, got {x.device.type} tensors; for CPU tests set "
            "TRITON_INTERPRET=1 before transfusion_kernels.attention.triton is first imported"
        )


@dataclass(frozen=True)
class Plan(KernelPlan):
    """The triton kernels' view of one mask: the config and, per kernel, its tile table and the
    order in which its programs take the tiles (heaviest first, so the long tiles do not end up
    in the last wave)."""

    config: AttentionConfig
    fwd_runs: torch.Tensor  # [Nq / fwd.block_m, K, 4] query runs (plan.query_runs)
    fwd_order: torch.Tensor
    dkdv_tiles: torch.Tensor  # [Nk / dkdv.block_n, 4] key tiles (plan.key_tiles)
    dkdv_order: torch.Tensor
    dq_runs: torch.Tensor  # [Nq / dq.block_m, K, 4]
    dq_order: torch.Tensor

    @classmethod
    def config_from(cls, ints):
        return AttentionConfig.from_list(ints)


def prepare(mask, q: torch.Tensor, k: torch.Tensor, config: AttentionConfig | None = None) -> Plan:
    """The mask's plan for ``forward``/``backward`` (its tables cached on the mask)."""
    cfg = config if config is not None else pick_config(q.shape[-1], q.dtype, q.device)
    fwd = query_runs(mask, cfg.fwd.block_m)
    kv = key_tiles(mask, cfg.dkdv.block_n)
    dq = query_runs(mask, cfg.dq.block_m)
    return Plan(cfg, fwd, heaviest_first(fwd), kv, heaviest_first(kv), dq, heaviest_first(dq))


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels fill (tests swap in a NaN-filled one to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_table(t: torch.Tensor, order: torch.Tensor, n: int, block: int, k: int | None, what: str) -> None:
    """A plan table against n tokens, the block size and K intervals (None: a key table)."""
    rows = triton.cdiv(n, block)
    shape = [rows, 4] if k is None else [rows, k, 4]
    if list(t.shape) != shape or t.dtype != torch.int32 or not t.is_contiguous():
        raise ValueError(
            f"plan.{what} must be contiguous int32 {shape} for {n} tokens and block {block}, got "
            f"{t.dtype} {list(t.shape)}; build the plan with prepare(mask, q, k)"
        )
    if list(order.shape) != [rows] or order.dtype != torch.int32:
        raise ValueError(
            f"the tile order of plan.{what} must be int32 [{rows}], got {order.dtype} "
            f"{list(order.shape)}; build the plan with prepare(mask, q, k)"
        )


def _precision(dtype: torch.dtype, head_dim: int) -> str:
    """tl.dot input precision. fp32 inputs (tests) get 3xTF32 on the GPU, near-fp32 accuracy on
    the tensor cores, up to head dim 128; at 256 the split operands of 3xTF32 spill the registers
    of every tile shape, so there the dots are exact fp32 (FMA, no tensor cores). 16-bit inputs
    ignore it. Under the interpreter dots are numpy fp32."""
    if dtype == torch.bfloat16 and _INTERPRETED:
        return "upcast"
    if dtype == torch.float32:
        return "ieee" if _padded_head_dim(head_dim) > 128 else "tf32x3"
    return "tf32"


def _needs_i64(*tensors: torch.Tensor) -> bool:
    """Row offsets (row * row stride, rows up to N plus a block) no longer fit in int32
    (batched tensors always take int64 offsets)."""
    return any((t.shape[0] + 512) * abs(t.stride(0)) >= 2**31 for t in tensors if t.dim() == 3)


def _intervals(starts: torch.Tensor, ends: torch.Tensor):
    """int32 [Nq, K] contiguous, and K."""
    if starts.dim() == 1:
        starts, ends = starts[:, None], ends[:, None]
    return starts.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous(), starts.shape[1]


def _softcap_args(scale: float, softcap: float):
    """(SOFTCAP, cap_in, cap_out): the kernels compute cap * tanh(scale * qk / cap) in base 2."""
    if not softcap:
        return False, 0.0, 0.0
    return True, float(scale) / softcap, softcap * _LOG2E


def _device_guard(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _use_tma(flags: int, *tensors: torch.Tensor) -> bool:
    """Whether a kernel with these flags reads these [tokens, H, D] (or [B, N, H, D]) tensors
    through TMA: Hopper or newer (or the interpreter), 16-byte aligned bases and strides, and
    batches laid out back to back (the descriptors address flat token rows)."""
    if not flags & TMA:
        return False
    if tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return False
        if t.dim() == 4 and t.shape[0] > 1 and t.stride(0) != t.shape[1] * t.stride(1):
            return False
    return True


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextlib.contextmanager
def _descriptor_scratch(on: bool):
    """Kernels that build TMA descriptors need a little global scratch at launch: lend them
    torch's allocator unless the caller set one (triton.set_allocator)."""
    from triton.runtime import _allocation

    if not on or _INTERPRETED or _allocation._allocator.get() is not _allocation._NULL_ALLOCATOR:
        yield
        return
    token = _allocation._allocator.set(_scratch)
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _check_heads(q: torch.Tensor, k: torch.Tensor) -> None:
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of key/value heads ({k.shape[-2]})")


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(row, head, batch) strides; batch 0 for a [tokens, H, D] tensor."""
    return x.stride(-3), x.stride(-2), x.stride(0) if x.dim() == 4 else 0


def _alloc_like(x: torch.Tensor) -> torch.Tensor:
    """A buffer of x's shape and dtype, laid out as torch.empty_like lays it out (what the
    gradients' fake implementation promises), through _empty."""
    layout = torch.empty_like(x, device="meta")
    return _empty((x.numel(),), x.dtype, x.device).as_strided(layout.shape, layout.stride())


def forward(q, k, v, starts, ends, plan: Plan, scale, softcap=0.0):
    """q [Nq, Hq, D], k, v [Nk, Hkv, D]; or batched [B, N, H, D] views read through their
    strides (then out is a contiguous [B, N, Hq, D])."""
    _check_device(q)
    _check_heads(q, k)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    nq = _tokens(q)
    hq, d = q.shape[-2:]
    hkv = k.shape[-2]
    batched = q.dim() == 4
    cfg = plan.config.fwd
    kvs, kve, ni = _intervals(starts, ends)
    _check_table(plan.fwd_runs, plan.fwd_order, nq, cfg.block_m, ni, "fwd_runs")
    out = _empty(q.shape[:-1] + (d,), q.dtype, q.device)
    lse = _empty((hq, nq), torch.float32, q.device)
    if nq == 0 or hq == 0:
        return out, lse
    cap, cap_in, cap_out = _softcap_args(scale, softcap)
    (qn, qh, qb), (kn, kh, kb), (vn, vh, vb), (on, oh, ob) = (_strides(x) for x in (q, k, v, out))
    tma = _use_tma(cfg.flags, k, v)
    # The key step is a launch choice (the tables fix only the query tile): a 128-key step spills
    # without TMA, or with softcap and several intervals; at head dim 256 softcap with pointer
    # loads and several intervals needs 32-key steps.
    block_n = cfg.block_n
    if cfg.flags & TMA and block_n > 64 and (not tma or (cap and ni > 1)):
        block_n //= 2
    if cap and ni > 1 and not tma and _padded_head_dim(d) > 128:
        block_n = min(block_n, 32)
    with _device_guard(q), _descriptor_scratch(tma):
        _attn_fwd[(hq, triton.cdiv(nq, cfg.block_m))](
            q,
            k,
            v,
            out,
            lse,
            kvs,
            kve,
            plan.fwd_runs,
            plan.fwd_order,
            qn,
            qh,
            kn,
            kh,
            vn,
            vh,
            on,
            oh,
            lse.stride(0),
            qb,
            kb,
            vb,
            ob,
            q.shape[1] if batched else 1,
            k.shape[1] if batched else 1,
            nq,
            float(scale) * _LOG2E,
            cap_in,
            cap_out,
            GROUP=hq // hkv,
            D=d,
            DP=_padded_head_dim(d),
            NI=ni,
            BM=cfg.block_m,
            BN=block_n,
            PREC=_precision(q.dtype, d),
            I64=_needs_i64(q, k, v, out),
            SOFTCAP=cap,
            BATCHED=batched,
            SCALE_FIRST=not cap and scale <= 0,
            TMA=tma,
            num_warps=cfg.warps,
            num_stages=cfg.stages,
        )
    return out, lse


def backward(dout, q, k, v, out, lse, starts, ends, plan: Plan, scale, softcap=0.0):
    _check_device(q)
    _check_heads(q, k)
    q, k, v, out, dout = (_unit_last(x) for x in (q, k, v, out, dout))
    lse = lse.contiguous()
    nq, nk = _tokens(q), _tokens(k)
    hq, d = q.shape[-2:]
    hkv = k.shape[-2]
    batched = q.dim() == 4
    seq_q, seq_k = (q.shape[1], k.shape[1]) if batched else (1, 1)
    cfg = plan.config
    kvs, kve, ni = _intervals(starts, ends)
    _check_table(plan.dkdv_tiles, plan.dkdv_order, nk, cfg.dkdv.block_n, None, "dkdv_tiles")
    _check_table(plan.dq_runs, plan.dq_order, nq, cfg.dq.block_m, ni, "dq_runs")
    dp = _padded_head_dim(d)
    group = hq // hkv
    prec = _precision(q.dtype, d)
    dq, dk, dv = _alloc_like(q), _alloc_like(k), _alloc_like(v)
    i64 = _needs_i64(q, k, v, out, dout, dq, dk, dv)
    if hq == 0:
        return dq, dk, dv
    if nq == 0:  # nothing sees any key
        return dq, dk.zero_(), dv.zero_()
    delta = _empty((hq, nq), torch.float32, q.device)
    qk_scale = float(scale) * _LOG2E
    cap, cap_in, cap_out = _softcap_args(scale, softcap)
    (qn, qh, qb), (kn, kh, kb), (vn, vh, vb) = (_strides(x) for x in (q, k, v))
    (on, oh, ob), (don, doh, dob) = _strides(out), _strides(dout)
    (dqn, dqh, dqb), (dkn, dkh, dkb), (dvn, dvh, dvb) = (_strides(x) for x in (dq, dk, dv))
    dq_tma = _use_tma(cfg.dq.flags, k, v)
    # Loop steps and layout are launch choices (the tables fix only the program tiles). Softcap's
    # tanh and its derivative take registers the head-dim-256 steps lack: dk/dv goes back to
    # untransposed accumulators and at most 64-query steps, dq to 32-key steps.
    dkdv_kt, dkdv_step, dq_step = bool(cfg.dkdv.flags & KT), cfg.dkdv.block_m, cfg.dq.block_n
    if cap and dp > 128:
        dkdv_kt, dkdv_step, dq_step = False, min(dkdv_step, 64), min(dq_step, 32)
    with _device_guard(q), _descriptor_scratch(dq_tma):
        _bwd_delta[(hq, triton.cdiv(nq, DELTA_BLOCK))](
            out,
            dout,
            delta,
            on,
            oh,
            don,
            doh,
            delta.stride(0),
            ob,
            dob,
            seq_q,
            nq,
            D=d,
            DP=dp,
            BM=DELTA_BLOCK,
            I64=i64,
            BATCHED=batched,
        )
        if nk > 0:
            _attn_bwd_dkdv[(hkv, triton.cdiv(nk, cfg.dkdv.block_n))](
                q,
                k,
                v,
                dout,
                lse,
                delta,
                kvs,
                kve,
                plan.dkdv_tiles,
                plan.dkdv_order,
                dk,
                dv,
                qn,
                qh,
                kn,
                kh,
                vn,
                vh,
                don,
                doh,
                dkn,
                dkh,
                dvn,
                dvh,
                lse.stride(0),
                qb,
                kb,
                vb,
                dob,
                dkb,
                dvb,
                seq_q,
                seq_k,
                nq,
                nk,
                qk_scale,
                float(scale),
                cap_in,
                cap_out,
                GROUP=group,
                D=d,
                DP=dp,
                NI=ni,
                BM=dkdv_step,
                BN=cfg.dkdv.block_n,
                KT=dkdv_kt,
                PREC=prec,
                I64=i64,
                SOFTCAP=cap,
                BATCHED=batched,
                num_warps=cfg.dkdv.warps,
                num_stages=cfg.dkdv.stages,
            )
        _attn_bwd_dq[(hq, triton.cdiv(nq, cfg.dq.block_m))](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            kvs,
            kve,
            plan.dq_runs,
            plan.dq_order,
            dq,
            qn,
            qh,
            kn,
            kh,
            vn,
            vh,
            don,
            doh,
            dqn,
            dqh,
            lse.stride(0),
            qb,
            kb,
            vb,
            dob,
            dqb,
            seq_q,
            seq_k,
            nq,
            qk_scale,
            float(scale),
            cap_in,
            cap_out,
            GROUP=group,
            D=d,
            DP=dp,
            NI=ni,
            BM=cfg.dq.block_m,
            BN=dq_step,
            PREC=prec,
            I64=i64,
            SOFTCAP=cap,
            BATCHED=batched,
            TMA=dq_tma,
            num_warps=cfg.dq.warps,
            num_stages=cfg.dq.stages,
        )
    return dq, dk, dv
