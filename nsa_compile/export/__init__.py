"""Export of models with NSA attention: ONNX (`to_onnx`, modes ``decomposed`` and ``plugin``) and TensorRT
(`to_tensorrt`). See ``docs/export.md``.

    from nsa_compile.export import LanguageModelForExport, language_model_inputs, to_onnx
    lm = LanguageModelForExport(qwen)                              # language model + LM head
    (embeds, position_ids), video_mask = language_model_inputs(qwen, processor_inputs)   # vision stays in PyTorch
    to_onnx(lm, (embeds, position_ids), "lm.onnx", config=cfg, video_mask=video_mask)

The ``nsa-compile export`` command is `add_export_command` / `run_export`. onnx / onnxscript are imported only when
an ONNX function is used (they are the ``export`` extra), torch-tensorrt / TensorRT only when an engine is built.
"""

from .capture import ExportError, LanguageModelForExport, capture, language_model_inputs
from .cli import add_export_command, run_export
from .limits import MAX_OPSET, MIN_OPSET, MODES
from .tensorrt import PAIRINGS, TensorRTExport, choose_route, pairing_table, to_tensorrt

_LAZY = {"to_onnx": "onnx_export", "OnnxExport": "onnx_export"}

__all__ = ["ExportError", "LanguageModelForExport", "MAX_OPSET", "MIN_OPSET", "MODES", "OnnxExport", "PAIRINGS",
           "TensorRTExport", "add_export_command", "capture", "choose_route", "language_model_inputs",
           "pairing_table", "run_export", "to_onnx", "to_tensorrt"]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
