"""Light constants of the export package (importable without onnx / onnxscript)."""

#: ONNX export modes of the NSA op.
MODES = ("decomposed", "plugin")
#: ONNX opsets the translations are written for (standard domain); torch.onnx's dynamo exporter starts at 18.
MIN_OPSET = 18
MAX_OPSET = 23
