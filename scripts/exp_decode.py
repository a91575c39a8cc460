"""Per-kernel GPU time of the sparse-decode kernels under launch variants (splits, warps), torch.profiler per
variant, with the relative difference of each variant's output from the default's; ``--phases`` adds copies of the
select kernel with phases cut out (their picks are wrong: timing only), which split its time into scoring and
radix passes.

    python scripts/exp_decode.py [--tokens 131072] [--phases]    # on a GPU machine

Qwen2.5-VL-7B's attention shape (28 query heads over 4 KV heads, head dim 128, bf16), ``videonsa`` preset.
"""
import argparse
import math

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from nsa_compile import NSAConfig
from nsa_compile.kernels import decode as dec

ORIG = {n: getattr(dec, n) for n in ("_dec_cmp_kernel", "_dec_select_kernel", "_dec_attn_kernel",
                                     "_dec_combine_kernel")}


class Over:
    def __init__(self, k, **o):
        self.k, self.o = k, o

    def __getitem__(self, grid):
        def f(*a, **kw):
            kw.update(self.o)
            return self.k[grid](*a, **kw)
        return f


def select_variants():
    """Copies of _dec_select_kernel with phases cut (timing only: their picks are wrong)."""
    import importlib.util
    import inspect
    import os
    import tempfile
    src = inspect.getsource(ORIG["_dec_select_kernel"].fn)
    src = "\n".join(line[4:] for line in src.splitlines())
    cuts = {
        "1 radix pass": ("for ps in tl.static_range(4):", "for ps in tl.static_range(1):"),
        "no radix": ("for ps in tl.static_range(4):", "for ps in tl.static_range(0):"),
        "no scoring": ("for gg in tl.static_range(G):", "for gg in tl.static_range(0):"),
    }
    mods = {}
    d = tempfile.mkdtemp()
    for i, (name, (a, b)) in enumerate(cuts.items()):
        assert a in src, a
        path = os.path.join(d, f"selvar{i}.py")
        with open(path, "w") as f:
            f.write("import triton\nimport triton.language as tl\n\n\n" + src.replace(a, b))
        spec = importlib.util.spec_from_file_location(f"selvar{i}", path)
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        mods[name] = m._dec_select_kernel
    return mods


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--phases", action="store_true")
    args = ap.parse_args()
    T = args.tokens
    c = NSAConfig.preset("videonsa")
    Hq, Hkv, D = 28, 4, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    k, v = (torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    q = torch.randn(1, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    gates = torch.rand(1, Hq, 1, 3, device="cuda", dtype=torch.bfloat16, generator=g)
    vm = torch.ones(1, T - 1, dtype=torch.bool, device="cuda")
    vm[:, T - 64:] = False
    state = dec.build_decode_state(k[:, :, :T - 1], v[:, :, :T - 1], vm, c.block_size, c.block_stride,
                                   c.selection_block_size)
    scale = 1 / math.sqrt(D)
    out = torch.empty_like(q)
    ref = dec.sparse_decode_triton(q, k, v, gates, state, scale, c.top_n, c.window_size).clone()
    dense_us = triton.testing.do_bench_cudagraph(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)) * 1e3
    variants = [("default", {}, {}), ("S1=16", dict(split_cmp=16), {}), ("S2=40", dict(split_attn=40), {}),
                ("S2=12", dict(split_attn=12), {}),
                ("select warps 16", {}, {"_dec_select_kernel": Over(ORIG["_dec_select_kernel"], num_warps=16)}),
                ("select warps 4", {}, {"_dec_select_kernel": Over(ORIG["_dec_select_kernel"], num_warps=4)})]
    if args.phases:
        variants += [(f"select {name}", {}, {"_dec_select_kernel": kern}) for name, kern in select_variants().items()]
    print(f"T={T} dense decode cudagraph µs {dense_us:.1f}")
    for name, kw, patch in variants:
        for n, kern in ORIG.items():
            setattr(dec, n, patch.get(n, kern))
        try:
            fn = lambda: dec.sparse_decode_triton(q, k, v, gates, state, scale, c.top_n, c.window_size, out=out, **kw)  # noqa
            fn()
            torch.cuda.synchronize()
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            tot = triton.testing.do_bench_cudagraph(fn) * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
            per = {}
            for e in prof.key_averages():
                if e.key.startswith("_dec_"):
                    t = getattr(e, "self_device_time_total", None) or e.self_cuda_time_total
                    per[e.key[5:-7]] = t / e.count
            print(f"{name:24s} total {tot:7.1f} µs  ({dense_us / tot:4.2f}x dense)  " +
                  "  ".join(f"{kk} {vv:6.1f}" for kk, vv in per.items()) + f"  err {err:.1e}", flush=True)
        except Exception as e:  # noqa
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    for n, kern in ORIG.items():
        setattr(dec, n, kern)


if __name__ == "__main__":
    main()
