"""Where the time of the NSA op's Triton path goes, stage by stage (CUDA events, ms), for one all-video sequence.

    python benchmarks/nsa_breakdown.py [--tokens 32768 131072]
"""

from __future__ import annotations

import argparse

import torch

from nsa_compile import NSAConfig
from nsa_compile.kernels import nsa_triton as nt
from nsa_compile.kernels import segment_attention as sa


def timed(label, fn, log):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize()
    log.append((label, start.elapsed_time(end)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    args = ap.parse_args(argv)
    cfg = NSAConfig.preset("videonsa")
    for T in args.tokens:
        q = torch.randn(1, 28, T, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 4, T, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        gates = torch.rand(1, 28, T, 3, device="cuda", dtype=torch.bfloat16)
        vm = torch.ones(1, T, dtype=torch.bool, device="cuda")
        scale = 128 ** -0.5
        params = (cfg.block_size, cfg.block_stride, cfg.selection_block_size, cfg.top_n, cfg.window_size)
        for _ in range(2):  # second round is the warm one
            log = []
            orig_plan, orig_fwd = nt._selection_plan, sa.segment_attention_fwd
            nt._selection_plan = lambda *a, **kw: timed("selection plan (scores, top-n, union)",
                                                        lambda: orig_plan(*a, **kw), log)
            nt.segment_attention_fwd = lambda q_, k_, v_, s_, plan: timed(
                f"kernel fwd mode {plan.mode}", lambda: orig_fwd(q_, k_, v_, s_, plan), log)
            timed("total forward", lambda: nt.nsa_triton_forward(q, k, v, gates, vm, scale, *params), log)
            go = torch.randn_like(q)
            timed("total backward (recompute + bwd)", lambda: nt.nsa_triton_backward(go, q, k, v, gates, vm, scale,
                                                                                  *params), log)
            nt._selection_plan, nt.segment_attention_fwd = orig_plan, orig_fwd
        print(f"T={T}: " + "; ".join(f"{a} {b:.1f}" for a, b in log), flush=True)


if __name__ == "__main__":
    main()
