"""Benchmark: the NSA op (Triton path) against dense causal SDPA, forward and forward+backward, all-video sequences.

    python benchmarks/attention.py [--tokens 8192 16384 32768] [--shape A] [--out BENCHMARKS.md]

Shape A is Qwen2.5-VL-7B's language model (28 query heads over 4 KV heads, head dim 128, bf16, ``videonsa`` preset).
Times are medians of ``triton.testing.do_bench`` (ms); memory is the peak allocated during one forward+backward.
Prints a markdown table; ``--out`` appends it with the date, GPU and versions.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F

from nsa_compile import NSAConfig
from nsa_compile.kernels import nsa_attention

SHAPES = {"A": dict(Hq=28, Hkv=4, D=128, preset="videonsa")}


def measure(fn, backward: bool):
    import triton

    def step():
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
        return out

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return triton.testing.do_bench(step, warmup=3, rep=20), peak


def run(tokens: list[int], shape: str) -> list[str]:
    s = SHAPES[shape]
    cfg = NSAConfig.preset(s["preset"])
    rows = []
    for T in tokens:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, s["Hq"], T, s["D"], device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        k = torch.randn(1, s["Hkv"], T, s["D"], device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        v = torch.randn(1, s["Hkv"], T, s["D"], device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        gates = torch.rand(1, s["Hq"], T, 3, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        vm = torch.ones(1, T, dtype=torch.bool, device="cuda")

        def dense():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def nsa():
            return nsa_attention(q, k, v, gates, vm, cfg)

        res = {}
        for name, fn in (("dense", dense), ("nsa", nsa)):
            with torch.no_grad():
                res[name, "fwd"] = measure(fn, False)
            res[name, "fwdbwd"] = measure(fn, True)
        d_f, d_b = res["dense", "fwd"][0], res["dense", "fwdbwd"][0]
        n_f, n_b = res["nsa", "fwd"][0], res["nsa", "fwdbwd"][0]
        rows.append(f"| {shape} | {T} | {d_f:.2f} | {n_f:.2f} | {d_f / n_f:.2f}× | {d_b:.2f} | {n_b:.2f} | "
                    f"{d_b / n_b:.2f}× | {res['dense', 'fwdbwd'][1]:.0f} | {res['nsa', 'fwdbwd'][1]:.0f} |")
        print(rows[-1], flush=True)
    return rows


HEADER = ("| shape | tokens | dense fwd ms | NSA fwd ms | fwd speed-up | dense fwd+bwd ms | NSA fwd+bwd ms | "
          "fwd+bwd speed-up | dense peak MiB | NSA peak MiB |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--shape", default="A", choices=sorted(SHAPES))
    ap.add_argument("--out", help="append the table to this markdown file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    print(HEADER, flush=True)
    rows = run(args.tokens, args.shape)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n### {datetime.date.today()} — {torch.cuda.get_device_name()}, torch {torch.__version__}, "
                    f"triton {triton.__version__}\n\n`python benchmarks/attention.py --tokens "
                    f"{' '.join(map(str, args.tokens))} --shape {args.shape}`\n\n{HEADER}\n" + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
