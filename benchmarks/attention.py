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
  flex        torch.compile(flex_attention) with mask.to_flex_block_mask(), same mask
  sdpa        F.scaled_dot_product_attention with the dense N x N mask (skipped above
              --sdpa-max-tokens: the mask would not fit or would dominate)
  fa2 / fa3   flash_attn(_interface).flash_attn_varlen_func(causal=True) over the documents:
              a speed reference only; it computes the document-causal mask (no bidirectional
              images), and its TFLOP/s are counted on that mask's own pairs
  reference   the pure-PyTorch backend (used by --smoke)

Effective TFLOP/s use the pairs the mask allows: forward = 4 * D * Hq * visible_pairs,
backward = 2.5 x forward (DESIGN.md section 1). Times are medians (triton.testing.do_bench);
peak memory is what one forward + backward allocates above the inputs.

    python benchmarks/attention.py                 # GPU, every workload; JSON in benchmarks/results/
    python benchmarks/attention.py --workloads mix --tokens 8192 --heads 16
    python benchmarks/attention.py --smoke         # CPU: tiny shapes, reference backend only
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import transfusion_kernels as tk  # noqa: E402
from benchmarks.common import do_bench, markdown_table, peak_memory_mb, write_json  # noqa: E402

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
def _flex_fn(mask, hq, hkv):
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = mask.to_flex_block_mask()
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        # [N, H, D] -> [1, H, N, D] views (no copies), and back
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=hq != hkv)
        return out[0].transpose(0, 1)

    return run


def _sdpa_fn(mask, hq, hkv):
    import torch.nn.functional as F

    dense = mask.to_dense()

    def run(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                             attn_mask=dense, enable_gqa=hq != hkv)
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


def make_method(name, mask, cu, hq, hkv, n_tokens, args):
    """(callable(q, k, v) -> out, pairs it computes, note) or (None, None, reason to skip)."""
    if name in ("triton", "cuda", "reference"):
        info = tk.available_backends(mask.device)[name]
        if not info.available:
            return None, None, info.reason
        return (lambda q, k, v: tk.hybrid_attention(q, k, v, mask, backend=name)), mask.visible_pairs(), ""
    if name == "flex":
        return _flex_fn(mask, hq, hkv), mask.visible_pairs(), ""
    if name == "sdpa":
        if n_tokens > args.sdpa_max_tokens:
            return None, None, f"dense N x N mask over {n_tokens} tokens (limit --sdpa-max-tokens {args.sdpa_max_tokens})"
        return _sdpa_fn(mask, hq, hkv), mask.visible_pairs(), "dense mask"
    if name in ("fa2", "fa3"):
        module = "flash_attn" if name == "fa2" else "flash_attn_interface"
        if not _importable(module):
            return None, None, f"{module} is not importable"
        causal_pairs = tk.HybridMask.causal(cu).visible_pairs()
        return _flash_fn(module, cu, n_tokens), causal_pairs, "document-causal only (not the same mask)"
    raise ValueError(f"unknown method {name!r}")


# ----------------------------------------------------------------------------- measurement
def measure(fn, q, k, v, dout, pairs, d, hq, args, reference_out=None):
    """Medians, TFLOP/s and peak memory of one method; also its output (for the cross-check)."""
    row = {}
    fwd_flops = 4 * d * hq * pairs
    with torch.no_grad():
        fwd_ms = do_bench(lambda: fn(q, k, v), warmup=args.warmup, rep=args.rep, device=q.device)
    row["fwd_ms"] = fwd_ms
    row["fwd_tflops"] = fwd_flops / fwd_ms / 1e9
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(qg, kg, vg)
    if reference_out is not None:
        row["max_abs_diff_vs_first"] = float((out.detach().float() - reference_out.float()).abs().max())
    if not args.no_backward:
        bwd_ms = do_bench(lambda: torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True),
                          warmup=args.warmup, rep=args.rep, device=q.device)
        row["bwd_ms"] = bwd_ms
        row["bwd_tflops"] = 2.5 * fwd_flops / bwd_ms / 1e9
    del out

    def fwd_bwd():
        o = fn(qg, kg, vg)
        if not args.no_backward:
            torch.autograd.grad(o, (qg, kg, vg), dout)

    row["peak_mem_mb"] = peak_memory_mb(fwd_bwd, q.device)
    with torch.no_grad():
        return row, fn(q, k, v)


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
    p.add_argument("--root", default=None, help="results root (default benchmarks/results; a temporary folder for --smoke)")
    p.add_argument("--triton-config", default=None,
                   help="12 ints overriding the triton kernels' config for this head dim and dtype: "
                        "fwd BM,BN,warps,stages, dk/dv BN,BM,warps,stages, dq BM,BN,warps,stages")
    p.add_argument("--smoke", action="store_true", help="CPU harness check: tiny shapes, reference backend")
    args = p.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        args.tokens, args.heads, args.head_dim, args.dtype = "256", "4", 32, "float32"
        args.methods, args.warmup, args.rep = "reference,sdpa", 1, 3
        doc_len, image_sizes = 128, (16, 48)
        out_root = args.root or tempfile.mkdtemp(prefix="tk-bench-smoke-")
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --smoke on a CPU")
        device = torch.device("cuda")
        doc_len, image_sizes = DOC_LEN, IMAGE_SIZES
        out_root = args.root
    dtype = getattr(torch, args.dtype)
    d = args.head_dim
    methods = [m for m in args.methods.split(",") if m]
    triton_config = None
    if "triton" in methods and tk.available_backends(device)["triton"].available:
        from transfusion_kernels.attention import triton as tk_triton

        if args.triton_config:
            key = (tk_triton._padded_head_dim(d), torch.empty(0, dtype=dtype).element_size())
            tk_triton.GPU_CONFIGS[key] = tk_triton.Config(*(int(x) for x in args.triton_config.split(",")))
        triton_config = dataclasses.asdict(tk_triton.pick_config(d, dtype, device))
    rows = []
    for workload in args.workloads.split(","):
        for n in (int(x) for x in args.tokens.split(",")):
            mask, cu, spans = build_mask(workload, n, device, doc_len, image_sizes)
            pairs = mask.visible_pairs()
            for hq in (int(x) for x in args.heads.split(",")):
                hkv = max(1, hq // args.gqa)
                gen = torch.Generator(device=device).manual_seed(0)
                q = torch.randn(n, hq, d, device=device, dtype=dtype, generator=gen)
                k = torch.randn(n, hkv, d, device=device, dtype=dtype, generator=gen)
                v = torch.randn(n, hkv, d, device=device, dtype=dtype, generator=gen)
                dout = torch.randn(n, hq, d, device=device, dtype=dtype, generator=gen)
                base = {"workload": workload, "tokens": n, "images": len(spans), "hq": hq, "hkv": hkv, "d": d,
                        "dtype": args.dtype, "visible_pairs": pairs, "density": pairs / (n * n)}
                ref_out = None
                for name in methods:
                    fn, method_pairs, note = make_method(name, mask, cu, hq, hkv, n, args)
                    row = dict(base, method=name)
                    if fn is None:
                        row["skipped"] = note
                        rows.append(row)
                        print(f"{workload:6s} N={n:6d} Hq={hq:3d} {name:9s} skipped: {note}", flush=True)
                        continue
                    if note:
                        row["note"] = note
                    row["method_pairs"] = method_pairs
                    same_mask = name not in ("fa2", "fa3")
                    try:
                        res, out = measure(fn, q, k, v, dout, method_pairs, d, hq, args, ref_out if same_mask else None)
                    except Exception as e:  # noqa: BLE001 - record the failure, keep benchmarking
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        rows.append(row)
                        print(f"{workload:6s} N={n:6d} Hq={hq:3d} {name:9s} error: {row['error']}", flush=True)
                        continue
                    if ref_out is None and same_mask:
                        ref_out = out  # the first method's output: the others are checked against it
                    row.update(res)
                    rows.append(row)
                    print(f"{workload:6s} N={n:6d} Hq={hq:3d} {name:9s} fwd {res['fwd_ms']:8.3f} ms "
                          f"{res['fwd_tflops']:7.1f} TF/s" + (f" | bwd {res['bwd_ms']:8.3f} ms {res['bwd_tflops']:7.1f} TF/s"
                                                             if "bwd_ms" in res else ""), flush=True)
    config = dict(vars(args), triton_kernel_config=triton_config)
    path = write_json(args.name, rows, config, device, out_root)
    print()
    print(markdown_table([r for r in rows if "fwd_ms" in r],
                         ["workload", "tokens", "hq", "method", "fwd_ms", "fwd_tflops", "bwd_ms", "bwd_tflops", "peak_mem_mb"]))
    print(f"\nresults: {path}")
    return rows, path


if __name__ == "__main__":
    main()
