"""The sources: models (archs, checkpoints, user factories), BatchNorm folded, the FP32 ONNX exported."""
