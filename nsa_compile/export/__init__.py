"""Export of graphs that hold the NSA op (ONNX, TensorRT): see issue 5; nothing here yet."""
