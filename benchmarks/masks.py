"""Mask costs on the CPU: building a BAGEL-style plan, and the reference backend on a packed batch.

    python -m benchmarks.masks [--root DIR] [--quick]

1. Plan build. A 16k-token pack of 8 BAGEL-style samples (text, a hidden noise split, text, a
   second noise split, text: K = 3 intervals for the queries after both noise splits), built as
   a training step needs it: ``from_splits`` plus the triton plan's tile runs and key tiles,
   against ``torch.compile(create_block_mask)`` of the same union (the FlexAttention user's
   path; its first call, compilation included, is timed apart). The ratio is of medians in one
   run.
2. Reference backend. 16 documents x 128 tokens (each with a 32-patch image), 4 heads, D = 32,
   forward and backward on one CPU thread, against batched masked SDPA over [16, 4, 128, 32]
   with each document's dense mask: the reference's chunks follow the mask, so it should cost
   about the same.
Both write JSON and a markdown table under ``<root>/<device>-<date>/masks.*`` (``--root benchmarks/results/masks``
for the committed run).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import transfusion_kernels as tk
from transfusion_kernels.attention.plan import key_tiles, query_runs
from transfusion_kernels.mask_constructors import from_splits

from .common import compiled_create_block_mask, markdown_table, write_json


def _medians_ms(fns, reps: int) -> list[float]:
    """Median wall time of each function, the calls interleaved so that both see the same load."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [sorted(ts)[len(ts) // 2] for ts in times]


def bagel_pack(samples: int = 8, sample_len: int = 2048):
    lens, modes = [], []
    for _ in range(samples):
        rest = sample_len - (100 + 400 + 100 + 400)
        lens.append([100, 400, 100, 400, rest])
        modes.append(["causal", "noise", "causal", "noise", "causal"])
    return lens, modes


def union_mask_mod(starts: torch.Tensor, ends: torch.Tensor):
    """FlexAttention mask_mod of a K-interval mask."""

    cols = [(starts[:, k].contiguous(), ends[:, k].contiguous()) for k in range(starts.shape[1])]

    def mask_mod(b, h, q_idx, kv_idx):
        seen = (kv_idx >= cols[0][0][q_idx]) & (kv_idx < cols[0][1][q_idx])
        for s, e in cols[1:]:
            seen = seen | ((kv_idx >= s[q_idx]) & (kv_idx < e[q_idx]))
        return seen

    return mask_mod


def plan_build(samples: int, reps: int) -> dict:
    lens, modes = bagel_pack(samples)

    def ours():
        starts, ends, n = from_splits(lens, modes)
        mask = tk.HybridMask.from_intervals(starts, ends, n)
        return mask, query_runs(mask, 128), key_tiles(mask, 64)

    mask = ours()[0]
    create = compiled_create_block_mask()
    mod = union_mask_mod(mask.starts, mask.ends)
    n = mask.num_queries
    t0 = time.perf_counter()
    create(mod, None, None, n, n, device="cpu", BLOCK_SIZE=128)
    first_s = time.perf_counter() - t0
    ours_ms, flex_ms = _medians_ms([ours, lambda: create(mod, None, None, n, n, device="cpu", BLOCK_SIZE=128)], reps)
    return {
        "case": "plan build, BAGEL-style pack",
        "tokens": n,
        "intervals": mask.num_intervals,
        "ours_ms": round(ours_ms, 3),
        "flex_create_block_mask_ms": round(flex_ms, 3),
        "flex_first_call_s": round(first_s, 2),
        "ratio": round(flex_ms / ours_ms, 1),
    }


def reference_vs_sdpa(docs: int, doc_len: int, reps: int) -> dict:
    heads, d = 4, 32
    cu = torch.arange(docs + 1, dtype=torch.int32) * doc_len
    spans = torch.stack([cu[:-1] + 20, cu[:-1] + 52], 1)
    mask = tk.HybridMask.from_spans(cu, spans)
    n = docs * doc_len
    q, k, v = (torch.randn(n, heads, d, requires_grad=True) for _ in range(3))
    dout = torch.randn(n, heads, d)

    def ours():
        out = tk.hybrid_attention(q, k, v, mask, backend="reference")
        return torch.autograd.grad(out, (q, k, v), dout)

    dense = mask.to_dense().view(docs, doc_len, docs, doc_len).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    qb, kb, vb = (
        t.detach().view(docs, doc_len, heads, d).transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)
    )
    dob = dout.view(docs, doc_len, heads, d).transpose(1, 2).contiguous()

    def sdpa():
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=dense[:, None])
        return torch.autograd.grad(out, (qb, kb, vb), dob)

    # both checked against float64 autograd of the dense masked softmax
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    scores = torch.einsum("ihd,jhd->hij", exact[0], exact[1]) * d**-0.5
    oracle = torch.einsum(
        "hij,jhd->ihd", torch.softmax(scores.masked_fill(~mask.to_dense(), float("-inf")), -1), exact[2]
    )
    want = torch.autograd.grad(oracle, exact, dout.double())
    err_ours = max(float((g - w).abs().max()) for g, w in zip(ours(), want))
    err_sdpa = max(float((g.transpose(1, 2).reshape(n, heads, d) - w).abs().max()) for g, w in zip(sdpa(), want))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours_ms, sdpa_ms = _medians_ms([ours, sdpa], reps)
    finally:
        torch.set_num_threads(threads)
    return {
        "case": f"reference fwd+bwd, {docs} docs x {doc_len} tokens, {heads} heads, D={d}, 1 thread",
        "tokens": n,
        "ours_ms": round(ours_ms, 2),
        "sdpa_batched_ms": round(sdpa_ms, 2),
        "ratio": round(ours_ms / sdpa_ms, 2),
        "grad_err_ours": err_ours,
        "grad_err_sdpa": err_sdpa,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.masks", description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="results folder (default benchmarks/results under the current directory)")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repetitions (a smoke run)")
    args = ap.parse_args(argv)
    rows = [
        plan_build(1 if args.quick else 8, 2 if args.quick else 20),
        reference_vs_sdpa(2 if args.quick else 16, 128, 2 if args.quick else 20),
    ]
    command = " ".join(["python -m benchmarks.masks", *(sys.argv[1:] if argv is None else argv)])
    path = write_json("masks", rows, {"quick": args.quick, "command": command}, device="cpu", root=args.root)
    table = markdown_table(rows, list(dict.fromkeys(c for r in rows for c in r)))
    with open(path[:-5] + ".md", "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
