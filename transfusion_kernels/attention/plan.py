"""Tile plans of an interval mask: which key tiles each query tile visits, which of them need no
masking, and the mirror per key tile for the dk/dv pass. Built once per mask and block size with
vectorised torch ops and cached on the mask (``mask.plans``), so every layer reuses them.

Query side, one row per (query tile, interval slot k): ``(lo, hi, full_lo, full_hi)``. No row of
the tile sees a key of slot k outside ``[lo, hi)``; every row sees every key of
``[full_lo, full_hi)`` through slot k. A kernel walks the K runs one after the other and tests
only slot k inside run k, so a (query, key) pair is counted once even where runs overlap, and
the keys in a gap between every row's intervals are never visited. O(Nq * K).

Key side, one row per key tile: ``(q_lo, q_hi, qfull_lo, qfull_hi)``: no query outside
``[q_lo, q_hi)`` sees a key of the tile, every query in ``[qfull_lo, qfull_hi)`` sees all of them.
Exact for monotone K = 1 masks (binary searches); otherwise built from the query-side runs at
the granularity of query tiles of ``KEY_PLAN_GRANULE`` rows, O((Nq / granule) * (Nk / bn) * K).
"""

from __future__ import annotations

import dataclasses

import torch

from transfusion_kernels.masks import INT32_MAX, HybridMask, check_block

KEY_PLAN_GRANULE = 64  # query rows per tile of the non-monotone key plan


def cached(mask: HybridMask, key: tuple, build):
    """``build()`` once per mask and key (not cached while torch.compile traces: it builds in
    the graph)."""
    if torch.compiler.is_compiling():
        return build()
    if key not in mask.plans:
        mask.plans[key] = build()
    return mask.plans[key]


def query_runs(mask: HybridMask, block_m: int) -> torch.Tensor:
    """int32 [ceil(Nq / block_m), K, 4]: per query tile and interval slot (lo, hi, full_lo,
    full_hi); an empty run is (0, 0, 0, 0)."""
    bm = check_block(block_m, "block_m")
    return cached(mask, ("query_runs", bm), lambda: _query_runs(mask.starts, mask.ends, bm))


def key_tiles(mask: HybridMask, block_n: int) -> torch.Tensor:
    """int32 [ceil(Nk / block_n), 4]: per key tile (q_lo, q_hi, qfull_lo, qfull_hi)."""
    bn = check_block(block_n, "block_n")
    return cached(mask, ("key_tiles", bn), lambda: _key_tiles(mask, bn))


def heaviest_first(table: torch.Tensor) -> torch.Tensor:
    """int32 [tiles]: the tile indices of a plan table by decreasing visited length (summed
    over runs), ties in tile order: the order in which a kernel's blocks take their tiles
    (block i processes tile order[i]), so the longest tiles start in the first wave and short
    ones fill the tail (a longest-first list schedule)."""
    t = table[:, None, :] if table.dim() == 2 else table  # [tiles, runs, 4]
    work = (t[..., 1] - t[..., 0]).clamp_min(0).sum(1)
    return torch.argsort(work, descending=True, stable=True).to(torch.int32)


def _query_runs(s: torch.Tensor, e: torch.Tensor, bm: int) -> torch.Tensor:
    n, k = s.shape
    t = -(-n // bm)
    pad = t * bm - n

    def tiled(x, fill):  # [t, bm, K]; padded rows neither widen nor narrow the runs
        return torch.nn.functional.pad(x, (0, 0, 0, pad), value=fill).view(t, bm, k)

    nonempty = e > s
    lo = tiled(torch.where(nonempty, s, INT32_MAX), INT32_MAX).amin(1)
    hi = tiled(torch.where(nonempty, e, 0), 0).amax(1)
    full_lo = tiled(s, 0).amax(1)
    full_hi = tiled(e, INT32_MAX).amin(1)
    empty = lo >= hi
    lo, hi = lo.masked_fill(empty, 0), hi.masked_fill(empty, 0)
    no_full = empty | (full_lo >= full_hi)
    full_lo, full_hi = full_lo.masked_fill(no_full, 0), full_hi.masked_fill(no_full, 0)
    return torch.stack([lo, hi, full_lo, full_hi], 2).to(torch.int32).contiguous()


def _key_tiles(mask: HybridMask, bn: int) -> torch.Tensor:
    nk, nq = mask.num_keys, mask.num_queries
    t = -(-nk // bn)
    n0 = torch.arange(t, dtype=torch.int32, device=mask.device) * bn
    n1 = torch.clamp(n0 + bn, max=nk)
    if mask.monotone:
        s, e = mask.kv_start, mask.kv_end
        q_lo = torch.searchsorted(e, n0, right=True, out_int32=True)  # first i with kv_end > n0
        q_hi = torch.searchsorted(s, n1, right=False, out_int32=True)  # first i with kv_start >= n1
        full_hi = torch.searchsorted(s, n0, right=True, out_int32=True)  # kv_start <= n0 before this
        full_lo = torch.searchsorted(e, n1, right=False, out_int32=True)  # kv_end >= n1 from here
        return torch.stack([q_lo, torch.maximum(q_hi, q_lo), full_lo, full_hi], 1).contiguous()
    # Coverage at query-tile granularity: [Tq, Tk] from the query runs of every slot.
    g = KEY_PLAN_GRANULE
    runs = query_runs(mask, g)  # [Tq, K, 4]
    lo, hi, flo, fhi = (runs[..., i, None] for i in range(4))  # [Tq, K, 1]
    touches = ((lo < n1) & (hi > n0)).any(1)  # [Tq, Tk]
    full = ((flo <= n0) & (fhi >= n1) & (flo < fhi)).any(1)
    idx = torch.arange(runs.shape[0], dtype=torch.int32, device=mask.device)[:, None]
    first = torch.where(touches, idx, INT32_MAX).amin(0)
    last = torch.where(touches, idx, -1).amax(0)
    any_q = last >= 0
    q_lo = torch.where(any_q, first * g, 0)
    q_hi = torch.where(any_q, torch.clamp((last + 1) * g, max=nq), 0)
    # The FULL run: from the first full query tile up to the next tile that is not full.
    f_first = torch.where(full, idx, INT32_MAX).amin(0)
    f_end = torch.where(~full & (idx > f_first), idx, runs.shape[0]).amin(0)
    has_full = f_first < INT32_MAX
    f_lo = torch.where(has_full, f_first * g, 0)
    f_hi = torch.where(has_full, torch.clamp(f_end * g, max=nq), 0)
    return torch.stack([q_lo, q_hi, f_lo, f_hi], 1).to(torch.int32).contiguous()


class KernelPlan:
    """What a backend's kernels read of one mask, as named fields: a dataclass whose first field
    ``config`` holds its block sizes (``to_list`` / the subclass's ``config_from``) and whose
    other fields are tensors. It crosses the torch.library custom ops as ``op_args()`` (a tensor
    list and an int list, the types those ops can take) and is rebuilt there by
    ``from_op_args``."""

    @classmethod
    def config_from(cls, ints: list[int]):
        raise NotImplementedError

    @classmethod
    def _tensor_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "config"]

    def op_args(self) -> tuple[list[torch.Tensor], list[int]]:
        # fields of the instance: torch.compile traces dataclasses.fields of objects, not classes
        return [getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config"], self.config.to_list()

    @classmethod
    def from_op_args(cls, tensors: list[torch.Tensor], ints: list[int]):
        names = cls._tensor_fields()
        if len(tensors) != len(names):
            raise ValueError(
                f"a {cls.__module__}.{cls.__name__} has {len(names)} tensors ({', '.join(names)}), "
                f"got {len(tensors)}; build it with prepare(mask, q, k)"
            )
        return cls(cls.config_from(ints), *tensors)
