"""The __host__ __device__ math of csrc/common/ (Philox, Box-Muller, sinusoid, interval mask),
compiled with g++ into tests/cuda/host/host_math.cpp and checked against the Python references.
The kernels include the same headers, so this pins down their math without a GPU."""

from __future__ import annotations

import math
import random
import shutil
import subprocess

import pytest
import torch

from tests.cuda.conftest import CSRC, ROOT
from transfusion_kernels import philox

HOST_SRC = ROOT / "tests" / "cuda" / "host" / "host_math.cpp"


@pytest.fixture(scope="module")
def host_math(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++)")
    exe = tmp_path_factory.mktemp("host_math") / "host_math"
    # -ffp-contract=off: no fused multiply-add, as nvcc's sinusoid arguments (no adds to fuse).
    cmd = [
        cxx,
        "-std=c++17",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-ffp-contract=off",
        f"-I{CSRC}",
        str(HOST_SRC),
        "-o",
        str(exe),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

    def run(*args, stdin: str | None = None) -> str:
        p = subprocess.run([str(exe), *map(str, args)], input=stdin, capture_output=True, text=True)
        assert p.returncode == 0, (args, p.returncode, p.stderr)
        return p.stdout

    return run


# Random123 kat_vectors: counter (4 words), key (2 words) -> Philox4x32-10 output.
KAT = [
    ((0x00000000,) * 4, (0x00000000,) * 2, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_philox_known_answers(host_math, ctr, key, expected):
    words = [int(w, 16) for w in host_math("philox", *ctr, *key).split()]
    assert tuple(words) == expected
    # The Python reference agrees on the same vectors.
    ref = philox.philox4x32(tuple(torch.tensor([c], dtype=torch.int64) for c in ctr), key[0] | key[1] << 32)
    assert tuple(int(r) for r in ref) == expected


@pytest.mark.parametrize("seed,offset", [(0, 0), (20240917, 12345), (2**64 - 1, 2**32 - 3000), (2**63 + 12345, 2**40)])
def test_philox_randn_matches_reference(host_math, seed, offset):
    n = 6000  # crosses the 2^32 boundary of the counter's low word in the third case
    got = torch.tensor([float(x) for x in host_math("randn", seed, offset, n).split()], dtype=torch.float64)
    ref = philox.randn(seed, n, offset=offset).double()  # float64 math, rounded to float32
    # Both are float32 values of the same normal deviate: a few ulp apart, never more.
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(2.0**-10)
    assert torch.all((got - ref).abs() <= 4 * ulp), (got - ref).abs().max()
    assert abs(got.mean()) < 0.1 and abs(got.std() - 1) < 0.05


def _sinusoid_oracle(t, dim, flip, shift, scale, max_period):
    half = dim // 2
    freq = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - shift))
    arg = scale * t.double()[:, None] * freq[None]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
    if flip:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


@pytest.mark.parametrize(
    "dim,flip,shift,scale,max_period",
    [
        (256, True, 0.0, 1.0, 10000.0),
        (320, False, 1.0, 1.0, 10000.0),
        (33, True, 0.5, 1000.0, 10000.0),
        (8, False, 1.0, 2.5, 100.0),
        (3, True, 0.0, 1.0, 10000.0),
        (64, True, 0.0, 0.25, 1e6),
    ],
)
def test_sinusoid_matches_diffusers(host_math, seed, dim, flip, shift, scale, max_period):
    from diffusers.models.embeddings import get_timestep_embedding

    gen = torch.Generator().manual_seed(seed)
    t = torch.cat(
        [
            torch.tensor([0.0, 1.0, 999.0, 1000.0]),
            torch.rand(12, generator=gen) * 1000,
            torch.randint(0, 1000, (8,), generator=gen).float(),
        ]
    )
    out = host_math("sinusoid", dim, int(flip), shift, scale, max_period, *[repr(float(x)) for x in t])
    got = torch.tensor([[float(x) for x in line.split()] for line in out.splitlines()], dtype=torch.float64)
    ref = get_timestep_embedding(
        t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale, max_period=max_period
    ).double()
    oracle = _sinusoid_oracle(t, dim, flip, shift, scale, max_period)
    assert got.shape == ref.shape == (len(t), dim)
    # Hold ours to 2x diffusers' own float32 error against the float64 oracle, per timestep, plus
    # one float32 ulp of the largest argument: a one-ulp difference in a frequency (torch's exp
    # and the C library's round differently) moves the argument t * freq by up to that much.
    err, ref_err = (got - oracle).abs().amax(1), (ref - oracle).abs().amax(1)
    arg_ulp = torch.finfo(torch.float32).eps * (abs(scale) * t.double().abs()).clamp_min(1.0)
    assert torch.all(err <= 2 * ref_err + arg_ulp), (err, ref_err)
    if dim % 2:
        assert torch.all(got[:, -1] == 0)


def _random_intervals(rng: random.Random, nq: int, nk: int, monotone: bool):
    starts, ends = [], []
    if monotone:  # Transfusion-like: documents; causal text; images see their whole span
        doc = i = 0
        while i < nq:
            if rng.random() < 0.05:
                doc = i
            span = min(rng.randint(1, 40), nq - i) if rng.random() < 0.1 else 1
            end = i + span if span > 1 else i + 1
            for _ in range(span):
                starts.append(min(doc, nk))
                ends.append(min(end, nk))
            i += span
        return starts, ends
    for _ in range(nq):
        a, b = sorted(rng.randint(0, nk) for _ in range(2))
        if rng.random() < 0.1:
            b = a  # empty interval
        starts.append(a)
        ends.append(b)
    return starts, ends


@pytest.mark.parametrize(
    "nq,nk,block,monotone",
    [
        (1, 1, 16, True),
        (17, 17, 16, True),
        (130, 130, 32, True),
        (65, 100, 16, False),
        (200, 77, 64, False),
        (129, 129, 64, True),
        (300, 300, 16, True),
    ],
)
def test_interval_mask_and_tile_classes(host_math, seed, nq, nk, block, monotone):
    rng = random.Random(seed)
    starts, ends = _random_intervals(rng, nq, nk, monotone)
    stdin = f"{nq}\n" + "".join(f"{a} {b}\n" for a, b in zip(starts, ends)) + f"{nk}\n"
    lines = host_math("interval", block, stdin=stdin).splitlines()
    dense = [[1 if starts[i] <= j < ends[i] else 0 for j in range(nk)] for i in range(nq)]  # naive predicate
    assert [[int(c) for c in line] for line in lines[:nq]] == dense

    tiles = lines[nq:]
    assert len(tiles) == -(-nq // block)
    for line in tiles:
        head, kinds = line.split(":")
        m0, kv_lo, kv_hi, full_lo, full_hi, first, end = (int(x) for x in head.split()[1:])
        rows = range(m0, min(m0 + block, nq))
        assert (kv_lo, kv_hi) == (min(starts[i] for i in rows), max(ends[i] for i in rows))
        assert (full_lo, full_hi) == (max(starts[i] for i in rows), min(ends[i] for i in rows))
        kinds = [int(x) for x in kinds.split()]
        assert len(kinds) == -(-nk // block)
        for t, kind in enumerate(kinds):
            n0 = t * block
            cols = range(n0, min(n0 + block, nk))
            visible = [dense[i][j] for i in rows for j in cols]
            if kind == 0:  # SKIP: nothing visible
                assert not any(visible)
            elif kind == 2:  # FULL: everything visible, and the tile is not cut by the end of the keys
                assert all(visible) and n0 + block <= nk
            else:  # PARTIAL: exactly the contract's rule decided it
                assert kind == 1
                assert not (full_lo <= n0 and n0 + block <= full_hi)
            assert (kind != 0) == (kv_lo < kv_hi and n0 < kv_hi and n0 + block > kv_lo)
            assert (kind != 0) <= (first <= t < end)  # the visited range covers every non-skipped tile
        if kv_lo < kv_hi:
            assert first == kv_lo // block and end == -(-kv_hi // block)


@pytest.mark.parametrize("clip", [None, 0.8])
def test_affine_step_and_velocity_match_reference(host_math, seed, clip):
    """The kernel's per-element step and its velocity output (noise - sample), host-compiled,
    equal the reference backend's fp32 math bit for bit (same operation order, no FMA here)."""
    from transfusion_kernels.diffusion import reference

    gen = torch.Generator().manual_seed(seed)
    coef = (torch.rand(1, 6, generator=gen) * 3 - 1).float()
    s, m, z = (torch.randn(1, 300, generator=gen) * 2 for _ in range(3))
    s[0, :3] = torch.tensor([float("nan"), 0.0, -0.0])
    z[0, 3] = float("inf")
    args = [repr(float(c)) for c in coef[0]] + [int(clip is not None), repr(float(clip or 0.0))]
    stdin = "".join(f"{float(a)!r} {float(b)!r} {float(c)!r}\n" for a, b, c in zip(s[0], m[0], z[0]))
    got = torch.tensor(
        [[float(x) for x in line.split()] for line in host_math("affine", *args, stdin=stdin).splitlines()]
    )
    out, target = reference.affine_step(s, m, coef, z, 0, clip, False, velocity=True)
    assert got.shape == (300, 2)
    assert torch.equal(got[:, 0].isnan(), out[0].isnan()) and torch.equal(got[:, 1].isnan(), target[0].isnan())
    assert torch.equal(got[:, 0].nan_to_num(), out[0].nan_to_num()), (got[:, 0] - out[0]).abs().nan_to_num().max()
    assert torch.equal(got[:, 1].nan_to_num(), target[0].nan_to_num())
