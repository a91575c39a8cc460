"""End-to-end long-video benchmark: the language model of Qwen2.5-VL-7B, dense SDPA vs ``backend="nsa"``.

    nsa-compile bench --e2e [--tokens 16384 32768 65536 131072] [--decode-steps 8] [--out BENCHMARKS.md]
    nsa-compile bench --e2e --probe-only --modes dense # longest length that fits, per mode
    python benchmarks/e2e.py ...                        # the same

The model is transformers' ``Qwen2_5_VLTextModel`` with the real 7B text configuration (28 layers, hidden 3584,
MLP 18944, 28 query heads over 4 KV heads, head dim 128, vocab 152064, mrope sections [16, 24, 24]) built with
random bf16 weights directly on the GPU (timings do not depend on weight values). Its input is ``inputs_embeds``:
16 text tokens, then video tokens, then a 48-token text prompt, T tokens in all; the backend learns which tokens are
video from ``nsa_compile.video_mask`` (the text model never sees ``input_ids`` of a video).

For each length and mode (``dense``: the model as it is, SDPA; ``nsa``: ``nsa_compile.compile`` with the
``videonsa`` preset and ``decode="sparse"`` unless told otherwise) it measures, in one process:

* **prefill**: wall time of one forward over T tokens filling a ``DynamicCache`` (the last of ``--repeat`` runs;
  the first absorbs compilation and kernel JIT), and the peak GPU memory allocated during it (weights included);
* **decode**: median wall time per token of ``--decode-steps`` one-token forwards on that cache (whole model, eager
  HF code around the attention; the first step is not counted);
* **attention at decode** (nsa run): GPU time of one layer's attention for one new token over the T-token cache,
  dense SDPA (``enable_gqa``) vs the sparse-decode kernels on the layer's kept state, both replayed from CUDA
  graphs (``triton.testing.do_bench_cudagraph``); plus the wall time of the whole sparse op per call (fingerprint
  lookup, its host sync, launches) next to SDPA's.

A mode that runs out of memory is reported as ``OOM``. ``--probe`` (after the table) or ``--probe-only`` finds, per
mode, the longest T (multiple of ``--probe-step``) whose prefill + one decode step fit: doubling from the longest
length that fitted (or ``--probe-start``), then bisection, within ``--probe-budget-s`` per mode; ``--probe-fits``
and ``--probe-oom`` pass bounds found earlier (a probe cut by its budget resumes from them).
``--tiny`` runs the same code on a 2-layer toy configuration (the CPU smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import statistics
import sys
import time

import torch

# The language model of Qwen2.5-VL-7B-Instruct (its config.json, text part).
QWEN2_5_VL_7B_TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    use_sliding_window=False, sliding_window=32768, max_window_layers=28, bos_token_id=151643,
    eos_token_id=151645)
TINY_TEXT = dict(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]})
TEXT_BEFORE, TEXT_AFTER = 16, 48  # text tokens around the video (system turn / prompt)
MODES = ("dense", "nsa")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_text_model(spec: dict, device: str, dtype: torch.dtype):
    """``Qwen2_5_VLTextModel`` of ``spec`` with random weights, created directly on ``device`` in ``dtype``
    (transformers' own normal init runs there; no CPU copy, no fp32 copy). SDPA attention, eval mode."""
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel
    cfg = Qwen2_5_VLTextConfig(**spec)
    cfg._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLTextModel(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval().requires_grad_(False)


def make_inputs(T: int, hidden: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Embeddings [1, T, hidden] (std 0.02, like the embedding table) and the video mask [1, T]: text, video, text.

    Raises:
        ValueError: T too short for the text around the video.
    """
    if T <= TEXT_BEFORE + TEXT_AFTER:
        raise ValueError(f"--tokens must exceed {TEXT_BEFORE + TEXT_AFTER} (the text around the video), got {T}")
    g = torch.Generator(device=device).manual_seed(seed)
    emb = torch.randn(1, T, hidden, device=device, dtype=dtype, generator=g).mul_(0.02)
    mask = torch.zeros(1, T, dtype=torch.bool, device=device)
    mask[0, TEXT_BEFORE:T - TEXT_AFTER] = True
    return emb, mask


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _is_oom(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


class Mode:
    """One way of running the model: ``dense`` (the model itself) or ``nsa`` (``nsa_compile.compile``)."""

    def __init__(self, name: str, model, device: str, nsa_config=None):
        import nsa_compile
        self.name, self.model, self.device, self.config = name, model, device, nsa_config
        self.fn = nsa_compile.compile(model, nsa_config) if name == "nsa" else model

    def compiled_graphs(self) -> int:
        """Graphs the nsa backend has compiled so far (0 for dense)."""
        report = getattr(self.fn, "nsa_report", None)
        return len(report.graphs) if report is not None else 0

    def _call(self, emb, mask, cache):
        import nsa_compile
        ctx = nsa_compile.video_mask(mask) if self.name == "nsa" else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            return self.fn(inputs_embeds=emb, past_key_values=cache, use_cache=True)

    def prefill(self, emb, mask):
        """(cache, seconds, peak bytes or None) of one forward over ``emb``."""
        from transformers import DynamicCache
        from .kernels.decode import clear_decode_states
        clear_decode_states()
        cache = DynamicCache(config=self.model.config)
        _free(self.device)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(self.device)
        t = time.perf_counter()
        self._call(emb, mask, cache)
        _sync(self.device)
        dt = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else None
        return cache, dt, peak

    def decode(self, cache, steps: int, seed: int = 1) -> list[float]:
        """Seconds of each of ``steps`` one-token forwards (random text embeddings) appended to ``cache``."""
        hidden = self.model.config.hidden_size
        dtype = next(self.model.parameters()).dtype
        g = torch.Generator(device=self.device).manual_seed(seed)
        no_video = torch.zeros(1, 1, dtype=torch.bool, device=self.device)
        times = []
        for _ in range(steps):
            e = torch.randn(1, 1, hidden, device=self.device, dtype=dtype, generator=g).mul_(0.02)
            _sync(self.device)
            t = time.perf_counter()
            self._call(e, no_video, cache)
            _sync(self.device)
            times.append(time.perf_counter() - t)
        return times


def attention_at_decode(cache, model_config, nsa_config, device: str, seed: int = 2) -> dict:
    """One layer, one new text token over the cache of layer 0: dense SDPA vs the sparse-decode kernels over the
    layer's kept state (GPU time from CUDA-graph replays), and both ops' wall time per call."""
    import torch.nn.functional as F
    from .kernels import decode as dec
    k, v = cache.layers[0].keys, cache.layers[0].values
    Hq, D = model_config.num_attention_heads, k.shape[-1]
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, Hq, 1, D, device=device, dtype=k.dtype, generator=g)
    gates = torch.rand(1, Hq, 1, 3, device=device, dtype=k.dtype, generator=g)
    no_video = torch.zeros(1, 1, dtype=torch.bool, device=device)
    c = nsa_config
    scale = 1.0 / math.sqrt(D)
    key = dec.state_key(k, v, c.block_size, c.block_stride, c.selection_block_size)
    hits, _, _ = dec.STATES.lookup(k, v, key)
    out = torch.empty_like(q)

    def dense():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def sparse():
        return dec.sparse_decode_triton(q, k, v, gates, hits[0], scale, c.top_n, c.window_size, out=out)

    def sparse_op():
        return torch.ops.nsa_compile.nsa_attention_sparse_decode(q, k, v, gates, no_video, None, scale, c.block_size,
                                                                 c.block_stride, c.selection_block_size, c.top_n,
                                                                 c.window_size)

    def wall(fn, n=30):
        fn()
        _sync(device)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(device)
        return (time.perf_counter() - t) / n * 1e6

    res = {"cache_tokens": int(k.shape[2]), "state_found": len(hits) == 1}
    with torch.inference_mode():
        if device == "cuda":
            import triton
            res["dense_attn_us"] = triton.testing.do_bench_cudagraph(dense) * 1e3
            if len(hits) == 1 and dec.use_decode_triton(q, k, v, None):
                res["sparse_attn_us"] = triton.testing.do_bench_cudagraph(sparse) * 1e3
        res["dense_op_wall_us"] = wall(dense)
        if c.decode == "sparse":
            res["sparse_op_wall_us"] = wall(sparse_op)
    return res


def _attempt(fn):
    """``(fn(), None)``, or ``(None, "OOM")`` when it ran out of memory (other errors propagate)."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - only memory errors are caught, the rest re-raised
        if not _is_oom(e):
            raise
    return None, "OOM"


def run_length(mode: Mode, T: int, hidden: int, dtype, steps: int, repeat: int, attn: bool,
               profile: bool = False) -> dict:
    """Prefill (``repeat`` times, the last timed) + decode steps (+ attention at decode) at T tokens; with
    ``profile``, one more prefill under torch.profiler, whose busiest GPU kernels and CPU ops are logged."""
    from .kernels.decode import STATES
    emb, mask = make_inputs(T, hidden, mode.device, dtype)
    row: dict = {"mode": mode.name, "tokens": T, "video_tokens": int(mask.sum())}
    for i in range(repeat):
        graphs = mode.compiled_graphs()
        res, err = _attempt(lambda: mode.prefill(emb, mask))
        if err:
            row["error"] = err
            log(f"{mode.name} T={T}: prefill {err}")
            _free(mode.device)
            return row
        cache, row["prefill_s"], row["peak_bytes"] = res
        row["prefill_compiled_graphs"] = mode.compiled_graphs() - graphs  # > 0: the time includes compilation
        report = getattr(mode.fn, "nsa_report", None)
        if report is not None:  # what each site's attn_mask became (``opaque`` masks are checked at run time)
            row["attn_masks"] = report.to_dict()["attn_masks"]
        if i < repeat - 1:
            del cache, res
        log(f"{mode.name} T={T}: prefill {row['prefill_s']:.3f} s, peak "
            f"{(row['peak_bytes'] or 0) / 2**30:.1f} GiB" + (" (warm-up)" if i < repeat - 1 else "")
            + (f", attn_masks {row['attn_masks']}" if row.get("attn_masks") else ""))
    if steps:
        times, err = _attempt(lambda: mode.decode(cache, steps))
        if err:
            row["decode_error"] = err
        else:
            counted = times[1:] if len(times) > 1 else times
            row["decode_ms"] = statistics.median(counted) * 1e3
            row["decode_step_ms"] = [t * 1e3 for t in times]
            log(f"{mode.name} T={T}: decode {row['decode_ms']:.2f} ms/token "
                f"(steps {[round(t * 1e3, 1) for t in times]})")
        if mode.name == "nsa":  # since the prefill cleared them: builds = layers, hits = layers × steps
            row["decode_states"] = dict(STATES.stats)
            log(f"{mode.name} T={T}: kept decode states {row['decode_states']}")
    if attn and mode.name == "nsa" and "decode_error" not in row:
        res, err = _attempt(lambda: attention_at_decode(cache, mode.model.config, mode.config, mode.device))
        if err:
            row["attn_error"] = err
        else:
            row.update(res)
            log(f"{mode.name} T={T}: attention at decode {res}")
    cache = None  # free the KV cache (not `del`: the lambdas above refer to it)
    _free(mode.device)
    if profile:
        log(f"{mode.name} T={T}: profiled prefill\n{profile_prefill(mode, emb, mask)}")
    return row


def profile_prefill(mode: Mode, emb, mask, rows: int = 25) -> str:
    """Tables of one prefill under torch.profiler: the kernels by GPU time (CUDA only) and the ops by CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    cuda = mode.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        cache, _, _ = mode.prefill(emb, mask)
    del cache
    _free(mode.device)
    table = prof.key_averages()
    out = [table.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)] if cuda else []
    return "\n".join(out + [table.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=70)])


def _fits(row: dict) -> bool:
    return "error" not in row and "decode_error" not in row


def probe(mode: Mode, hidden: int, dtype, start: int, step: int, maximum: int, budget_s: float, lo: int = 0,
          hi: int | None = None) -> dict:
    """Longest T (a multiple of ``step``, ≤ ``maximum``) whose prefill and one decode step fit in memory: doubling
    from ``start`` (or from twice ``lo``, a length known to fit), then bisection against the first length that did
    not fit (``hi`` if known). Stops after ``budget_s`` seconds; ``resolved_to_step`` then says it is a bound."""
    t0 = time.perf_counter()

    def over() -> bool:
        return time.perf_counter() - t0 >= budget_s

    def fits(T: int) -> bool:
        ok = _fits(run_length(mode, T, hidden, dtype, steps=1, repeat=1, attn=False))
        log(f"probe {mode.name}: T={T} {'fits' if ok else 'does not fit'} ({time.perf_counter() - t0:.0f} s)")
        return ok

    T = max(start, 2 * lo)
    while hi is None and not over() and lo < maximum:
        T = min(T, maximum)
        if fits(T):
            lo, T = T, 2 * T
        else:
            hi = T
    while hi is not None and hi - lo > step and not over():
        mid = max(lo + step, (lo + hi) // 2 // step * step)
        if mid >= hi:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    resolved = (hi is not None and hi - lo <= step) or lo >= maximum
    return {"mode": mode.name, "fits_tokens": lo, "fits_video_tokens": max(0, lo - TEXT_BEFORE - TEXT_AFTER),
            "first_oom_tokens": hi, "resolved_to_step": resolved, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ tables
def _f(x, spec) -> str:
    return "—" if x is None else format(x, spec)


TABLE_HEADER = (
    "| tokens (video) | dense prefill s | NSA prefill s | prefill speed-up | dense peak GiB | NSA peak GiB | "
    "dense decode ms/tok | NSA decode ms/tok | dense attn µs/layer | NSA attn µs/layer | attn speed-up | "
    "dense / NSA op wall µs |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_rows(rows: list[dict]) -> list[str]:
    by_t: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_t.setdefault(r["tokens"], {})[r["mode"]] = r
    out = []
    for T in sorted(by_t):
        d, n = by_t[T].get("dense", {}), by_t[T].get("nsa", {})

        def cell(r, key, spec, scale=1.0):
            if not r:
                return "—"
            if key in ("prefill_s", "peak_bytes") and r.get("error"):
                return r["error"]
            if key == "decode_ms" and (r.get("error") or r.get("decode_error")):
                return r.get("error") or r.get("decode_error")
            x = r.get(key)
            star = "*" if key == "prefill_s" and r.get("prefill_compiled_graphs") else ""
            return _f(None if x is None else x * scale, spec) + star

        def ratio(a, b):
            return f"{a / b:.2f}×" if a and b else "—"

        vid = (d or n).get("video_tokens")
        out.append(
            f"| {T} ({vid}) | {cell(d, 'prefill_s', '.2f')} | {cell(n, 'prefill_s', '.2f')} | "
            f"{ratio(d.get('prefill_s'), n.get('prefill_s'))} | {cell(d, 'peak_bytes', '.1f', 2**-30)} | "
            f"{cell(n, 'peak_bytes', '.1f', 2**-30)} | {cell(d, 'decode_ms', '.2f')} | {cell(n, 'decode_ms', '.2f')} | "
            f"{cell(n, 'dense_attn_us', '.1f')} | {cell(n, 'sparse_attn_us', '.1f')} | "
            f"{ratio(n.get('dense_attn_us'), n.get('sparse_attn_us'))} | "
            f"{cell(n, 'dense_op_wall_us', '.0f')} / {cell(n, 'sparse_op_wall_us', '.0f')} |")
    return out


def versions() -> str:
    import transformers
    parts = [f"torch {torch.__version__}"]
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    parts.append(f"transformers {transformers.__version__}")
    return ", ".join(parts)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "CPU"


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nsa-compile bench --e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", help="total tokens per prefill (default 16384 32768 65536 "
                    "131072; --tiny: 192 320)")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--preset", default="videonsa")
    ap.add_argument("--top-n", type=int, help="override the preset's top_n")
    ap.add_argument("--decode", choices=("sparse", "dense"), default="sparse", help="NSAConfig.decode (default sparse)")
    ap.add_argument("--decode-steps", type=int, default=8, help="one-token steps after each prefill (default 8)")
    ap.add_argument("--repeat", type=int, default=2, help="prefills per length, the last timed (default 2)")
    ap.add_argument("--warmup-tokens", type=int, nargs="+", help="lengths compiled before timing (default 2048 "
                    "4096; --tiny: 96 128): two lengths make dynamo compile shape-generic graphs once")
    ap.add_argument("--no-attn", action="store_true", help="skip the attention-at-decode microbenchmark")
    ap.add_argument("--profile-prefill", action="store_true", help="after each length, one more prefill under "
                    "torch.profiler: log its busiest GPU kernels and CPU ops (where NSA's prefill time goes)")
    ap.add_argument("--probe", action="store_true", help="after the table, find the longest length each mode fits "
                    "(prefill + 1 decode step), starting above the longest length of the table that fitted")
    ap.add_argument("--probe-only", action="store_true", help="the probe without the table")
    ap.add_argument("--probe-start", type=int, default=131072)
    ap.add_argument("--probe-step", type=int, default=16384)
    ap.add_argument("--probe-max", type=int, default=1 << 20)
    ap.add_argument("--probe-budget-s", type=float, default=500.0, help="stop probing a mode after this long")
    ap.add_argument("--probe-fits", type=int, default=0, help="a length known to fit (e.g. from an earlier probe "
                    "that ran out of time): the probe starts above it")
    ap.add_argument("--probe-oom", type=int, help="a length known not to fit: the probe bisects below it")
    ap.add_argument("--tiny", action="store_true", help="2-layer toy model (smoke test; CPU works)")
    ap.add_argument("--device", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--out", help="append the table (with date, GPU, versions, command) to this markdown file")
    ap.add_argument("--json", help="write all measurements to this JSON file")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the e2e benchmark (or the fit probe); prints a markdown table; returns an exit status."""
    args = build_parser().parse_args(argv)
    from . import NSAConfig
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("nsa-compile bench: --device cuda but no CUDA device", file=sys.stderr)
        return 2
    if not args.tiny and device != "cuda":
        print("nsa-compile bench --e2e: the 7B model needs a CUDA GPU (use --tiny for the CPU smoke run)",
              file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    spec = TINY_TEXT if args.tiny else QWEN2_5_VL_7B_TEXT
    tokens = args.tokens or ([192, 320] if args.tiny else [16384, 32768, 65536, 131072])
    warm = args.warmup_tokens or ([96, 128] if args.tiny else [2048, 4096])
    overrides = {"decode": args.decode} | ({"top_n": args.top_n} if args.top_n else {})
    nsa_config = NSAConfig.preset(args.preset, **overrides)
    torch._logging.set_logs(dynamo=40)  # graph breaks are expected; keep stderr readable

    log(f"building {'tiny' if args.tiny else 'Qwen2.5-VL-7B'} text model on {device} ({dtype})")
    t = time.perf_counter()
    model = build_text_model(spec, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model ready in {time.perf_counter() - t:.1f} s: {n_params / 1e9:.2f} B parameters")
    hidden = spec["hidden_size"]
    rows: list[dict] = []
    probes: list[dict] = []
    for name in MODES:  # dense first: the NSA compile attaches gate modules to the model
        if name not in args.modes:
            continue
        mode = Mode(name, model, device, nsa_config if name == "nsa" else None)
        t = time.perf_counter()
        for T in warm:
            run_length(mode, T, hidden, dtype, steps=3, repeat=1, attn=False)
        log(f"{name}: warm-up (compile) {time.perf_counter() - t:.1f} s")
        mode_rows = [] if args.probe_only else [
            run_length(mode, T, hidden, dtype, args.decode_steps, args.repeat, not args.no_attn,
                       args.profile_prefill) for T in tokens]
        rows += mode_rows
        if args.probe or args.probe_only:
            fit = max([r["tokens"] for r in mode_rows if _fits(r)] + [args.probe_fits])
            ooms = [r["tokens"] for r in mode_rows if not _fits(r)] + ([args.probe_oom] if args.probe_oom else [])
            oom = min((t for t in ooms if t > fit), default=None)
            probes.append(probe(mode, hidden, dtype, args.probe_start, args.probe_step, args.probe_max,
                                args.probe_budget_s, lo=fit, hi=oom))
            log(f"probe: {probes[-1]}")
        del mode
        _free(device)

    command = "nsa-compile bench --e2e " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"{'tiny' if args.tiny else 'Qwen2.5-VL-7B'} language model ({n_params / 1e9:.2f} B params, "
              f"{spec['num_hidden_layers']} layers, {dtype}), {device_name(device)}, {versions()}; NSA: preset "
              f"{args.preset}, top_n {nsa_config.top_n}, decode={nsa_config.decode}, gates {nsa_config.gate}")
    lines = []
    if rows:
        lines += [TABLE_HEADER] + table_rows(rows)
        if any(r.get("prefill_compiled_graphs") for r in rows):
            lines.append("\n\\* this prefill compiled graphs while timed (raise --repeat)")
    if probes:
        lines += ([""] if lines else []) + [
            "| mode | longest tokens that fit (video tokens), prefill + 1 decode step | first length that did not | "
            "resolved to --probe-step |", "|---|---|---|---|"]
        lines += [f"| {p['mode']} | {p['fits_tokens']} ({p['fits_video_tokens']}) | {p['first_oom_tokens']} | "
                  f"{'yes' if p['resolved_to_step'] else 'no (time budget)'} |" for p in probes]
    text = "\n".join(lines)
    print(header)
    print(text, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "command": command, "rows": rows, "probes": probes}, f, indent=1)
    if args.out:
        title = "fit probe" if not rows else ("prefill / decode" + (" + fit probe" if probes else ""))
        with open(args.out, "a") as f:
            f.write(f"\n### {datetime.date.today()} — end to end, long video, {title}: {device_name(device)}\n\n"
                    f"`{command}`\n\n{header}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
