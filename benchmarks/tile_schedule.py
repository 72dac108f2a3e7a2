"""Load balance of the CUDA attention kernels' tile orders: a static model, no GPU.

Each kernel launches one block per (tile, head); the hardware hands blocks to SMs in launch order,
each to the SM that frees up first: a greedy list schedule. A block's work is the steps its tile table row makes it
visit (csrc/attention/layouts.cuh make_steps) plus one step of prologue/epilogue; its time is
that work on one SM. The model ignores that an SM runs two blocks at once and that masked steps
cost more than FULL ones: it compares orders, it does not predict times.

    balance = total work / (SMs x makespan)   (1.0: every SM busy until the last block ends)

Launch orders (tile rank r, tile order[r]):
  per head (grid x = rank, y = head: every head's tiles in turn, the earlier launches)
    ``block``     order = identity (dk/dv before the tables' orders)
    ``reversed``  order = last tile first (forward and dq before the tables' orders)
    ``heaviest``  order = plan.heaviest_first(table)
  head fastest (block b = (rank b / heads, head b % heads): attention_fwd.cu, attention_bwd.cu)
    ``block``     no order given (nullptr)
    ``heaviest``  the order transfusion_kernels.attention.cuda passes: longest first over every
                  block of the launch (a longest-processing-time-first list schedule)

Why a longest-first launch order and not a persistent grid with a tile counter: the hardware
block scheduler already is a dynamic greedy scheduler (the next block goes to the SM that frees
up first), so launching the blocks longest first gives exactly the list schedule a persistent
kernel popping tiles from an atomic counter in the same order would give (the classic LPT rule,
within 4/3 of the optimum makespan), without the counter's reset per launch, its atomics, or a
loop around the kernel body; what a persistent grid adds beyond that (overlapping one tile's
epilogue with the next tile's prologue) needs a restructured kernel and is not modelled here.

    python -m benchmarks.tile_schedule            # 8k tokens, 16 query heads, 4 kv heads, D = 128
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from transfusion_kernels.attention.plan import heaviest_first, key_tiles, query_runs  # noqa: E402

N_SMS = 132  # H100 SXM


def n_steps(lo: int, hi: int, full_lo: int, full_hi: int, block: int) -> int:
    """Steps of `block` rows a tile table row visits (mirror of attn::make_steps)."""
    if lo >= hi:
        return 0
    n_full = (full_hi - full_lo) // block if full_hi > full_lo else 0
    first = full_lo - -(-(full_lo - lo) // block) * block if n_full > 0 else lo
    return -(-(hi - first) // block)


def tile_work(table: torch.Tensor, step: int, repeats: int = 1) -> list[int]:
    """Work per tile in steps (+1 for the prologue/epilogue); `repeats`: the dk/dv kernel walks its
    steps once per query head of the GQA group."""
    return [n_steps(*row, step) * repeats + 1 for row in table.tolist()]


def list_schedule(works: list[int], n_sms: int = N_SMS) -> int:
    """Makespan of a greedy list schedule: each job, in order, to the SM that frees up first."""
    free = [0] * n_sms
    for w in works:
        heapq.heapreplace(free, free[0] + w)
    return max(free)


def balance(works: list[int], n_sms: int = N_SMS) -> float:
    return sum(works) / (n_sms * list_schedule(works, n_sms)) if works else 1.0


def orders(table: torch.Tensor) -> dict[str, list[int]]:
    n = table.shape[0]
    return {"block": list(range(n)), "reversed": list(range(n - 1, -1, -1)), "heaviest": heaviest_first(table).tolist()}


def launch_works(work: list[int], order: list[int], heads: int, head_fastest: bool) -> list[int]:
    """Block works in launch order."""
    if head_fastest:
        return [work[t] for t in order for _ in range(heads)]
    return [work[t] for _ in range(heads) for t in order]


LAYOUTS = (("per head", False, ("block", "reversed", "heaviest")), ("head fastest", True, ("block", "heaviest")))
COLUMNS = [f"{name}, {layout}" for layout, _, names in LAYOUTS for name in names]


def kernels(mask, hq: int, hkv: int, d: int):
    """(name, table, step rows, grid heads, repeats) of the three kernels that use tile tables."""
    fwd_step = 64 if d <= 64 else 32  # attention_fwd.cu FwdShape::kBN
    bwd_step = 64 if d <= 64 else 32  # attention_bwd.cu DqShape::kBN / DkdvShape::kBM
    return [
        ("fwd (mma)", query_runs(mask, 128).view(-1, 4), fwd_step, hq, 1),
        ("dq", query_runs(mask, 64).view(-1, 4), bwd_step, hq, 1),
        ("dk/dv", key_tiles(mask, 64), bwd_step, hkv, hq // hkv),
    ]


def report(workloads: dict, hq: int, hkv: int, d: int, n_sms: int = N_SMS) -> list[dict]:
    rows = []
    for wname, mask in workloads.items():
        for kname, table, step, heads, repeats in kernels(mask, hq, hkv, d):
            work = tile_work(table, step, repeats)
            row = {"workload": wname, "kernel": kname, "blocks": len(work) * heads}
            all_orders = orders(table)
            for layout, head_fastest, names in LAYOUTS:
                for oname in names:
                    works = launch_works(work, all_orders[oname], heads, head_fastest)
                    row[f"{oname}, {layout}"] = balance(works, n_sms)
            rows.append(row)
    return rows


def workloads(n_tokens: int) -> dict:
    from .attention import build_mask

    return {name: build_mask(name, n_tokens, "cpu")[0] for name in ("mix", "text")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sms", type=int, default=N_SMS)
    args = p.parse_args(argv)
    rows = report(workloads(args.tokens), args.heads, args.kv_heads, args.head_dim, args.sms)
    print(
        f"load balance, {args.tokens} tokens, hq {args.heads}, hkv {args.kv_heads}, D {args.head_dim}, "
        f"{args.sms} SMs (greedy list schedule; 1.0 = no idle SM before the last block ends)"
    )
    print(" | ".join(["workload", "kernel", "blocks", *COLUMNS]))
    for r in rows:
        print(" | ".join([r["workload"], r["kernel"], str(r["blocks"]), *(f"{r[c]:.3f}" for c in COLUMNS)]))
    return rows


if __name__ == "__main__":
    main()
