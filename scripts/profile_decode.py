"""GPU time of each sparse-decode kernel at one cache length (torch.profiler), against dense SDPA decode; the
op's wall time per call and where its host side goes (per part, per aten op, cProfile); then each kernel's time
under launch variants (the selection spread over the compression programs, in their last one or in its own
launch; with or without programmatic dependent launch; splits of the compression and attention kernels), each
variant's output checked against the default's; last, how many of ``--repeat-check`` runs differ bitwise from the
first (the hand-over between programs and kernels).

    python scripts/profile_decode.py [--tokens 131072]   # on a GPU machine

Qwen2.5-VL-7B's attention shape (28 query heads over 4 KV heads, head dim 128, bf16), the ``videonsa`` preset, a
cache of video tokens then 64 text tokens, one new text query.
"""
import argparse
import cProfile
import math
import pstats
import time

import torch
import torch.nn.functional as F
import triton
from torch.profiler import ProfilerActivity, profile

from nsa_compile import NSAConfig
from nsa_compile.kernels import decode as dec

KERNELS = ("_dec_cmp_kernel", "_dec_select_kernel", "_dec_attn_kernel", "_dec_combine_kernel")


def variant_table(run, out, variants, dense_us: float) -> None:
    """Per variant (name, sparse_decode_triton kwargs, {kernel name: replacement}): the total (CUDA graph), each
    kernel's time (torch.profiler) and the output's relative difference from the default launch's."""
    original = {n: getattr(dec, n) for n in KERNELS}
    run()
    ref = out.float().clone()
    try:
        for name, kw, patch in variants:
            for n in KERNELS:
                setattr(dec, n, patch.get(n, original[n]))
            fn = lambda: run(**kw)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            diff = ((out.float() - ref).norm() / ref.norm()).item()
            total = triton.testing.do_bench_cudagraph(fn) * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
            per = {e.key[5:-7]: (getattr(e, "self_device_time_total", None) or e.self_cuda_time_total) / e.count
                   for e in prof.key_averages() if e.key.startswith("_dec_")}
            print(f"{name:22s} total {total:7.1f} µs ({dense_us / total:4.2f}× dense)  "
                  + "  ".join(f"{kk} {vv:6.1f}" for kk, vv in per.items()) + f"  diff {diff:.1e}", flush=True)
    finally:
        for n in KERNELS:
            setattr(dec, n, original[n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeat-check", type=int, default=2000, help="runs compared bitwise with the first")
    args = ap.parse_args()
    c = NSAConfig.preset("videonsa")
    T, Hq, Hkv, D = args.tokens, 28, 4, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    k, v = (torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    q = torch.randn(1, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    gates = torch.rand(1, Hq, 1, 3, device="cuda", dtype=torch.bfloat16, generator=g)
    vm = torch.ones(1, T, dtype=torch.bool, device="cuda")
    vm[:, T - 64:] = False
    state = dec.build_decode_state(k[:, :, :T - 1], v[:, :, :T - 1], vm[:, :T - 1], c.block_size, c.block_stride,
                                   c.selection_block_size)
    scale = 1 / math.sqrt(D)
    out = torch.empty_like(q)

    def sparse(**launch):
        dec.sparse_decode_triton(q, k, v, gates, state, scale, c.top_n, c.window_size, out=out, **launch)

    def dense():
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    for fn in (sparse, dense):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            sparse()
            dense()
        torch.cuda.synchronize()
    print(f"cache {T} tokens, {args.iters} iterations; NC={state.k_cmp.shape[2]} NS={state.sel_start.shape[1]} "
          f"NT={state.txt_start.shape[1]} band_width={state.band_width}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    dense_us = triton.testing.do_bench_cudagraph(dense) * 1e3
    print("cudagraph µs: sparse", triton.testing.do_bench_cudagraph(sparse) * 1e3, "dense", dense_us)
    # The op as the model calls it: state lookup (one host sync), then the kernels; wall time and where the host
    # spends it.
    dec.STATES.clear()
    dec.STATES.put(state)
    no_video = torch.zeros(1, 1, dtype=torch.bool, device="cuda")

    def op():
        torch.ops.nsa_compile.nsa_attention_sparse_decode(q, k, v, gates, no_video, None, scale, c.block_size,
                                                          c.block_stride, c.selection_block_size, c.top_n,
                                                          c.window_size)

    op()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        op()
    torch.cuda.synchronize()
    print(f"op wall µs per call: {(time.perf_counter() - t0) / args.iters * 1e6:.1f} (state hits "
          f"{dec.STATES.stats['hits']})")
    # Host time of the op's parts (each enqueued back to back without a sync, so the GPU does not set the pace,
    # except for the lookup, whose host sync is part of its cost).
    key = dec.state_key(k, v, c.block_size, c.block_stride, c.selection_block_size)
    last = torch.zeros(1, dtype=torch.long, device="cuda")

    def host_us(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / args.iters * 1e6

    for name, fn in (("state lookup (gather, compare, one host sync)", lambda: dec.STATES.lookup(k, v, key, last)),
                     ("sparse_decode_triton (buffers + 3 launches)", sparse),
                     ("dense SDPA", dense),
                     ("whole op", op)):
        print(f"host µs per call: {name}: {host_us(fn):.1f}")
    # Where the op's host time goes, op by op (CPU self time, including the dispatch of the custom op itself).
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            op()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.iters):
        op()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    # Schedules: the selection spread over the compression kernel's programs of each row (default where it can),
    # in the row's last one, or in its own launch; programmatic dependent launch (default on sm_90) or not;
    # programs per row of the compression kernel (S1, default: one 64-block tile each) and of the attention kernel
    # (S2).
    variants = [("default", {}, {}), ("spread", dict(schedule="spread"), {}),
                ("last", dict(schedule="last"), {}), ("separate", dict(schedule="separate"), {}),
                ("spread, no pdl", dict(schedule="spread", pdl=False), {}),
                ("last, no pdl", dict(schedule="last", pdl=False), {})] + \
        [(f"S1={s1}", dict(split_cmp=s1), {}) for s1 in (8, 16)] + \
        [(f"S2={s2}", dict(split_attn=s2), {}) for s2 in (12, 32)]
    variant_table(sparse, out, variants, dense_us)
    # The fused launches hand partials between programs through L2 (a ticket per row): a missing release/acquire
    # would show as runs whose output differs from the first run's (the kernels are otherwise deterministic).
    sparse()
    first = out.clone()
    bad = 0
    for _ in range(args.repeat_check):
        sparse()
        bad += int(not torch.equal(out, first))
    print(f"repeatability: {bad} of {args.repeat_check} runs differ bitwise from the first")

if __name__ == "__main__":
    main()
