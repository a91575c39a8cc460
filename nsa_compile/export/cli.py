"""``nsa-compile export``: the language model of a Qwen2.5-VL (default: the built-in tiny one) with NSA attention as an
ONNX file or a TensorRT engine. Wired into ``nsa_compile.cli`` through `add_export_command` / `run_export`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings

import torch

from .limits import MAX_OPSET, MIN_OPSET, MODES

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt")


def add_export_command(subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    from ..config import PRESETS
    from .tensorrt import ROUTES
    p = subparsers.add_parser(
        "export", help="export the language model with NSA attention to ONNX or a TensorRT engine",
        description="Export the language model (+ LM head) of a Qwen2.5-VL with its attention rewritten into NSA. "
                    "The vision encoder stays in PyTorch: the file takes inputs_embeds [batch, sequence, hidden], "
                    "position_ids [3, batch, sequence] (M-RoPE) and nsa_video_mask [batch, sequence] and returns "
                    "logits. Batch and sequence are dynamic.")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (default) or tensorrt (serialized engine)")
    p.add_argument("--mode", choices=MODES, default="decomposed",
                   help="ONNX form of the NSA op: decomposed (standard operators; onnxruntime, TensorRT's ONNX "
                        "parser) or plugin (one nsa_compile::nsa_attention node per layer)")
    p.add_argument("--route", choices=ROUTES, default="auto",
                   help="TensorRT only: plugin (torch-tensorrt + our plugin), onnx (decomposed ONNX through "
                        "TensorRT's parser) or auto")
    p.add_argument("--out", required=True, metavar="PATH", help="file to write (.onnx or .engine)")
    p.add_argument("--model", metavar="DIR", help="local Hugging Face Qwen2.5-VL checkpoint folder (default: the tiny "
                   "random-weight Qwen2.5-VL); only its safetensors weights are read")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let --model run Python code shipped in its folder (auto_map); off by default")
    p.add_argument("--preset", default="videonsa", help=f"NSA preset, one of {sorted(PRESETS)} (default videonsa)")
    p.add_argument("--top-n", type=int, help="override the preset's top_n")
    p.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset, {MIN_OPSET}–{MAX_OPSET} "
                   f"(default {MIN_OPSET})")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the built-in tiny model (default 4; "
                   "ignored with --model)")
    p.add_argument("--frames", type=int, default=4, help="frames of the synthetic example video (default 4)")
    p.add_argument("--verify", action="store_true", help="decomposed ONNX: run the file in onnxruntime at the "
                   "example length and a shorter one and report the max relative error against PyTorch")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


class _BadInput(Exception):
    pass


def _example(args):
    """(language model for export, example inputs, video mask, model description)."""
    from ..models import build_video_inputs, load_pretrained, tiny_qwen2_5_vl
    from .capture import LanguageModelForExport, language_model_inputs
    if args.frames < 1:
        raise _BadInput(f"--frames must be positive, got {args.frames}")
    if args.model:
        model, proc = load_pretrained(args.model, dtype=torch.float32, device="cpu",
                                      trust_remote_code=getattr(args, "trust_remote_code", False))
        name = args.model
    else:
        if args.layers < 1:
            raise _BadInput(f"--layers must be positive, got {args.layers}")
        model, proc = tiny_qwen2_5_vl(num_layers=args.layers)
        name = "tiny-qwen2.5-vl (random weights)"
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (args.frames, 112, 168, 3), generator=g, dtype=torch.uint8)
    inputs = build_video_inputs(proc, video, "Describe this video.")
    (embeds, position_ids), mask = language_model_inputs(model, inputs)
    return LanguageModelForExport(model), (embeds, position_ids), mask, name


def _verify(result, example, mask) -> dict:
    """Max relative error of onnxruntime vs PyTorch at the example length and at a shorter one."""
    import onnxruntime as ort
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    embeds, position_ids = example
    T = embeds.shape[1]
    errors = {}
    for t in sorted({T, max(1, (3 * T) // 4)}):
        inputs = (embeds[:, :t].contiguous(), position_ids[:, :, :t].contiguous(), mask[:, :t].contiguous())
        ref = result.run_torch(*inputs)
        out = session.run(None, dict(zip(result.input_names, (x.numpy() for x in inputs))))[0]
        errors[t] = float((torch.from_numpy(out) - ref).norm() / ref.norm())
    return errors


def run_export(args) -> int:
    """Run ``nsa-compile export`` from parsed arguments; returns 0 (written) or 2 (bad input, one-line error)."""
    from ..config import NSAConfig, NSAConfigError
    from ..kernels import NSAInputError
    from ..models import ModelLoadError
    from .capture import ExportError
    from .onnx_export import to_onnx
    from .tensorrt import to_tensorrt
    try:
        overrides = {"top_n": args.top_n} if args.top_n is not None else {}
        config = NSAConfig.preset(args.preset, **overrides)
        if args.format == "onnx" and args.mode == "plugin" and args.verify:
            raise _BadInput("--verify runs the decomposed file in onnxruntime; a plugin file needs our plugin")
        if args.format == "tensorrt" and args.mode != "decomposed":
            raise _BadInput("--mode applies to --format onnx; for TensorRT choose --route plugin|onnx")
        if args.format == "tensorrt":
            from .tensorrt import choose_route, installed
            choose_route(args.route, installed())  # fail before loading the model
        t0 = time.perf_counter()
        lm, example, mask, name = _example(args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if args.format == "onnx":
                result = to_onnx(lm, example, args.out, args.mode, config=config, video_mask=mask, opset=args.opset)
            else:
                result = to_tensorrt(lm, example, args.out, config=config, video_mask=mask, route=args.route)
        res = {"format": args.format, "path": result.path, "model": name, "preset": config.name,
               "top_n": config.top_n, "inputs": result.input_names, "sequence_length": int(example[0].shape[1]),
               "video_tokens": int(mask.sum()), "seconds": round(time.perf_counter() - t0, 2),
               "rewritten": result.captured.report.rewritten_modules}
        if args.format == "onnx":
            res.update(mode=args.mode, opset=args.opset, outputs=result.output_names,
                       dynamic_axes={k: {str(d): a for d, a in v.items()} for k, v in result.dynamic_axes.items()})
            if args.verify:
                res["max_rel_error"] = _verify(result, example, mask)
        else:
            res.update(route=result.route, reason=result.reason)
    except (_BadInput, ExportError, NSAConfigError, NSAInputError, ModelLoadError, FileNotFoundError, OSError) as e:
        print(f"nsa-compile: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
    else:
        print(f"wrote {res['path']} ({args.format}"
              + (f", {args.mode}, opset {args.opset}" if args.format == "onnx" else f", route {res['route']}")
              + f") from {name}: {len(res['rewritten'])} attention layers rewritten into NSA "
              f"(preset {res['preset']}, top_n {res['top_n']}); inputs {', '.join(res['inputs'])}; "
              f"{res['seconds']:.1f} s")
        if "max_rel_error" in res:
            print("onnxruntime vs PyTorch, max relative error by sequence length: "
                  + ", ".join(f"{t}: {e:.2e}" for t, e in res["max_rel_error"].items()))
        if args.format == "tensorrt":
            print(f"route: {res['reason']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m nsa_compile.export.cli export ...``) until the main CLI wires the command."""
    parser = argparse.ArgumentParser(prog="nsa-compile")
    add_export_command(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch._logging.set_logs(dynamo=logging.ERROR)
    return run_export(args)


if __name__ == "__main__":
    sys.exit(main())
