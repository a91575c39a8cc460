"""Benchmark: the NSA op (Triton path) against dense causal SDPA and fla-core's NSA, forward and forward+backward,
all-video sequences, batch 1, bf16.

    python benchmarks/attention.py [--tokens 8192 16384 32768 65536 131072] [--shape A B] [--no-floor]
                                   [--out BENCHMARKS.md]

Shapes:

* **A** — Qwen2.5-VL-7B's language model: 28 query heads over 4 KV heads (GQA group 7), head dim 128, the
  ``videonsa`` preset (compression blocks 64 / stride 64, selection blocks 64, top-32, window 256). fla-core cannot
  run it (its NSA kernels need a GQA group that is a power of two and ≥ 16).
* **B** — fla-core's NSA setting: 64 query heads over 4 KV heads (group 16), head dim 128, compression blocks 64 /
  stride 64 (mean-pooled; fla fixes both to its ``block_size``), selection blocks 64, top-16, no sliding window.
  Ours runs with ``window_size=0`` (no sliding-window branch), as fla's call.

Implementations (each on the same random q, k, v and gates, drawn once per shape and length):

* **dense** — ``F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)`` on the FlashAttention
  backend (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``), [B, H, T, D] layout. ``--dense-backend cudnn`` (or
  ``auto``, PyTorch's own choice: cuDNN on an H100 with torch 2.11) times cuDNN's attention instead; on the H100 it
  is ~1.7× faster than the flash backend (FlashAttention-2) here, e.g. shape A at 128K: fwd 217 vs 383 ms,
  fwd+bwd 800 vs 1332 ms.
* **NSA** — ``nsa_compile.kernels.nsa_attention(q, k, v, gates, video_mask, cfg)`` (``torch.ops.nsa_compile.
  nsa_attention``, Triton path): compression, top-n selection, selection, window, gated sum; every token video.
  Each query attends its top-n *past* blocks plus its own block (partly, causally).
* **fla** (shape B only) — fla-core's ``fla.ops.nsa.parallel_nsa(q, k, v, g_cmp, g_slc, g_swa=None,
  block_indices=None, block_counts=16, block_size=64, window_size=0)`` on [B, T, H, D] tensors (the same values,
  transposed once outside the timing). One call does everything of its NSA: mean-pooling of k and v into blocks of
  64 (``mean_pooling``), compressed attention (``parallel_nsa_compression``, gives o_cmp and its log-sum-exp),
  top-16 block selection from the compression scores summed over the GQA group (``parallel_nsa_topk``, a Triton
  kernel with a bitonic sort; the first block and the query's own and previous blocks are always among the 16),
  selected attention over the 16 blocks (``ParallelNSAFunction``), and ``o = g_slc·o_slc + g_cmp·o_cmp``. Its
  backward covers selection, compression and mean pooling (gradients of q, k, v, g_cmp, g_slc); block selection is
  not differentiated, as in ours. So fla's time includes its own top-k; nothing is precomputed. Differences left:
  fla's 16 blocks include the query's own block, ours are 16 past blocks plus the own block (one block more
  per query).
* **floor** — dense attention of every query over as many keys as the NSA configuration attends on average
  (``attention_budget``: compressed blocks + selected keys + own block + window), as a causal sliding window of
  that many keys through ``flex_attention`` (compiled with dynamic shapes, once per head count; block mask built
  from its KV blocks, 128×128 tiles). The time a kernel doing NSA's attention arithmetic at dense-attention
  efficiency would need, without any of NSA's selection work. ``--no-floor`` skips it.

Times are medians of ``triton.testing.do_bench`` (ms; warm-up and repetition budgets scale with the call's time,
so long lengths take a few samples). Memory is the peak allocated above the inputs during one call, forward (under
``torch.no_grad()``) / forward+backward (``torch.autograd.grad`` of all inputs, so no ``.grad`` accumulation). A
cell that runs out of memory reads "OOM". Speed-ups are the other implementation's time over NSA's (> 1: NSA is
faster). Prints a markdown table; ``--out`` appends it with the date, GPU, versions and the command.

Run on a GPU with fla-core carried as wheels (pure Python; ``--no-deps`` keeps the image's torch and triton):

    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python benchmarks/attention.py --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import shlex
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

from nsa_compile import NSAConfig
from nsa_compile.kernels import attention_budget, nsa_attention

DEFAULT_TOKENS = [8192, 16384, 32768, 65536, 131072]
FLA_MISSING = "n/a (fla-core not installed)"


def _describe(cfg: NSAConfig) -> str:
    return ", ".join(f"{f} {getattr(cfg, f)}" for f in ("block_size", "block_stride", "selection_block_size",
                                                         "top_n", "window_size"))


def _shape_b_config() -> NSAConfig:
    return NSAConfig(block_size=64, block_stride=64, selection_block_size=64, top_n=16, window_size=0,
                     gate="constant")


SHAPES = {
    "A": dict(Hq=28, Hkv=4, D=128, config=lambda: NSAConfig.preset("videonsa"), fla=False, window_gate=True),
    "B": dict(Hq=64, Hkv=4, D=128, config=_shape_b_config, fla=True, window_gate=False),
}


# ----------------------------------------------------------------------------------------------- measuring
def _free() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _budget(ms: float, T: int) -> tuple[float, float]:
    """do_bench's (warmup, rep) in ms for a call of about ``ms``: ≥ 50 ms of samples for short calls, 3 samples
    at long lengths."""
    if T <= 16384:
        return max(10.0, ms), max(100.0, 5 * ms)
    return max(2.0, ms), max(50.0, 3 * ms)


def measure(fn, grad_inputs, backward: bool, T: int) -> tuple[float, float]:
    """(median ms, peak MiB above what was allocated before) of ``fn`` alone or with its backward."""
    import triton

    if backward:
        out = fn()
        dout = torch.randn_like(out)
        del out

        def step():
            out = fn()
            torch.autograd.grad(out, grad_inputs, dout)
    else:
        def step():
            with torch.no_grad():
                fn()

    step()  # compiles / autotunes
    _free()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    warmup, rep = _budget(start.elapsed_time(end), T)
    ms = triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median")
    return ms, peak


def _cell(name, fn, grad_inputs, backward, T):
    """measure(), with an out-of-memory or other failure turned into a cell text."""
    try:
        return measure(fn, grad_inputs, backward, T)
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    except Exception as e:  # noqa: BLE001 - one failing cell must not end the run
        print(f"[{name}, T={T}, {'fwd+bwd' if backward else 'fwd'}] failed:", file=sys.stderr)
        traceback.print_exc()
        return f"error ({type(e).__name__})"
    finally:
        _free()


# ----------------------------------------------------------------------------------------------- implementations
DENSE_BACKENDS = ("flash", "cudnn", "auto")  # the efficient backend has no enable_gqa


def _dense_fn(q, k, v, backend: str = "flash"):
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}.get(backend)

    def dense():
        with sdpa_kernel([chosen]) if chosen is not None else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return dense


def _fla():
    """fla-core's ``parallel_nsa`` and version, or (None, why) when it cannot be imported."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Flash Attention is not installed": only its window branch needs it
            import fla
            from fla.ops.nsa import parallel_nsa
    except Exception as e:  # noqa: BLE001 -- not installed, or broken against this torch / triton: say which
        return None, f"not importable ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    return parallel_nsa, getattr(fla, "__version__", "?")


def _fla_fn(parallel_nsa, q, k, v, gates, cfg):
    # fla's layout is [B, T, H, D]; gates [B, T, HQ]. Same values as ours, made contiguous once, outside the timing.
    qf, kf, vf = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    g_cmp, g_slc = (gates.detach()[..., i].transpose(1, 2).contiguous().requires_grad_() for i in (0, 1))
    assert cfg.block_size == cfg.block_stride == cfg.selection_block_size, "fla pools and selects in one block size"

    def fla_nsa():
        return parallel_nsa(qf, kf, vf, g_cmp=g_cmp, g_slc=g_slc, g_swa=None, block_indices=None,
                            block_counts=cfg.top_n, block_size=cfg.selection_block_size, window_size=0,
                            scale=q.shape[-1] ** -0.5)
    return fla_nsa, [qf, kf, vf, g_cmp, g_slc]


def floor_window(cfg: NSAConfig, T: int, device) -> int:
    """Keys W of a causal sliding window whose score count over T queries, Σ_p min(p+1, W), equals NSA's."""
    vm = torch.ones(1, T, dtype=torch.bool, device=device)
    s = attention_budget(vm, T, cfg.block_size, cfg.block_stride, cfg.selection_block_size, cfg.top_n,
                         cfg.window_size)["nsa_scores"]
    s = min(s, T * (T + 1) / 2)
    return max(1, round(((2 * T + 1) - math.sqrt((2 * T + 1) ** 2 - 8 * s)) / 2))


_FLEX = None
_FLOOR_W = None  # the window, a CUDA scalar read by the mask, so one dynamic-shape compile serves every length


def _window_mask(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < _FLOOR_W)


def _floor_fn(q, k, v, W: int):
    global _FLEX, _FLOOR_W
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if _FLEX is None:
        import torch._dynamo.config as dcfg
        for name in ("recompile_limit", "cache_size_limit"):  # compiles per head count, no-grad / grad
            if hasattr(dcfg, name):
                setattr(dcfg, name, max(getattr(dcfg, name), 64))
        _FLEX = torch.compile(flex_attention, dynamic=True)
        _FLOOR_W = torch.zeros((), dtype=torch.int32, device=q.device)
    T, bs = q.shape[2], 128
    nb = -(-T // bs)
    i = torch.arange(nb, device=q.device)[:, None]
    j = torch.arange(nb, device=q.device)[None, :]
    some = (j <= i) & (bs * (i - j) - (bs - 1) < W)  # some (query, key) pair of the tile has 0 ≤ q−k < W
    full = (j < i) & (bs * (i - j) + (bs - 1) < W)  # every pair has
    partial = some & ~full

    def blocks(m):
        return (m.sum(-1).to(torch.int32)[None, None].contiguous(),
                torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None].contiguous())

    mask = BlockMask.from_kv_blocks(*blocks(partial), *blocks(full), BLOCK_SIZE=bs, mask_mod=_window_mask,
                                    seq_lengths=(T, T))

    _FLOOR_W.fill_(W)  # the floor of one (shape, length) is measured before the next is built

    def floor():
        return _FLEX(q, k, v, block_mask=mask, enable_gqa=True)
    return floor


# ----------------------------------------------------------------------------------------------- the table
COLUMNS = ["shape", "tokens",
           "dense fwd ms", "NSA fwd ms", "fwd speed-up vs dense", "fla fwd ms", "fwd speed-up vs fla", "floor fwd ms",
           "dense fwd+bwd ms", "NSA fwd+bwd ms", "fwd+bwd speed-up vs dense", "fla fwd+bwd ms",
           "fwd+bwd speed-up vs fla", "floor fwd+bwd ms",
           "dense peak MiB fwd / fwd+bwd", "NSA peak MiB fwd / fwd+bwd", "fla peak MiB fwd / fwd+bwd"]
HEADER = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def _ms(c):
    return f"{c[0]:.2f}" if isinstance(c, tuple) else c


def _ratio(other, ours):
    if isinstance(other, tuple) and isinstance(ours, tuple):
        return f"{other[0] / ours[0]:.2f}×"
    return "—"


def _peak(fwd, bwd):
    return " / ".join(f"{c[1]:.0f}" if isinstance(c, tuple) else c for c in (fwd, bwd))


def _measure_length(shape: str, cfg: NSAConfig, T: int, floor: bool, parallel_nsa, dense_backend: str) -> dict:
    """{(implementation, backward): (ms, peak MiB) or a text} for one shape and length."""
    s = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(h):
        return torch.randn(1, h, T, s["D"], device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    q, k, v = randn(s["Hq"]), randn(s["Hkv"]), randn(s["Hkv"])
    gates = torch.rand(1, s["Hq"], T, 3, device="cuda", dtype=torch.bfloat16, generator=g)
    if not s["window_gate"]:
        gates[..., 2] = 0.0
    gates.requires_grad_()
    vm = torch.ones(1, T, dtype=torch.bool, device="cuda")

    def nsa():
        return nsa_attention(q, k, v, gates, vm, cfg)

    impls = [("dense", lambda: (_dense_fn(q, k, v, dense_backend), [q, k, v])),
             ("nsa", lambda: (nsa, [q, k, v, gates]))]
    if s["fla"] and parallel_nsa is not None:
        impls.append(("fla", lambda: _fla_fn(parallel_nsa, q, k, v, gates, cfg)))
    if floor:
        impls.append(("floor", lambda: (_floor_fn(q, k, v, floor_window(cfg, T, q.device)), [q, k, v])))
    res = {}
    for name, make in impls:
        t0 = time.perf_counter()
        try:
            fn, inputs = make()
        except torch.cuda.OutOfMemoryError:
            res[name, False] = res[name, True] = "OOM"
            continue
        except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
            print(f"[{name}, T={T}] set-up failed:", file=sys.stderr)
            traceback.print_exc()
            res[name, False] = res[name, True] = f"error ({type(e).__name__})"
            continue
        for backward in (False, True):
            res[name, backward] = _cell(name, fn, inputs, backward, T)
        del fn, inputs
        _free()
        print(f"  [{shape} T={T} {name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)
    return res


def run(tokens: list[int], shape: str, floor: bool, fla_api, dense_backend: str = "flash") -> list[str]:
    """Measure one shape at every length; returns (and prints) the table rows."""
    s = SHAPES[shape]
    cfg = s["config"]()
    parallel_nsa = fla_api[0]
    if not s["fla"]:
        fla_cell = "—"
    elif parallel_nsa is None:
        fla_cell = FLA_MISSING
    else:
        fla_cell = None
    rows = []
    for T in tokens:
        res = _measure_length(shape, cfg, T, floor, parallel_nsa, dense_backend)
        _free()
        for b in (False, True):
            if fla_cell is not None:
                res["fla", b] = fla_cell
            if not floor:
                res["floor", b] = "—"
        cells = [shape, str(T)]
        for b in (False, True):
            cells += [_ms(res["dense", b]), _ms(res["nsa", b]), _ratio(res["dense", b], res["nsa", b]),
                      _ms(res["fla", b]), _ratio(res["fla", b], res["nsa", b]), _ms(res["floor", b])]
        cells += [_peak(res["dense", False], res["dense", True]), _peak(res["nsa", False], res["nsa", True]),
                  _peak(res["fla", False], res["fla", True]) if fla_cell is None else fla_cell]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS)
    ap.add_argument("--shape", nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    ap.add_argument("--no-floor", action="store_true", help="skip the flex_attention sliding-window floor")
    ap.add_argument("--dense-backend", default="flash", choices=DENSE_BACKENDS,
                    help="SDPA backend of the dense baseline (default flash; auto: PyTorch's own choice)")
    ap.add_argument("--out", help="append the table to this markdown file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 2
    import triton

    fla_api = _fla()
    fla_version = fla_api[1]
    t0 = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"fla-core {fla_version}, dense SDPA backend {args.dense_backend}", flush=True)
    for shape in args.shape:
        cfg = SHAPES[shape]["config"]()
        print(f"shape {shape}: {SHAPES[shape]['Hq']} query heads / {SHAPES[shape]['Hkv']} KV heads, "
              f"head dim {SHAPES[shape]['D']}, {_describe(cfg)}", flush=True)
    print(HEADER, flush=True)
    rows = []
    for shape in args.shape:
        rows += run(args.tokens, shape, not args.no_floor, fla_api, args.dense_backend)
    wall = time.perf_counter() - t0
    print(f"({wall:.0f} s)", flush=True)
    if args.out:
        cmd = "python benchmarks/attention.py" + ("" if not (argv or sys.argv[1:]) else
                                                  " " + shlex.join(argv if argv is not None else sys.argv[1:]))
        configs = "; ".join(f"{sh}: {SHAPES[sh]['Hq']}/{SHAPES[sh]['Hkv']} heads, D {SHAPES[sh]['D']}, "
                            f"{_describe(SHAPES[sh]['config']())}" for sh in args.shape)
        with open(args.out, "a") as f:
            f.write(f"\n### {datetime.date.today()} — {torch.cuda.get_device_name()}, torch {torch.__version__}, "
                    f"triton {triton.__version__}, fla-core {fla_version}\n\n`{cmd}` ({wall:.0f} s)\n\n"
                    f"Configurations: {configs}. Dense: SDPA, {args.dense_backend} backend. Times: median ms of "
                    f"`triton.testing.do_bench`; speed-ups: the other's time / NSA's; peaks: MiB allocated above "
                    f"the inputs, fwd / fwd+bwd; floor: flex_attention over a causal window of NSA's mean key "
                    f"count (see the script's docstring).\n\n{HEADER}\n"
                    + "\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
