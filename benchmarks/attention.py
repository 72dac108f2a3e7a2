"""Benchmark: hybrid-mask attention, forward and backward.

Workloads (packed tokens, one interval mask each):
  mix     documents of 2048 tokens, each holding 1 to 3 images of 256 or 1024 patches between
          text (the Transfusion training layout)
  text    documents of 2048 text tokens (causal within each document)
  causal  one causal sequence over all tokens
at 8k and 32k tokens, bf16, D = 128, 16 and 32 query heads with GQA 4:1.

Methods:
  triton      tk.hybrid_attention(..., backend="triton")
  cuda        tk.hybrid_attention(..., backend="cuda"), when the extension is built
  flex        torch.compile(flex_attention) with a BlockMask of the same mask, built once by
              torch.compile(create_block_mask) (its compile time reported apart from the
              steady-state build time) and reused for every call
  sdpa        naive baseline: F.scaled_dot_product_attention with the dense N x N mask as an
              additive float mask (SDPA's memory-efficient kernel takes it; a boolean mask is
              converted on every call), built once, K/V not expanded (enable_gqa); skipped
              above --sdpa-max-tokens
  fa2 / fa3   flash_attn(_interface).flash_attn_varlen_func(causal=True) over the documents:
              a speed reference only; it computes the document-causal mask (no bidirectional
              images), checked and counted on that mask's own pairs
  reference   the pure-PyTorch backend

Every row is first checked against the fp32 reference on the same inputs (output, and the
gradients when the backward runs): the largest absolute errors go into the row (``err_out``,
``err_dq``, ...). Effective TFLOP/s use the pairs the mask allows: forward = 4 * D * Hq *
visible_pairs, backward = 2.5 x forward, forward + backward = 3.5 x (docs/design.md §1).
Times are medians (triton.testing.do_bench); peak memory is what one forward + backward
allocates above the inputs.

    python -m benchmarks.attention               # GPU, every workload; JSON in benchmarks/results/
    python -m benchmarks.attention --workloads mix --tokens 8192 --heads 16
    python -m benchmarks.attention --smoke         # CPU: tiny shapes, no speed claims; a backend that
                                                   # cannot run here has the reference standing in
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import transfusion_kernels as tk  # noqa: E402
from transfusion_kernels.attention import plan  # noqa: E402
from .common import (  # noqa: E402
    compile_backend,
    compile_fn,
    do_bench,
    flex_block_mask,
    markdown_table,
    max_error,
    peak_memory_mb,
    write_json,
)

DOC_LEN = 2048
IMAGE_SIZES = (256, 1024)


# ----------------------------------------------------------------------------- workloads
def mix_layout(n_tokens: int, doc_len: int = DOC_LEN, image_sizes=IMAGE_SIZES, seed: int = 0):
    """Documents of ``doc_len`` tokens, each with 1 to 3 images (sizes drawn from image_sizes)
    separated by text; every image has a BOI and EOI text token around it."""
    gen = torch.Generator().manual_seed(seed)
    cu, spans = [0], []
    while cu[-1] < n_tokens:
        start = cu[-1]
        length = min(doc_len, n_tokens - start)
        sizes = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            size = image_sizes[int(torch.randint(0, len(image_sizes), (1,), generator=gen))]
            if sum(sizes) + size + 2 * (len(sizes) + 1) + 1 <= length:
                sizes.append(size)
        text = length - sum(sizes) - 2 * len(sizes)  # text tokens besides BOI/EOI
        # split the remaining text into len(sizes) + 1 random gaps (text before, between, after)
        cuts = sorted(torch.randint(0, text + 1, (len(sizes),), generator=gen).tolist())
        gaps = [b - a for a, b in zip([0] + cuts, cuts + [text])]
        pos = start
        for gap, size in zip(gaps, sizes):
            pos += gap + 1  # text, then BOI
            spans.append((pos, pos + size))
            pos += size + 1  # patches, then EOI
        cu.append(start + length)
    return cu, spans


def build_mask(workload: str, n_tokens: int, device, doc_len: int = DOC_LEN, image_sizes=IMAGE_SIZES):
    if workload == "mix":
        cu, spans = mix_layout(n_tokens, doc_len, image_sizes)
    elif workload == "text":
        cu, spans = list(range(0, n_tokens, doc_len)) + [n_tokens], []
    elif workload == "causal":
        cu, spans = [0, n_tokens], []
    else:
        raise ValueError(f"unknown workload {workload!r}; choose mix, text or causal")
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    spans_t = torch.tensor(spans, dtype=torch.int32, device=device).reshape(-1, 2)
    return tk.HybridMask.from_spans(cu_t, spans_t), cu_t, spans


# ----------------------------------------------------------------------------- methods
@dataclasses.dataclass
class Method:
    fn: object  # callable(q, k, v) -> out, [N, H, D] layout
    pairs: int  # (query, key) pairs it computes
    oracle_mask: object  # the mask whose reference output it must match
    note: str = ""
    backward: bool = True  # whether it can run the backward here
    setup: dict = dataclasses.field(default_factory=dict)  # mask build / compile times


def _flex_fn(block_mask, hq, hkv):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = compile_fn(flex_attention, dynamic=False)

    def run(q, k, v):
        # [N, H, D] -> [1, H, N, D] views (no copies), and back
        out = compiled(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            block_mask=block_mask,
            enable_gqa=hq != hkv,
        )
        return out[0].transpose(0, 1)

    return run


def sdpa_supports_gqa() -> bool:
    """SDPA takes K/V with fewer heads (enable_gqa) from torch 2.5 on."""
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def additive_mask(mask, dtype) -> torch.Tensor:
    """0 where the dense mask allows a pair, -inf elsewhere, in the inputs' dtype (every query
    sees at least itself in these workloads, so no row is all -inf)."""
    dense = mask.to_dense()
    return torch.zeros(dense.shape, dtype=dtype, device=dense.device).masked_fill_(~dense, float("-inf"))


def sdpa_kernel(q, k, v, attn_mask, gqa: bool) -> str:
    """Which fused SDPA kernel takes these inputs (asked of torch's own dispatch checks); "math"
    is the unfused fallback that materialises the scores."""
    try:
        from torch.backends.cuda import (
            SDPAParams,
            can_use_cudnn_attention,
            can_use_efficient_attention,
            can_use_flash_attention,
        )

        params = SDPAParams(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask, 0.0, False, gqa)
        for name, usable in (
            ("cudnn", can_use_cudnn_attention),
            ("flash", can_use_flash_attention),
            ("efficient", can_use_efficient_attention),
        ):
            if usable(params, False):
                return name
        return "math" if q.is_cuda else "cpu"
    except (ImportError, TypeError, RuntimeError) as e:  # the checks' signature moves between versions
        return f"unknown ({type(e).__name__})"


def sdpa_kernel_for(mask, attn_mask, hq, hkv, d, dtype) -> str:
    q = torch.empty(mask.num_queries, hq, d, device=mask.device, dtype=dtype)
    kv = torch.empty(mask.num_keys, hkv if sdpa_supports_gqa() else hq, d, device=mask.device, dtype=dtype)
    return sdpa_kernel(q, kv, kv, attn_mask, hq != kv.shape[1])


def _sdpa_fn(attn_mask, hq, hkv):
    gqa = hq != hkv
    native_gqa = sdpa_supports_gqa()

    def run(q, k, v):
        if gqa and not native_gqa:  # torch < 2.5: no enable_gqa, expand K/V
            k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        extra = {"enable_gqa": True} if gqa and native_gqa else {}
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], attn_mask=attn_mask, **extra
        )
        return out[0].transpose(0, 1)

    return run


def _flash_fn(module_name, cu, n_tokens):
    module = __import__(module_name)
    max_len = int((cu[1:] - cu[:-1]).max())

    def run(q, k, v):
        out = module.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
        return out[0] if isinstance(out, tuple) else out

    return run


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        return False


def _timed_ms(build):
    """(result, wall ms of one synchronised call)."""
    t0 = time.perf_counter()
    out = build()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, (time.perf_counter() - t0) * 1e3


def make_method(name, mask, cu, hq, hkv, n_tokens, dtype, args):
    """A Method, or a string saying why it is skipped. With ``args.stand_in`` (the CPU dry run)
    a kernel backend that cannot run here has the reference standing in, so the row's code
    path still runs."""
    if name in ("triton", "cuda", "reference"):
        info = tk.available_backends(mask.device)[name]
        if not info.available:
            if not args.stand_in:
                return info.reason
            return Method(
                lambda q, k, v: tk.hybrid_attention(q, k, v, mask, backend="reference"),
                mask.visible_pairs(),
                mask,
                note=f"reference standing in: {info.reason}",
            )
        return Method(lambda q, k, v: tk.hybrid_attention(q, k, v, mask, backend=name), mask.visible_pairs(), mask)
    if name == "flex":
        block_mask, first_s, steady_ms = flex_block_mask(mask)
        return Method(
            _flex_fn(block_mask, hq, hkv),
            mask.visible_pairs(),
            mask,
            backward=mask.device.type == "cuda",  # FlexAttention has no CPU backward
            setup={"mask_compile_s": first_s, "mask_build_ms": steady_ms},
        )
    if name == "sdpa":
        if n_tokens > args.sdpa_max_tokens:
            return f"dense N x N mask over {n_tokens} tokens (limit --sdpa-max-tokens {args.sdpa_max_tokens})"
        attn_mask, build_ms = _timed_ms(lambda: additive_mask(mask, dtype))
        note = "naive baseline: dense additive mask" + ("" if sdpa_supports_gqa() or hq == hkv else ", K/V expanded")
        kernel = sdpa_kernel_for(mask, attn_mask, hq, hkv, args.head_dim, dtype)
        return Method(
            _sdpa_fn(attn_mask, hq, hkv),
            mask.visible_pairs(),
            mask,
            note=note,
            setup={"mask_build_ms": build_ms, "sdpa_kernel": kernel},
        )
    if name in ("fa2", "fa3"):
        module = "flash_attn" if name == "fa2" else "flash_attn_interface"
        if not _importable(module):
            return f"{module} is not importable"
        causal = tk.HybridMask.causal(cu)
        return Method(
            _flash_fn(module, cu, n_tokens),
            causal.visible_pairs(),
            causal,
            note="speed reference: document-causal mask only (not the same mask)",
        )
    raise ValueError(f"unknown method {name!r}")


# ----------------------------------------------------------------------------- measurement
def oracle(mask, q, k, v, dout, backward: bool):
    """fp32 reference output (and gradients) on the same inputs."""
    q32, k32, v32 = (t.detach().float().requires_grad_(backward) for t in (q, k, v))
    with torch.set_grad_enabled(backward):
        out = tk.hybrid_attention(q32, k32, v32, mask, backend="reference")
        grads = torch.autograd.grad(out, (q32, k32, v32), dout.float()) if backward else None
    return out.detach(), grads


_ORACLES = {}


def check(method, q, k, v, dout, backward: bool) -> dict:
    """The method's largest errors against the fp32 reference, before any timing."""
    key = (id(method.oracle_mask), backward)
    if key not in _ORACLES:
        _ORACLES.clear()
        _ORACLES[key] = (method.oracle_mask, oracle(method.oracle_mask, q, k, v, dout, backward))
    _, (ref_out, ref_grads) = _ORACLES[key]
    qg, kg, vg = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
    with torch.set_grad_enabled(backward):
        out = method.fn(qg, kg, vg)
        errors = {"err_out": max_error(out, ref_out)}
        if backward:
            grads = torch.autograd.grad(out, (qg, kg, vg), dout)
            errors.update({f"err_d{n}": max_error(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
    errors["ref_max_abs_out"] = float(ref_out.abs().max())
    return errors


def measure(method, q, k, v, dout, d, hq, args):
    """Medians, TFLOP/s and peak memory of one method."""
    row = {}
    fwd_flops = 4 * d * hq * method.pairs
    with torch.no_grad():
        row["fwd_ms"] = do_bench(lambda: method.fn(q, k, v), warmup=args.warmup, rep=args.rep, device=q.device)
    row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
    if args.no_backward or not method.backward:
        return row
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = method.fn(qg, kg, vg)
    row["bwd_ms"] = do_bench(
        lambda o=out: torch.autograd.grad(o, (qg, kg, vg), dout, retain_graph=True),
        warmup=args.warmup,
        rep=args.rep,
        device=q.device,
    )
    row["bwd_tflops"] = 2.5 * fwd_flops / row["bwd_ms"] / 1e9
    del out

    def fwd_bwd():
        torch.autograd.grad(method.fn(qg, kg, vg), (qg, kg, vg), dout)

    row["fwdbwd_ms"] = do_bench(fwd_bwd, warmup=args.warmup, rep=args.rep, device=q.device)
    row["fwdbwd_tflops"] = 3.5 * fwd_flops / row["fwdbwd_ms"] / 1e9
    row["peak_mem_mb"] = peak_memory_mb(fwd_bwd, q.device)
    return row


def _status(row) -> str:
    if "skipped" in row:
        return f"skipped: {row['skipped']}"
    if "error" in row:
        return f"error: {row['error']}"
    text = f"fwd {row['fwd_ms']:8.3f} ms {row['fwd_tflops']:7.1f} TF/s"
    if "fwdbwd_ms" in row:
        text += f" | fwd+bwd {row['fwdbwd_ms']:8.3f} ms {row['fwdbwd_tflops']:7.1f} TF/s"
    errs = " ".join(f"{k[4:]}={row[k]:.1e}" for k in row if k.startswith("err_"))
    return f"{text} | max err {errs}" + (f" ({row['note']})" if row.get("note") else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="mix,text,causal")
    p.add_argument("--tokens", default="8192,32768")
    p.add_argument("--heads", default="16,32", help="query heads; kv heads = heads / --gqa")
    p.add_argument("--gqa", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--methods", default="triton,cuda,flex,sdpa,fa2,fa3")
    p.add_argument("--sdpa-max-tokens", type=int, default=16384)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--warmup", type=int, default=25)
    p.add_argument("--rep", type=int, default=100)
    p.add_argument("--name", default="attention", help="JSON file name (without .json)")
    p.add_argument(
        "--root", default=None, help="results root (default benchmarks/results; a temporary folder for --smoke)"
    )
    p.add_argument(
        "--triton-config",
        default=None,
        help="12 ints overriding the triton kernels' config for this head dim and dtype: "
        "fwd, dk/dv, dq, each BM (query rows),BN (key rows),warps,stages, optionally followed by its "
        "flags (1: TMA loads, 2: transposed dk/dv), e.g. 128,128,8,2,1,128,64,8,2,2,128,64,8,2,1",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU harness check: tiny shapes, every method, the reference standing in for a backend "
        "that cannot run here; no speed claims",
    )
    args = p.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        args.tokens, args.heads, args.gqa, args.head_dim, args.dtype = "128", "2", 2, 16, "float32"
        args.warmup, args.rep = 0, 1
        doc_len, image_sizes = 64, (8, 24)
        out_root = args.root or tempfile.mkdtemp(prefix="tk-bench-smoke-")
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --smoke on a CPU")
        device = torch.device("cuda")
        doc_len, image_sizes = DOC_LEN, IMAGE_SIZES
        out_root = args.root
    args.stand_in = args.smoke
    dtype = getattr(torch, args.dtype)
    d = args.head_dim
    methods = [m for m in args.methods.split(",") if m]
    triton_config = None
    if "triton" in methods and tk.available_backends(device)["triton"].available:
        from transfusion_kernels.attention import triton as tk_triton

        if args.triton_config:
            tk_triton.set_config(d, dtype, tk_triton.AttentionConfig.from_list(args.triton_config.split(",")))
        triton_config = dataclasses.asdict(tk_triton.pick_config(d, dtype, device))
    config = dict(
        vars(args),
        triton_kernel_config=triton_config,
        sdpa_enable_gqa=sdpa_supports_gqa(),
        compile_backend=compile_backend(),
        oracle="reference backend, fp32, same inputs",
        flops="fwd 4*D*Hq*pairs, bwd 2.5x, fwd+bwd 3.5x",
    )
    rows, path = [], None
    for workload in args.workloads.split(","):
        for n in (int(x) for x in args.tokens.split(",")):
            (mask, cu, spans), mask_ms = _timed_ms(lambda: build_mask(workload, n, device, doc_len, image_sizes))
            _, tiles_ms = _timed_ms(lambda: (plan.query_runs(mask, 128), plan.key_tiles(mask, 64)))
            pairs = mask.visible_pairs()
            for hq in (int(x) for x in args.heads.split(",")):
                hkv = max(1, hq // args.gqa)
                gen = torch.Generator(device=device).manual_seed(n * 1000 + hq)
                q, k, v, dout = (
                    torch.randn(n, h, d, device=device, dtype=dtype, generator=gen) for h in (hq, hkv, hkv, hq)
                )
                base = {
                    "workload": workload,
                    "tokens": n,
                    "images": len(spans),
                    "hq": hq,
                    "hkv": hkv,
                    "d": d,
                    "dtype": args.dtype,
                    "visible_pairs": pairs,
                    "density": pairs / (n * n),
                    "hybrid_mask_build_ms": mask_ms + tiles_ms,
                }
                for name in methods:
                    row = dict(base, method=name)
                    try:
                        method = make_method(name, mask, cu, hq, hkv, n, dtype, args)
                        if isinstance(method, str):
                            row["skipped"] = method
                        else:
                            row.update(method.setup, method_pairs=method.pairs)
                            if method.note:
                                row["note"] = method.note
                            backward = method.backward and not args.no_backward
                            if not backward and not args.no_backward:
                                row["bwd_skipped"] = "no backward on this device"
                            row.update(check(method, q, k, v, dout, backward))
                            row.update(measure(method, q, k, v, dout, d, hq, args))
                    except Exception as e:  # noqa: BLE001 - record the failure, keep benchmarking
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(row)
                    print(f"{workload:6s} N={n:6d} Hq={hq:3d} {name:9s} {_status(row)}", flush=True)
                    path = write_json(args.name, rows, config, device, out_root)  # a cut-off run keeps its rows
    print()
    print(
        markdown_table(
            [r for r in rows if "fwd_ms" in r],
            [
                "workload",
                "tokens",
                "hq",
                "method",
                "fwd_ms",
                "fwd_tflops",
                "bwd_ms",
                "bwd_tflops",
                "fwdbwd_tflops",
                "err_out",
                "err_dq",
                "peak_mem_mb",
            ],
        )
    )
    print(f"\nresults: {path}")
    return rows, path


if __name__ == "__main__":
    main()
