"""The CUDA interval attention (csrc/attention/).

Host tests (no GPU; g++ and numpy): the index math of csrc/attention/layouts.cuh, compiled with
g++, drives an emulation of ldmatrix / mma.m16n8k16 (the mma.sync kernels' fragments) and of TMA's
128-byte swizzle and wgmma's shared-memory descriptors (the sm_90a forward), and the split of
every tile table row into masked and FULL steps is checked against the dense mask. The kernel
sources also run whole on the host against the emulated device (attention_host/): K = 1 masks,
and interval unions (K = 2, 3 padded to 4, and 4: BAGEL-style noise splits, sinks plus windows,
random unions) with and without a logit softcap, every output under the 2x rule.

Kernel sources under emulation (g++ and the CUDA headers): every kernel of csrc/attention/ against
the float64 oracle under the 2x rule of tests/attention/common.py. Bindings: argument checks
before any device work. GPU: the plan and policy checks of the cuda backend; its results on a
device are the cuda parameter of tests/attention/test_attention.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import transfusion_kernels as tk
from tests.cuda.conftest import CSRC, NVCC, kernel_report
from tests.attention.common import FLOOR, assert_rule
from tests.oracles import dense_attention
from tests.layouts import LAYOUTS, random_layout
from transfusion_kernels.attention import cuda as tkc
from transfusion_kernels.backends import load_extension
from transfusion_kernels.attention.plan import heaviest_first, key_tiles, query_runs

GPU = torch.cuda.is_available() and load_extension()[0] is not None
gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device and the built transfusion_kernels._C")


def query_tiles(mask, block_m: int) -> torch.Tensor:
    """The kernels' query-tile table of a one-interval mask: int32 [tiles, 4]."""
    assert mask.num_intervals == 1
    return query_runs(mask, block_m).reshape(-1, 4)


# ==============================================================================================
# host: index math of csrc/attention/layouts.cuh
# ==============================================================================================
DRIVER = r"""
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include "attention/layouts.cuh"
using namespace tk::attn;

template <int D> void frag() {
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < D / 8; ++c) std::printf("swz %d %d %d\n", r, c, swizzle<D>(r, c));
  for (int lane = 0; lane < 32; ++lane) {
    const FragLane f = make_frag_lane<D>(lane);
    for (int r0 = 0; r0 < 64; r0 += 16)
      for (int kk = 0; kk < D / 16; ++kk) {
        std::printf("a %d %d %d %d %d\n", r0, kk, lane, frag_a<D>(f, r0, kk), frag_a<D>(r0, kk, lane));
        std::printf("b %d %d %d %d %d\n", r0, kk, lane, frag_b<D>(f, r0, kk), frag_b<D>(r0, kk, lane));
      }
    for (int k0 = 0; k0 < 64; k0 += 16)
      for (int np = 0; np < D / 16; ++np)
        std::printf("bt %d %d %d %d %d\n", k0, np, lane, frag_bt<D>(f, k0, np), frag_bt<D>(k0, np, lane));
  }
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  if (!std::strcmp(argv[1], "frag")) {
    if (std::atoi(argv[2]) == 64) frag<64>(); else frag<128>();
  } else if (!std::strcmp(argv[1], "steps")) {  // stdin: lo hi full_lo full_hi B per line
    int lo, hi, flo, fhi, b;
    while (std::scanf("%d %d %d %d %d", &lo, &hi, &flo, &fhi, &b) == 5) {
      const Steps s = make_steps(lo, hi, flo, fhi, b);
      std::printf("%d %d %d %d\n", s.first, s.count, s.full_begin, s.full_end);
    }
  } else if (!std::strcmp(argv[1], "sw128")) {  // rows D
    const int rows = std::atoi(argv[2]), d = std::atoi(argv[3]);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < d; ++c) std::printf("%u\n", sw128_offset(rows, r, c));
  } else if (!std::strcmp(argv[1], "desc")) {  // kind base rows row0 kk
    const unsigned base = static_cast<unsigned>(std::strtoul(argv[3], nullptr, 0));
    const int rows = std::atoi(argv[4]), row0 = std::atoi(argv[5]), kk = std::atoi(argv[6]);
    const unsigned long long d = !std::strcmp(argv[2], "k") ? desc_kmajor(base, rows, row0, kk)
                                                            : desc_mnmajor(base, rows, kk);
    std::printf("%llu\n", d);
  } else {
    return 2;
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++)")
    tmp = tmp_path_factory.mktemp("attention_layouts")
    src, exe = tmp / "layouts.cpp", tmp / "layouts"
    src.write_text(DRIVER)
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{CSRC}", str(src), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

    def run(*args, stdin=None) -> str:
        p = subprocess.run([str(exe), *map(str, args)], input=stdin, capture_output=True, text=True)
        assert p.returncode == 0, (args, p.stderr)
        return p.stdout

    return run


# ---- warp-level tensor-core emulation (PTX ISA: ldmatrix, mma.m16n8k16) ----------------------
def ldmatrix_x4(smem, addrs, trans=False):
    """regs[lane][j] = the 2 elements lane holds of matrix j; lane l addresses row l % 8 of
    matrix l // 8 (8 contiguous elements). Without .trans lane t gets row t // 4, columns
    2 (t % 4) and 2 (t % 4) + 1; with .trans the same of the transposed matrix."""
    regs = np.zeros((32, 4, 2))
    for j in range(4):
        m = np.stack([smem[addrs[8 * j + i] : addrs[8 * j + i] + 8] for i in range(8)])
        if trans:
            m = m.T
        for t in range(32):
            regs[t, j] = m[t // 4, 2 * (t % 4) : 2 * (t % 4) + 2]
    return regs


def mma_16816(a, b0, b1):
    """C (16 x 8) fragments of A (16 x 16) @ B (16 x 8) from the A registers a[lane][0..3] and
    the B registers b0[lane], b1[lane], in the layouts of csrc/common/mma.cuh."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for t in range(32):
        g, c = t // 4, 2 * (t % 4)
        A[g, c : c + 2], A[g + 8, c : c + 2], A[g, 8 + c : 10 + c], A[g + 8, 8 + c : 10 + c] = a[t]
        B[c : c + 2, g], B[8 + c : 10 + c, g] = b0[t], b1[t]
    C = A @ B
    return np.stack(
        [
            np.concatenate([C[t // 4, 2 * (t % 4) : 2 * (t % 4) + 2], C[t // 4 + 8, 2 * (t % 4) : 2 * (t % 4) + 2]])
            for t in range(32)
        ]
    )


def c_to_matrix(acc):
    """[32 lanes][n8 blocks][4] accumulator fragments -> the 16 x (8 * blocks) matrix."""
    out = np.zeros((16, 8 * acc.shape[1]))
    for t in range(32):
        g, c = t // 4, 2 * (t % 4)
        for j in range(acc.shape[1]):
            out[g, 8 * j + c : 8 * j + c + 2] = acc[t, j, :2]
            out[g + 8, 8 * j + c : 8 * j + c + 2] = acc[t, j, 2:]
    return out


def c_to_a(acc, kk):
    """Two adjacent C blocks (2 kk, 2 kk + 1) as the A operand of a k16 step, packed as the
    kernels pack them: {c0 c1 of block 2kk, c2 c3 of 2kk, c0 c1 of 2kk + 1, c2 c3 of 2kk + 1}."""
    return np.stack(
        [
            np.stack([acc[t, 2 * kk, :2], acc[t, 2 * kk, 2:], acc[t, 2 * kk + 1, :2], acc[t, 2 * kk + 1, 2:]])
            for t in range(32)
        ]
    )


def parse_frag(text):
    swz, offs = {}, {}
    for line in text.splitlines():
        f = line.split()
        if f[0] == "swz":
            swz[int(f[1]), int(f[2])] = int(f[3])
        else:
            kind, b0, k, lane, fast, ref = f[0], *map(int, f[1:])
            assert fast == ref, f"{kind}: split offsets differ from the reference at {line}"
            offs.setdefault((kind, b0, k), [0] * 32)[lane] = fast
    return swz, offs


def to_smem(x, swz, d):
    """A [rows][D] tile stored as the kernels store it (attn::load_rows): chunk c of row r at
    swizzle<D>(r, c)."""
    smem = np.full(x.shape[0] * d, np.nan)
    for r in range(x.shape[0]):
        for c in range(d // 8):
            smem[swz[r, c] : swz[r, c] + 8] = x[r, 8 * c : 8 * c + 8]
    return smem


@pytest.mark.parametrize("d", [64, 128])
def test_swizzle_is_a_permutation_and_conflict_free(layouts, d):
    swz, _ = parse_frag(layouts("frag", d))
    offsets = sorted(swz.values())
    assert offsets == list(range(0, 64 * d, 8))
    for c in range(d // 8):  # one ldmatrix matrix: 8 rows, same chunk -> 8 distinct 16-byte bank groups
        for r0 in range(0, 64, 8):
            banks = {(swz[r, c] * 2 // 16) % 8 for r in range(r0, r0 + 8)}
            assert len(banks) == 8


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("cols", [32, 64])
def test_mma_fragments_compute_the_products(layouts, d, cols, seed):
    """Every product of the kernels from the three ldmatrix patterns: X Y^T (S = Q K^T,
    S^T = K Q^T, dP = dO V^T, dP^T = V dO^T: frag_a on X, frag_b on Y) and P Z (O = P V,
    dV = P^T dO, dK = dS^T Q, dQ = dS K: P packed from the C fragments, frag_bt on Z), for a
    warp's 16 rows at every r0, Y / Z tiles of `cols` rows (the kernels' 32 / 64 steps)."""
    rng = np.random.default_rng(seed)
    swz, offs = parse_frag(layouts("frag", d))
    x, y, z = rng.standard_normal((64, d)), rng.standard_normal((cols, d)), rng.standard_normal((cols, d))
    xs, ys = to_smem(x, swz, d), to_smem(np.vstack([y, np.zeros((64 - cols, d))]), swz, d)
    zs = to_smem(np.vstack([z, np.zeros((64 - cols, d))]), swz, d)
    for r0 in range(0, 64, 16):
        acc = np.zeros((32, cols // 8, 4))
        for kk in range(d // 16):
            a = ldmatrix_x4(xs, offs["a", r0, kk]).reshape(32, 4, 2)
            for npair in range(cols // 16):
                b = ldmatrix_x4(ys, offs["b", 16 * npair, kk])
                acc[:, 2 * npair] += mma_16816(a, b[:, 0], b[:, 1])
                acc[:, 2 * npair + 1] += mma_16816(a, b[:, 2], b[:, 3])
        np.testing.assert_allclose(c_to_matrix(acc), x[r0 : r0 + 16] @ y.T, rtol=1e-12, atol=1e-12)

        out = np.zeros((32, d // 8, 4))
        for kk in range(cols // 16):
            pa = c_to_a(acc, kk)
            for npair in range(d // 16):
                b = ldmatrix_x4(zs, offs["bt", 16 * kk, npair], trans=True)
                out[:, 2 * npair] += mma_16816(pa, b[:, 0], b[:, 1])
                out[:, 2 * npair + 1] += mma_16816(pa, b[:, 2], b[:, 3])
        np.testing.assert_allclose(c_to_matrix(out), (x[r0 : r0 + 16] @ y.T) @ z, rtol=1e-10, atol=1e-10)


# ---- sm_90a: TMA SWIZZLE_128B tiles read through wgmma descriptors --------------------------
def tma_sw128(rows, row, col):
    """Byte offset TMA (CU_TENSOR_MAP_SWIZZLE_128B, boxes of 64 x 16-bit columns, one box per
    64-column panel, 1024-byte aligned) writes element (row, col) to: 16-byte chunk c of a
    128-byte row r lands at chunk c ^ (r % 8)."""
    panel, c = divmod(col, 64)
    return panel * rows * 128 + row * 128 + (((c // 8) ^ (row % 8)) * 16) + (c % 8) * 2


def swizzle_addr(addr):
    """The 128-byte swizzle as wgmma applies it to an address (Swizzle<3,4,3>)."""
    return addr ^ (((addr >> 7) & 7) << 4)


def decode(desc):
    start, lbo, sbo = (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4
    assert desc >> 62 == 1, "128-byte swizzle mode"
    assert (desc >> 49) & 7 == 0, "base offset 0 (1024-byte aligned atoms)"
    return start, lbo, sbo


def kmajor_reads(desc, mn):
    """Byte address wgmma reads operand element (i, k), i < mn, k < 16, of a K-major 16-bit
    operand: 8-row groups SBO apart, rows 128 bytes, the two 8-element halves of k adjacent
    (PTX ISA / CUTLASS canonical layout ((8, m), (8, 2)) : ((8T, SBO), (1, T)))."""
    start, _, sbo = decode(desc)
    return {
        (i, k): swizzle_addr(start + (i % 8) * 128 + (i // 8) * sbo + (k // 8) * 16 + (k % 8) * 2)
        for i in range(mn)
        for k in range(16)
    }


def mnmajor_reads(desc, n):
    """Same for an MN-major operand element (k, j), j < n: 64 contiguous elements per 128-byte
    row, the next 64 LBO further; k rows 128 bytes apart, 8-row groups SBO apart."""
    start, lbo, sbo = decode(desc)
    return {
        (k, j): swizzle_addr(start + (j % 64) * 2 + (j // 64) * lbo + (k % 8) * 128 + (k // 8) * sbo)
        for k in range(16)
        for j in range(n)
    }


@pytest.mark.parametrize("rows,d", [(128, 64), (128, 128), (64, 128)])
def test_sw128_offset_is_the_tma_layout(layouts, rows, d):
    got = [int(x) for x in layouts("sw128", rows, d).split()]
    assert got == [tma_sw128(rows, r, c) for r in range(rows) for c in range(d)]


@pytest.mark.parametrize("d", [64, 128])
def test_wgmma_descriptors_read_the_right_elements(layouts, d):
    """S = Q K^T: the A descriptor of warpgroup g reads Q[64 g + i][16 kk + k], the B descriptor
    K[n][16 kk + k]; O = P V: the B descriptor reads V[16 kk + k][j] (tiles of 128 rows as the
    kernel lays them out: 1024-byte aligned bases, 64-column panels)."""
    bm = bn = 128
    q_base, k_base, v_base = 0x0400, 0x0400 + bm * d * 2, 0x0400 + bm * d * 2 + 2 * bn * d * 2 + bn * d * 2
    where = {}
    for base, rows in ((q_base, bm), (k_base, bn), (v_base, bn)):
        for r in range(rows):
            for c in range(d):
                where[base + tma_sw128(rows, r, c)] = (base, r, c)
    for kk in range(d // 16):
        for g in range(2):
            desc = int(layouts("desc", "k", q_base, bm, 64 * g, kk))
            for (i, k), addr in kmajor_reads(desc, 64).items():
                assert where[addr] == (q_base, 64 * g + i, 16 * kk + k)
        desc = int(layouts("desc", "k", k_base, bn, 0, kk))
        for (n, k), addr in kmajor_reads(desc, bn).items():
            assert where[addr] == (k_base, n, 16 * kk + k)
    for kk in range(bn // 16):
        desc = int(layouts("desc", "mn", v_base, bn, 0, kk))
        for (k, j), addr in mnmajor_reads(desc, d).items():
            assert where[addr] == (v_base, 16 * kk + k, j)


# ---- masked / FULL steps of the tile tables -------------------------------------------------
def spans_mask_cpu(cu, spans):
    return tk.HybridMask.from_spans(
        torch.tensor(cu, dtype=torch.int32), torch.tensor(spans, dtype=torch.int32).reshape(-1, 2)
    )


def _step_cases():
    gen = torch.Generator().manual_seed(0)
    layouts = list(LAYOUTS.values()) + [random_layout(gen, 700, max_docs=4, max_images=5)]
    masks = [spans_mask_cpu(cu, sp) for cu, sp in layouts]
    masks += [
        tk.HybridMask.cached([37], [16], True),
        tk.HybridMask.cached([7, 0, 33, 64], [4, 1, 2, 40], False),
        tk.HybridMask.cached([300, 5, 129], [64, 65, 1], True),
    ]
    s = torch.randint(0, 230, (200,), generator=gen)
    e = torch.maximum(torch.minimum(s + torch.randint(0, 90, (200,), generator=gen), torch.tensor(210)), s)
    s[64:128], e[64:128] = 5, 5
    masks.append(tk.HybridMask.from_intervals(s.int(), e.int(), num_keys=230))  # not monotone, empty rows
    return masks


STEP_MASKS = _step_cases()


@pytest.mark.parametrize("mask", STEP_MASKS, ids=range(len(STEP_MASKS)))
def test_steps_cover_the_tables_and_full_steps_are_full(layouts, mask):
    """For the dq kernel (query tiles of 64, key steps of 32 and 64) and the dk/dv kernel (key
    tiles of 64, query steps of 32 and 64): the steps cover every visible pair of the tile,
    start no later than needed, and a FULL step's pairs are all visible (no mask needed)."""
    dense = mask.to_dense().numpy()
    nq, nk = dense.shape
    cases = []  # (dense oriented tile rows x step axis, tile row range, table row, step block)
    for step in (32, 64):
        for t, row in enumerate(query_tiles(mask, 64).tolist()):
            cases.append((dense, (64 * t, min(64 * t + 64, nq)), row, step))
        for t, row in enumerate(key_tiles(mask, 64).tolist()):
            cases.append((dense.T, (64 * t, min(64 * t + 64, nk)), row, step))
    out = layouts("steps", stdin="".join(f"{lo} {hi} {flo} {fhi} {b}\n" for _, _, (lo, hi, flo, fhi), b in cases))
    for (m, (r0, r1), (lo, hi, flo, fhi), b), line in zip(cases, out.splitlines(), strict=True):
        first, count, fb, fe = map(int, line.split())
        seen = np.flatnonzero(m[r0:r1].any(0))
        if lo >= hi:
            assert count == 0 and seen.size == 0
            continue
        assert count > 0 and first < lo + b and first + (count - 1) * b < hi, (first, count, lo, hi)
        if seen.size:
            assert first <= seen[0] and seen[-1] < first + count * b
        n_full = max(fhi - flo, 0) // b
        assert (fe - fb) == n_full * b and (n_full == 0 or fb == flo)
        for i in range(count):
            s0 = first + i * b
            if fb <= s0 < fe:
                assert 0 <= s0 and s0 + b <= m.shape[1] and m[r0:r1, s0 : s0 + b].all(), (i, s0)


# ==============================================================================================
# host: the kernel sources themselves, run under a CPU emulation of the CUDA primitives
# ==============================================================================================
EMU_DIR = Path(__file__).parent / "attention_host"
EMU_MODES = {  # kernel source -> the driver modes that run it (attention_host/driver.cpp)
    "attention_fwd.cu": ("fwd_mma",),
    "attention_fwd_sm90.cu": ("fwd_sm90",),
    "attention_bwd.cu": ("bwd",),
    "attention_bwd_sm90.cu": ("bwd_sm90",),
}
KERNEL_SOURCES = tuple(EMU_MODES)
EMU_BLOCK_M = {"fwd_mma": 128, "fwd_sm90": 128, "bwd": 64, "bwd_sm90": 64}  # query tile of each mode's tables
# Schedules of the asynchronous emulation (EMU_SEED): where threads yield, how late TMA lands.
EMU_SCHEDULES = (1, 2)


def emulation_source(text: str) -> str:
    """A kernel source as g++ compiles it against attention_host/cuda_emu.h (see its header)."""
    text = re.sub(
        r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?unsigned char (\w+)\[\];",
        r"unsigned char* \1 = ::emu::dynamic_smem();",
        text,
    )
    text = re.sub(
        r"__shared__\s+(?:alignas\(\d+\)\s+|__align__\(\d+\)\s+)?([\w:<>]+)\s+(\w+)\[([^\]]+)\];",
        r"auto& \2 = ::emu::static_array<\1, (\3)>();",
        text,
    )
    text = re.sub(r"__shared__\s+([\w:<>]+)\s+(\w+);", r"auto& \2 = ::emu::static_array<\1, 1>()[0];", text)
    text = re.sub(r"((?:\w+::)*\w+<[^;<>]*>)<<<(.*?)>>>\((.*?)\);", r"::emu::launch(\1, \2, \3);", text)
    assert "__shared__" not in text and "<<<" not in text, "a construct the emulation does not rewrite"
    return text


def emulation_compile(tmp: Path, name: str, text: str | None = None) -> subprocess.CompletedProcess:
    """Compiles one kernel source (its text, rewritten) or an attention_host/ file to tmp/name.o."""
    cxx = shutil.which("g++")
    flags = [
        cxx,
        "-std=c++20",
        "-O1",
        "-pthread",
        "-include",
        str(EMU_DIR / "cuda_emu.h"),
        f"-I{EMU_DIR / 'shadow'}",
        f"-I{CSRC}",
        *(f"-isystem{d}" for d in kernel_report.cuda_include_dirs(NVCC)),
    ]
    src = EMU_DIR / name
    if text is not None:
        src = tmp / f"{name}.cpp"
        src.write_text(emulation_source(text))
    return subprocess.run([*flags, "-c", str(src), "-o", str(tmp / f"{name}.o")], capture_output=True, text=True)


def emulation_link(tmp: Path, objects, exe: Path) -> Path:
    proc = subprocess.run(
        [shutil.which("g++"), "-pthread", *map(str, objects), "-o", str(exe)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return exe


def emulation_build(tmp: Path) -> Path:
    """The driver with every kernel of csrc/attention/ (objects tmp/NAME.o, executable tmp/attention_emu)."""
    jobs = [(name, (CSRC / "attention" / name).read_text()) for name in KERNEL_SOURCES]
    jobs += [("emu.cpp", None), ("driver.cpp", None)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for (name, _), proc in zip(jobs, pool.map(lambda j: emulation_compile(tmp, *j), jobs)):
            assert proc.returncode == 0, f"{name}:\n{proc.stderr[-4000:]}"
    return emulation_link(tmp, [tmp / f"{name}.o" for name, _ in jobs], tmp / "attention_emu")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None or NVCC is None:
        pytest.skip("needs g++ and the CUDA headers (nvcc)")
    return emulation_build(tmp_path_factory.mktemp("attention_emu"))


def _storage(t: torch.Tensor):
    """(bytes of t's whole storage, element offset, (row, head) strides as cuda.py passes them)."""
    storage = t.untyped_storage()
    flat = torch.tensor([], dtype=t.dtype).set_(storage, 0, (storage.nbytes() // t.element_size(),))
    strides = (0 if t.shape[0] == 1 else t.stride(0), 0 if t.shape[1] == 1 else t.stride(1))
    assert t.stride(2) == 1
    return flat.view(torch.uint8).numpy().tobytes(), t.storage_offset(), strides


class EmulationError(AssertionError):
    """The driver failed: an emulation error (race, protocol), a deadlock report or a timeout."""


def emulate(
    exe,
    work,
    mode,
    mask,
    q,
    k,
    v,
    scale,
    out=None,
    lse=None,
    dout=None,
    ordered=False,
    schedule=1,
    timeout=300,
    softcap=0.0,
):
    """Runs the driver (attention_host/driver.cpp) under the schedule `schedule`: forward -> (out, lse),
    bwd -> (dq, dk, dv), with the intervals and tables as cuda.py passes them (K padded to the
    kernels' 1, 2 or 4). ordered: blocks take their tiles heaviest first (q_order.bin,
    k_order.bin), else in blockIdx order."""
    nq, hq, d = q.shape
    nk, hkv = k.shape[:2]
    views = []
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out), ("dout", dout)):
        data, offset, (rs, hs) = _storage(q if t is None else t)
        (work / f"{name}.bin").write_bytes(data)
        views.append(f"{offset} {rs} {hs}")
    (kv_start, kv_end), runs = tkc._intervals(mask.starts, mask.ends)
    (work / "kv_start.bin").write_bytes(kv_start.numpy().tobytes())
    (work / "kv_end.bin").write_bytes(kv_end.numpy().tobytes())
    q_tiles = tkc._pad_runs(query_runs(mask, EMU_BLOCK_M[mode]), runs).contiguous()
    k_tiles = key_tiles(mask, 64)
    (work / "q_tiles.bin").write_bytes(q_tiles.numpy().tobytes())
    (work / "k_tiles.bin").write_bytes(k_tiles.numpy().tobytes())
    for name, table in (("q_order", q_tiles), ("k_order", k_tiles)):
        if ordered:
            (work / f"{name}.bin").write_bytes(heaviest_first(table).numpy().tobytes())
        else:
            (work / f"{name}.bin").unlink(missing_ok=True)
    if lse is not None:
        (work / "lse.bin").write_bytes(lse.contiguous().numpy().tobytes())
    dt = 1 if q.dtype == torch.float16 else 2
    meta = f"{nq} {nk} {hq} {hkv} {d} {dt} {scale!r}\n" + "\n".join(views) + f"\n{runs} {softcap!r}\n"
    (work / "meta").write_text(meta)
    env = {**os.environ, "EMU_SEED": str(schedule)}
    try:
        proc = subprocess.run([str(exe), mode, str(work)], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise EmulationError(f"{mode}: no result within {timeout} s") from None
    if proc.returncode != 0:
        raise EmulationError(f"{mode}: exit {proc.returncode}: {proc.stderr[-2000:]}")

    def read(name, shape, dtype):
        return torch.frombuffer(bytearray((work / f"{name}_out.bin").read_bytes()), dtype=dtype).view(shape)

    if mode.startswith("bwd"):
        return read("dq", q.shape, q.dtype), read("dk", k.shape, k.dtype), read("dv", v.shape, v.dtype)
    return read("out", q.shape, q.dtype), read("lse", (hq, nq), torch.float32)


def _strided_qkv(n, hq, hkv, d, dtype):
    qkv = torch.randn(n, hq + 2 * hkv, d).to(dtype)  # one packed projection: row stride (hq + 2 hkv) D
    return qkv.split([hq, hkv, hkv], dim=1)


def _nan_outside_case():
    """Queries see keys [20, 80) only; some see nothing, as do the last query tiles, and no query
    sees the last key tile. K/V rows outside are NaN."""
    nq, nk = 150, 150
    s = 20 + torch.arange(nq) * 30 // 90
    e = torch.clamp(s + torch.arange(nq) % 37, max=80)
    e[40:50] = s[40:50]  # empty rows
    e[90:] = s[90:] = 20  # empty query tiles
    return tk.HybridMask.from_intervals(s.int(), e.int(), num_keys=nk), (20, 80)


def _gap_case():
    """Key tile 0 is seen by query tiles 0 and 2 but not by tile 1 (which sees keys 64..127 only):
    the backward meets a step of its query range whose tile has no query seeing the key tile."""
    r = torch.arange(192)
    s = torch.where(r < 64, 0, torch.where(r < 128, 64, 0))
    e = torch.where(r < 128, r + 1, 64)
    return tk.HybridMask.from_intervals(s.int(), e.int(), num_keys=128), None


EMU_CASES = {  # name -> (mask builder, hq, hkv, d, dtype, strided)
    "spans_cross_tiles-gqa-d64-f16": (
        lambda: (spans_mask_cpu(*LAYOUTS["spans_cross_tiles"]), None),
        2,
        1,
        64,
        torch.float16,
        False,
    ),
    "several_documents-strided-d128-bf16": (
        lambda: (spans_mask_cpu(*LAYOUTS["several_documents"]), None),
        2,
        1,
        128,
        torch.bfloat16,
        True,
    ),
    "sampling-batch-gqa-d64-bf16": (
        lambda: (tk.HybridMask.cached([7, 0, 33, 64], [4, 1, 2, 40], True), None),
        4,
        2,
        64,
        torch.bfloat16,
        False,
    ),
    "nan-outside-empty-rows-d128-f16": (_nan_outside_case, 2, 1, 128, torch.float16, False),
    "single-token-d128-bf16": (
        lambda: (spans_mask_cpu(*LAYOUTS["single_token"]), None),
        2,
        1,
        128,
        torch.bfloat16,
        False,
    ),
    # 400 tokens, a long causal document: FULL tiles, and more key tiles than the wgmma forward's
    # two pipeline stages (stage refills, barrier phases flipping)
    "long-documents-gqa-d64-bf16": (
        lambda: (spans_mask_cpu([0, 330, 400], [(200, 240), (340, 380)]), None),
        2,
        1,
        64,
        torch.bfloat16,
        False,
    ),
    # 48 queries over a 1100-token cache: 9 key tiles of 128 in one query tile, so every stage of
    # the forwards' rings is refilled several times and its barrier phases wrap
    "ring-wraps-cache-d64-f16": (
        lambda: (tk.HybridMask.cached([1100], [48], True), None),
        1,
        1,
        64,
        torch.float16,
        False,
    ),
    "gap-in-query-range-d64-f16": (_gap_case, 2, 1, 64, torch.float16, False),
    # 8 query heads on one K/V head: the backward accumulates dK, dV over the group's steps
    "gqa-8to1-d64-f16": (lambda: (spans_mask_cpu(*LAYOUTS["spans_cross_tiles"]), None), 8, 1, 64, torch.float16, False),
}
# Cases whose blocks take their tiles heaviest first (the order cuda.prepare passes), the others
# in blockIdx order.
ORDERED_EMU_CASES = {
    "spans_cross_tiles-gqa-d64-f16",
    "several_documents-strided-d128-bf16",
    "long-documents-gqa-d64-bf16",
}


def emulation_check(exe, work, case, modes, schedule, data_seed, timeout=300, ordered=False, scale=None):
    """Runs `modes` on EMU_CASES[case] (inputs from data_seed): out, lse, dq, dk, dv against the
    float64 oracle under the 2x rule. Raises AssertionError (EmulationError for a failed run)."""
    torch.manual_seed(data_seed)
    build, hq, hkv, d, dtype, strided = EMU_CASES[case]
    mask, seen = build()
    nq, nk = mask.num_queries, mask.num_keys
    scale = d**-0.5 if scale is None else scale
    if strided:
        assert nq == nk
        q, k, v = _strided_qkv(nq, hq, hkv, d, dtype)
        dout = torch.randn(hq, nq, d).to(dtype).transpose(0, 1)
    else:
        q, k, v = (torch.randn(n, h, d).to(dtype) for n, h in ((nq, hq), (nk, hkv), (nk, hkv)))
        dout = torch.randn(nq, hq, d).to(dtype)
    clean_k, clean_v = k, v
    if seen is not None:  # rows nobody sees hold NaN; the oracle gets the clean values
        k, v = k.clone(), v.clone()
        for t in (k, v):
            t[: seen[0]] = float("nan")
            t[seen[1] :] = float("nan")
    allowed = mask.to_dense()
    ref_in = [t.detach().double().requires_grad_() for t in (q, clean_k, clean_v)]
    low_in = [t.detach().clone().requires_grad_() for t in (q, clean_k, clean_v)]
    ref_out, ref_lse = dense_attention(*ref_in, allowed, scale, lse_dtype=torch.float32)
    low_out, low_lse = dense_attention(*low_in, allowed, scale, lse_dtype=torch.float32)
    floor = FLOOR[dtype]
    # The backward gets the forward's stored results as the oracle rounds them: its check does not
    # depend on a forward kernel.
    out, lse = ref_out.detach().to(dtype), ref_lse.detach().float()
    run = dict(ordered=ordered, schedule=schedule, timeout=timeout)
    for mode in modes:
        if not mode.startswith("bwd"):
            got_out, got_lse = emulate(exe, work, mode, mask, q, k, v, scale, **run)
            assert_rule(f"{mode} out", got_out, ref_out, low_out, floor)
            assert_rule("lse", got_lse, ref_lse, low_lse, floor)
            continue
        grads = emulate(exe, work, mode, mask, q, k, v, scale, out=out, lse=lse, dout=dout, **run)
        ref_g = torch.autograd.grad(ref_out, ref_in, dout.double(), retain_graph=True)
        low_g = torch.autograd.grad(low_out, low_in, dout, retain_graph=True)
        for name, g, rg, lg in zip(("dq", "dk", "dv"), grads, ref_g, low_g):
            if seen is not None and name != "dq":  # a NaN key row only reaches its own dk, dv
                g, rg, lg = g[seen[0] : seen[1]], rg[seen[0] : seen[1]], lg[seen[0] : seen[1]]
            assert_rule(f"{mode} {name}", g, rg, lg, floor)
        if seen is not None:
            assert torch.all(grads[0][~allowed.any(1)] == 0), f"{mode}: dq of a row that sees nothing"


@pytest.mark.parametrize("schedule", EMU_SCHEDULES)
@pytest.mark.parametrize("case", list(EMU_CASES))
def test_kernels_under_emulation(emulator, tmp_path, case, schedule, seed):
    """Every kernel of csrc/attention/ (mma.sync forward, wgmma + TMA forward, backward),
    compiled for the emulated device (attention_host/cuda_emu.h: TMA, cp.async and wgmma land
    late, proxies and barriers are modelled, threads interleave by the seeded schedule): out,
    lse, dq, dk, dv against the float64 oracle under the 2x rule. Outputs start NaN between
    guard words; shared-memory reads outside the launch's allocation, unwritten or in-flight
    shared memory (NaN) and protocol errors fail."""
    modes = [m for name in KERNEL_SOURCES for m in EMU_MODES[name]]
    emulation_check(emulator, tmp_path, case, modes, schedule, seed, ordered=case in ORDERED_EMU_CASES)


@pytest.mark.parametrize("case,scale", [("several_documents-strided-d128-bf16", -0.3), ("gqa-8to1-d64-f16", 0.0)])
def test_kernels_at_negative_and_zero_scale(emulator, tmp_path, case, scale, seed):
    """softmax_scale < 0 and = 0 are plain math (tests/test_hardening.py), though the forwards fold
    the scale into their exp2 FFMA: for a negative scale the mma.sync one negates its Q rows, the wgmma
    one is called with -q and -scale (cuda.forward; the driver does the same)."""
    modes = [m for name in KERNEL_SOURCES for m in EMU_MODES[name]]
    emulation_check(emulator, tmp_path, case, modes, 1, seed, scale=scale)


# ---- bindings: argument checks before any device work ----------------------------------------
def _bwd_args(**change):
    ok = dict(
        dq=16,
        dk=32,
        dv=48,
        scratch=64,
        dout=80,
        q=96,
        k=112,
        v=128,
        out=144,
        lse=160,
        kv_start=176,
        kv_end=192,
        q_tiles=208,
        k_tiles=224,
        nq=10,
        nk=12,
        hq=4,
        hkv=2,
        head_dim=64,
        q_strides=(256, 64),
        k_strides=(128, 64),
        v_strides=(128, 64),
        o_strides=(256, 64),
        do_strides=(256, 64),
        scale=0.125,
        dtype="bfloat16",
        stream=0,
    )
    return {**ok, **change}


@pytest.mark.parametrize(
    "change",
    [
        dict(head_dim=96),
        dict(dtype="float32"),
        dict(dtype="int8"),
        dict(hq=3),
        dict(hkv=0),
        dict(nq=-1),
        dict(q_strides=(100, 64)),
        dict(do_strides=(256, 4)),
        dict(q=8),
        dict(dk=0),
        dict(scratch=0),
        dict(k_tiles=0),
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_bindings_reject_bad_arguments(extension, change):
    if not hasattr(extension, "attention_bwd"):
        pytest.skip("the installed extension predates the attention backward: rebuild it (pip install -e .)")
    with pytest.raises(ValueError):
        extension.attention_bwd(**_bwd_args(**change))
    fwd = {
        k: v
        for k, v in _bwd_args(**change).items()
        if k
        in (
            "q",
            "k",
            "v",
            "kv_start",
            "kv_end",
            "q_tiles",
            "nq",
            "nk",
            "hq",
            "hkv",
            "head_dim",
            "q_strides",
            "k_strides",
            "v_strides",
            "scale",
            "dtype",
            "stream",
        )
    }
    if set(change) <= set(fwd):
        for launch in (extension.attention_fwd, extension.attention_fwd_sm90):
            with pytest.raises(ValueError):
                launch(out=16, lse=32, **fwd)


def test_bindings_without_work_or_device(extension):
    if not hasattr(extension, "attention_bwd"):
        pytest.skip("the installed extension predates the attention backward: rebuild it (pip install -e .)")
    extension.attention_bwd(**_bwd_args(nq=0, nk=0))  # nothing to do: returns before any CUDA call
    assert extension.ATTENTION_SM90_BLOCK_M == 128
    assert extension.ATTENTION_BWD_BLOCK_M == extension.ATTENTION_BWD_BLOCK_N == 64
    if extension.device_count() == 0:
        assert extension.attention_sm90_supported(0) is False


# ---- policy: what the kernels do not cover -------------------------------------------------
def test_policy_without_a_gpu(monkeypatch):
    """Environment switches are validated; inputs the kernels do not cover are named by supports
    (the dispatcher's fallback), or raise ValueError with the fallback off (no device needed)."""
    from transfusion_kernels.attention import cuda as tkc

    if load_extension()[0] is None:
        pytest.skip("transfusion_kernels._C is not built")
    monkeypatch.setenv(tkc.FWD_ENV, "mma")
    assert tkc.forward_kernel("cuda:0") == "mma"
    monkeypatch.setenv(tkc.FWD_ENV, "fastest")
    with pytest.raises(ValueError, match=tkc.FWD_ENV):
        tkc.forward_kernel("cuda:0")
    assert tkc.kernel_supports(torch.zeros(1, 1, 64, dtype=torch.bfloat16))
    assert not tkc.kernel_supports(torch.zeros(1, 1, 96, dtype=torch.bfloat16))
    assert not tkc.kernel_supports(torch.zeros(1, 1, 64, dtype=torch.float32))
    mask = tk.HybridMask.causal(torch.tensor([0, 20], dtype=torch.int32))
    q = torch.randn(20, 2, 96)
    monkeypatch.setenv(tkc.FALLBACK_ENV, "0")
    with pytest.raises(ValueError, match="head dim 96"):
        tkc.supports(q, 1.0)
    monkeypatch.setenv(tkc.FALLBACK_ENV, "1")
    assert "head dim 96" in tkc.supports(q, 1.0)  # the dispatcher runs it on the next backend
    assert tkc.supports(q.bfloat16()[..., :64], -1.0) is None  # every scale is covered
    with pytest.raises(ValueError, match="head dim 96"):  # called directly: no second fallback here
        tkc.prepare(mask, q, q[:, :1])


def test_tile_orders_without_a_gpu():
    """Each kernel's tile order is checked against its table (heaviest first: the last tiles of
    a causal sequence see the most keys)."""
    from transfusion_kernels.attention import cuda as tkc

    t = query_tiles(tk.HybridMask.causal(torch.tensor([0, 300], dtype=torch.int32)), 128)
    order = heaviest_first(t)
    assert order.dtype == torch.int32 and order.tolist() == [2, 1, 0]
    tkc._check_table(t, order, 300, 128, t.device, "fwd_tiles")
    for bad in (order.long(), order[:2], order.view(1, 3)):
        with pytest.raises(ValueError, match="tile order"):
            tkc._check_table(t, bad, 300, 128, t.device, "fwd_tiles")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,d", [(torch.float32, 64), (torch.float16, 96)])
def test_shapes_the_kernels_do_not_cover(dtype, d):
    """Called directly, prepare raises ValueError naming the head dim (the dispatcher refuses them
    before; tests/attention/test_attention.py runs them on the backends that cover them)."""
    from transfusion_kernels.attention import cuda as tkc

    mask = tk.HybridMask.causal(torch.tensor([0, 70], dtype=torch.int32, device="cuda"))
    q = torch.randn(mask.num_queries, 2, d, device="cuda").to(dtype)
    with pytest.raises(ValueError, match="head dim"):
        tkc.prepare(mask, q, q[:, :1])


@pytest.mark.gpu
@gpu
def test_bad_tables_are_rejected():
    from transfusion_kernels.attention import cuda as tkc

    mask = tk.HybridMask.causal(torch.tensor([0, 100], dtype=torch.int32, device="cuda"))
    q, k = torch.randn(100, 2, 64, device="cuda").half(), torch.randn(100, 1, 64, device="cuda").half()
    plan = tkc.prepare(mask, q, k)
    s, e = mask.kv_start, mask.kv_end
    with pytest.raises(ValueError, match="plan.fwd_tiles"):
        tkc.forward(q, k, k, s, e, dataclasses.replace(plan, fwd_tiles=query_tiles(mask, 32).cuda()), 0.125)
    with pytest.raises(ValueError, match="fwd_block_m"):
        tkc.forward(q, k, k, s, e, dataclasses.replace(plan, config=tkc.BlockSizes(96, 64, 64)), 0.125)
    with pytest.raises(ValueError, match="tile order"):  # orders are int32, one entry per tile
        tkc.forward(q, k, k, s, e, dataclasses.replace(plan, fwd_order=plan.fwd_order.long()), 0.125)
    out, lse = tkc.forward(q, k, k, s, e, plan, 0.125)
    with pytest.raises(ValueError, match="tile order"):
        tkc.backward(q, q, k, k, out, lse, s, e, dataclasses.replace(plan, dkdv_order=plan.dkdv_order[:-1]), 0.125)
    with pytest.raises(ValueError, match="plan.dkdv_tiles"):
        tkc.backward(q, q, k, k, out, lse, s, e, dataclasses.replace(plan, dkdv_tiles=key_tiles(mask, 32)), 0.125)


# ==============================================================================================
# emulation: interval unions (K > 1 intervals per query) and logit softcap
# ==============================================================================================
UNION_MODES = ("fwd_mma", "fwd_sm90", "bwd", "bwd_sm90")


def bagel_mask():
    """Two BAGEL-style samples: text, a noised image copy, its clean copy, text; later queries see
    their sample minus the noise split before them (K = 2)."""
    return tk.HybridMask.from_splits(
        [[20, 40, 40, 12], [30, 40, 9]], [["causal", "noise", "full", "causal"], ["causal", "noise", "causal"]]
    )


def sink_window_mask(n=200, sink=5, window=70):
    """Attention sinks plus a causal sliding window: [0, sink) and [i - window + 1, i + 1),
    merged into one interval where they touch (the second slot then empty)."""
    i = torch.arange(n)
    w0 = torch.clamp(i - window + 1, min=0)
    merged = w0 <= sink
    s = torch.stack([torch.zeros_like(i), torch.where(merged, i + 1, w0)], 1)
    e = torch.stack([torch.where(merged, i + 1, torch.full_like(i, sink)), i + 1], 1)
    s[:, 1] = torch.where(merged, e[:, 0], s[:, 1])  # empty second slot
    e[:, 1] = torch.where(merged, e[:, 0], e[:, 1])
    return tk.HybridMask.from_intervals(s.int(), e.int(), num_keys=n)


def random_union_mask(nq, nk, k, lo, hi, gen):
    """K sorted, disjoint intervals per query inside [lo, hi) (keys outside: seen by no query),
    some empty, some long enough to cover whole key tiles; a few rows see nothing."""
    pts = torch.sort(torch.randint(lo, hi + 1, (nq, 2 * k), generator=gen), 1).values
    wide = torch.rand(nq, generator=gen) < 0.5  # half the rows: one interval stretched over the others
    pts[wide, 1 : 2 * k - 1] = pts[wide, 2 * k - 2 : 2 * k - 1]
    s, e = pts[:, 0::2].contiguous(), pts[:, 1::2].contiguous()
    empty = torch.rand(nq, generator=gen) < 0.05
    e[empty] = s[empty]
    return tk.HybridMask.from_intervals(s.int(), e.int(), num_keys=nk)


UNION_CASES = {  # name -> (mask builder(gen), hq, hkv, d, dtype, softcap, unseen keys hold NaN)
    "bagel-splits-k2-gqa-d64-bf16": (lambda g: bagel_mask(), 4, 2, 64, torch.bfloat16, 0.0, False),
    "bagel-splits-k2-softcap-d128-f16": (lambda g: bagel_mask(), 2, 1, 128, torch.float16, 2.0, False),
    "sink-window-k2-softcap-d64-f16": (lambda g: sink_window_mask(), 2, 1, 64, torch.float16, 1.5, False),
    "random-k4-nan-outside-d64-f16": (
        lambda g: random_union_mask(160, 200, 4, 20, 180, g),
        2,
        1,
        64,
        torch.float16,
        0.0,
        True,
    ),
    "random-k3-softcap-nan-outside-d128-bf16": (
        lambda g: random_union_mask(150, 190, 3, 9, 180, g),
        2,
        2,
        128,
        torch.bfloat16,
        3.0,
        True,
    ),
    "random-k2-gqa-d128-bf16": (
        lambda g: random_union_mask(160, 160, 2, 0, 160, g),
        4,
        1,
        128,
        torch.bfloat16,
        0.0,
        False,
    ),
    "spans-k1-softcap-d64-bf16": (
        lambda g: tk.HybridMask.from_spans(torch.tensor([0, 150, 290]), torch.tensor([[20, 90], [170, 250]])),
        2,
        1,
        64,
        torch.bfloat16,
        1.0,
        False,
    ),
}
UNION_ORDERED = {"bagel-splits-k2-gqa-d64-bf16", "random-k4-nan-outside-d64-f16"}  # blocks take tiles heaviest first


def union_check(exe, work, case, modes, seed, schedule=1, scale=None):
    gen = torch.Generator().manual_seed(seed)
    build, hq, hkv, d, dtype, softcap, nan_outside = UNION_CASES[case]
    mask = build(gen)
    nq, nk = mask.num_queries, mask.num_keys
    scale = d**-0.5 if scale is None else scale
    q, k, v = (torch.randn(n, h, d, generator=gen).to(dtype) for n, h in ((nq, hq), (nk, hkv), (nk, hkv)))
    dout = torch.randn(nq, hq, d, generator=gen).to(dtype)
    allowed = mask.to_dense()
    seen = allowed.any(0)
    if nan_outside:  # keys no query sees: NaN for the kernels, the clean values for the oracle
        assert not seen.all()
        k_in, v_in = k.clone(), v.clone()
        k_in[~seen] = float("nan")
        v_in[~seen] = float("nan")
    else:
        k_in, v_in = k, v
    cap = softcap or None
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    low_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = dense_attention(*ref_in, allowed, scale, cap)
    low_out, low_lse = dense_attention(*low_in, allowed, scale, cap, lse_dtype=torch.float32)
    floor = FLOOR[dtype]
    out, lse = ref_out.detach().to(dtype), ref_lse.detach().float()
    run = dict(ordered=case in UNION_ORDERED, schedule=schedule)
    for mode in modes:
        if not mode.startswith("bwd"):
            got_out, got_lse = emulate(exe, work, mode, mask, q, k_in, v_in, scale, softcap=softcap, **run)
            assert_rule(f"{mode} out", got_out, ref_out, low_out, floor)
            assert_rule("lse", got_lse, ref_lse, low_lse, floor)
            continue
        grads = emulate(
            exe, work, mode, mask, q, k_in, v_in, scale, out=out, lse=lse, dout=dout, softcap=softcap, **run
        )
        ref_g = torch.autograd.grad(ref_out, ref_in, dout.double(), retain_graph=True)
        low_g = torch.autograd.grad(low_out, low_in, dout, retain_graph=True)
        for name, g, rg, lg in zip(("dq", "dk", "dv"), grads, ref_g, low_g):
            if name != "dq":  # a NaN key row reaches only its own dk, dv
                g, rg, lg = g[seen], rg[seen], lg[seen]
            assert_rule(f"{mode} {name}", g, rg, lg, floor)
        assert torch.all(grads[0][~allowed.any(1)] == 0), f"{mode}: dq of a row that sees nothing"


def test_cases_are_unions_over_several_tiles():
    """The cases cover what they claim: K of each, several query and key tiles per grid."""
    gen = torch.Generator().manual_seed(0)
    ks = {name: case[0](gen).num_intervals for name, case in UNION_CASES.items()}
    assert ks["bagel-splits-k2-gqa-d64-bf16"] == 2 and ks["random-k3-softcap-nan-outside-d128-bf16"] == 3
    assert sorted(set(ks.values())) == [1, 2, 3, 4]
    for name, case in UNION_CASES.items():
        mask = case[0](gen)
        assert mask.num_queries > 128 and mask.num_keys > 128, name
        if mask.num_intervals > 1:  # both slots used somewhere
            assert (mask.ends[:, 1] > mask.starts[:, 1]).any(), name


@pytest.mark.parametrize("case", list(UNION_CASES))
def test_unions_and_softcap_under_emulation(emulator, tmp_path, case, seed):
    """Forward and backward kernels on K > 1 masks and softcap: out, lse, dq, dk, dv against the
    float64 oracle under the 2x rule."""
    union_check(emulator, tmp_path, case, UNION_MODES, seed)


@pytest.mark.parametrize(
    "case,scale", [("sink-window-k2-softcap-d64-f16", -0.2), ("bagel-splits-k2-gqa-d64-bf16", 0.0)]
)
def test_negative_and_zero_scale(emulator, tmp_path, case, scale, seed):
    """A negative scale (the forwards negate Q; the softcap's tanh is odd) and a zero one."""
    union_check(emulator, tmp_path, case, UNION_MODES, seed, schedule=2, scale=scale)


def test_padding_and_refusals():
    """K = 3 gets an empty fourth slot in the intervals and the runs; K > 4 is named by supports
    and refused by the plan; softcap is covered."""
    mask = random_union_mask(70, 80, 3, 0, 80, torch.Generator().manual_seed(1))
    (s, e), runs = tkc._intervals(mask.starts, mask.ends)
    assert runs == 4 and s.shape == (70, 4) and torch.equal(s[:, :3], mask.starts) and torch.equal(s[:, 3], e[:, 3])
    table = tkc._pad_runs(query_runs(mask, 64), runs)
    assert table.shape == (2, 4, 4) and not table[:, 3].any()
    q = torch.zeros(70, 2, 64, dtype=torch.float16)
    assert tkc.supports(q, 0.1, 5.0, 4) is None
    assert "5 intervals" in tkc.supports(q, 0.1, 0.0, 5)
    with pytest.raises(ValueError, match="1 to 4 intervals"):
        tkc._intervals(torch.zeros(3, 5, dtype=torch.int32), torch.zeros(3, 5, dtype=torch.int32))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_intervals=3), "num_intervals"),
        (dict(num_intervals=0), "num_intervals"),
        (dict(softcap=-1.0), "softcap"),
        (dict(softcap=float("nan")), "softcap"),
    ],
)
def test_bindings_reject_bad_masks(extension, change, match):
    """num_intervals outside 1, 2, 4 and a negative or non-finite softcap are refused before any
    device work (the pointers are never touched)."""
    common = dict(q=96, k=112, v=128, kv_start=176, kv_end=192, q_tiles=208, nq=10, nk=12, hq=4, hkv=2, head_dim=64)
    strides = dict(q_strides=(256, 64), k_strides=(128, 64), v_strides=(128, 64))
    rest = dict(scale=0.125, dtype="bfloat16", stream=0, **change)
    for launch in (extension.attention_fwd, extension.attention_fwd_sm90):
        with pytest.raises(ValueError, match=match):
            launch(out=16, lse=32, **common, **strides, **rest)
    with pytest.raises(ValueError, match=match):
        extension.attention_bwd(
            dq=16,
            dk=32,
            dv=48,
            scratch=64,
            dout=80,
            out=144,
            lse=160,
            k_tiles=224,
            **common,
            **strides,
            o_strides=(256, 64),
            do_strides=(256, 64),
            **rest,
        )
