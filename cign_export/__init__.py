"""Export of trained CIGN task models to ONNX and TensorRT engines with their manifest (``cign-export``)."""
