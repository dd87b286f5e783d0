"""Features: pretrained CNN encoders, ONNX export/runtime, and the on-disk feature cache."""
