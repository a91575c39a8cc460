"""`to_onnx`: a model with NSA attention as an ONNX file, built with ``torch.onnx.export(..., dynamo=True)`` and the
onnxscript translations of the NSA op in `onnx_ops`."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import NSAConfig
from ..report import CompileReport
from .capture import Captured, ExportError, capture, write_atomically
from .limits import MAX_OPSET, MIN_OPSET, MODES
from .onnx_ops import translate_decomposed, translate_plugin


@dataclass
class OnnxExport:
    """What `to_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file; mode, opset: as asked; input_names / output_names: the file's graph inputs and
        outputs (``nsa_video_mask`` bool [batch, sequence] is an input when the model does not find its video
        tokens itself); dynamic_axes: per input, ``{dim: axis name}``; report: the NSA compile report of the
        rewrite; captured: the traced module (call ``captured.module(*inputs)`` for the PyTorch result the file
        reproduces).
    """

    path: str
    mode: str
    opset: int
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    report: CompileReport
    config: NSAConfig
    captured: Captured = field(repr=False)

    def run_torch(self, *inputs):
        """The PyTorch result (the rewritten model) on ``inputs`` ordered as `input_names`."""
        with torch.no_grad():
            return self.captured.module(*inputs)


def _check_opset(opset) -> int:
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"ONNX opset {opset!r} is not supported: the NSA translations need opset {MIN_OPSET}–"
                          f"{MAX_OPSET} (torch.onnx's dynamo exporter starts at 18); pass opset={MIN_OPSET}")
    return opset


def _check_mode(mode) -> str:
    if mode not in MODES:
        raise ExportError(f"unknown ONNX export mode {mode!r}: use 'decomposed' (standard ONNX operators, runs in "
                          "onnxruntime and TensorRT's ONNX parser) or 'plugin' (one custom node per NSA op)")
    return mode


def export_captured(cap: Captured, path: str | os.PathLike, mode: str = "decomposed", opset: int = MIN_OPSET,
                    check: bool = True) -> None:
    """``torch.onnx.export`` of a `capture` result with the NSA translation of ``mode``; writes ``path`` (and
    ``path.data`` for external weights) under a temporary name, checks it with ``onnx.checker`` when ``check``, and
    renames it into place only then (a failed export or check leaves a previous file whole)."""
    translation = translate_decomposed if mode == "decomposed" else translate_plugin
    module = cap.module
    modes = {m: m.training for m in module.modules()}  # the user's model is a submodule: restore its mode after
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            program = torch.onnx.export(
                module, cap.args, dynamo=True, input_names=cap.input_names, output_names=cap.output_names,
                dynamic_shapes=(cap.dynamic_shapes,) if any(cap.dynamic_shapes) else None,
                opset_version=opset, custom_translation_table={torch.ops.nsa_compile.nsa_attention.default:
                                                               translation},
                optimize=False,  # keeps every weight under its state-dict name (the optimizer renames folded ones)
                verbose=False)
    except Exception as e:  # noqa: BLE001 - torch.onnx wraps the real cause
        raise ExportError(f"torch.onnx.export failed: {_first_line(e)}") from e
    finally:
        for m, training in modes.items():
            m.training = training

    def write(tmp: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            program.save(tmp)
        if check:
            import onnx
            onnx.checker.check_model(tmp, full_check=True)

    write_atomically(path, write)


def _first_line(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def to_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, mode: str = "decomposed", *,
            config: NSAConfig | None = None, video_mask: torch.Tensor | None = None, opset: int = MIN_OPSET,
            dynamic: bool = True, dynamic_axes: dict[str, dict[int, str]] | None = None,
            check: bool = True) -> OnnxExport:
    """Export ``model`` with its attention rewritten into NSA as an ONNX file.

    Args:
        model: the module to export: e.g. ``LanguageModelForExport(qwen)`` (language model + LM head; the vision
            encoder stays in PyTorch) or a single attention layer. Its attention is rewritten as by
            ``nsa_compile.compile`` (gates attached if absent, reused if present: trained gates are exported).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        path: the ``.onnx`` file to write (weights inside; external data beside it above 2 GB).
        mode: ``"decomposed"`` (standard ONNX operators only: onnxruntime on any device, TensorRT's ONNX parser
            without plugins) or ``"plugin"`` (one ``nsa_compile::nsa_attention`` node per NSA op, attributes carry
            the config and ``plugin_namespace``; needs our plugin in the runtime).
        config: `NSAConfig` (default: the ``videonsa`` preset).
        video_mask: bool [batch, sequence] of the example tokens, needed when the model does not show the compiler
            its video tokens (called with ``inputs_embeds``); the file then takes input ``nsa_video_mask``.
        opset: ONNX opset, 18 to 23. dynamic: batch and sequence axes dynamic (default) or fixed shapes.
        dynamic_axes: ``{input name: {dim: axis name}}``; default: the model's ``dynamic_axes`` attribute, else
            dims 0/1 (``batch``/``sequence``) of every tensor input of rank ≥ 2.
        check: run ``onnx.checker`` with full shape inference on the file.
    Raises:
        ExportError: unknown mode, unsupported opset, a model that could not be rewritten (no NSA site), an axis
            that cannot be dynamic, a graph break, or a failure inside ``torch.onnx.export``.
    """
    mode = _check_mode(mode)
    opset = _check_opset(opset)
    cap = capture(model, example_inputs, config, video_mask=video_mask, dynamic_axes=dynamic_axes, dynamic=dynamic)
    export_captured(cap, path, mode, opset, check)
    axes = {n: d for n, d in zip(cap.input_names, cap.dynamic_shapes) if d}
    return OnnxExport(os.fspath(path), mode, opset, cap.input_names, cap.output_names, axes, cap.report, cap.config,
                      cap)
