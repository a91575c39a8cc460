"""Where the time of the NSA op's Triton path goes, stage by stage (CUDA events, ms), for one all-video sequence of
shape A or B of `benchmarks/attention.py` (A: Qwen2.5-VL-7B's attention, 28 query heads over 4 KV heads, ``videonsa``
preset; B: fla-core's setting, 64 query heads over 4 KV heads, top-16 blocks of 64, no window; head dim 128, bf16).

    python benchmarks/nsa_breakdown.py [--tokens 32768 131072] [--shape A]
"""

from __future__ import annotations

import argparse

import torch

from nsa_compile.kernels import nsa_triton as nt

from attention import SHAPES  # benchmarks/attention.py (the script's folder is on sys.path)

STAGES = ("segment_attention_fwd", "selection_fwd", "segment_attention_bwd", "select_topn", "compress_kv", "_unpool",
          "_prepare")
MODES = {0: "dense", 1: "window", 2: "compression", 3: "selection"}


def timed(label, fn, log):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    log[label] = log.get(label, 0.0) + start.elapsed_time(end)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--shape", default="A", choices=sorted(SHAPES))
    args = ap.parse_args(argv)
    shape = SHAPES[args.shape]
    cfg = shape["config"]()
    Hq, Hkv, D = shape["Hq"], shape["Hkv"], shape["D"]
    params = (cfg.block_size, cfg.block_stride, cfg.selection_block_size, cfg.top_n, cfg.window_size)
    for T in args.tokens:
        q = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, T, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        gates = torch.rand(1, Hq, T, 3, device="cuda", dtype=torch.bfloat16)
        vm = torch.ones(1, T, dtype=torch.bool, device="cuda")
        go = torch.randn_like(q)
        for rnd in range(2):  # the second round is the warm one
            log: dict[str, float] = {}
            orig = {name: getattr(nt, name) for name in STAGES}

            def wrap(name):
                def f(*a, **kw):
                    plan = next((x for x in a if isinstance(x, nt.SegmentPlan)), None)
                    label = name if plan is None else f"{name} {MODES[plan.mode]}"
                    return timed(label, lambda: orig[name](*a, **kw), log)
                return f

            for name in STAGES:
                setattr(nt, name, wrap(name))
            try:
                timed("TOTAL forward", lambda: nt.nsa_triton_forward(q, k, v, gates, vm, D ** -0.5, *params), log)
                timed("TOTAL backward", lambda: nt.nsa_triton_backward(go, q, k, v, gates, vm, D ** -0.5, *params),
                      log)
            finally:
                for name in STAGES:
                    setattr(nt, name, orig[name])
        print(f"shape {args.shape} T={T} (ms, forward then backward, stages summed over both): "
              + "; ".join(f"{a} {b:.1f}" for a, b in log.items()), flush=True)


if __name__ == "__main__":
    main()
