"""Precision: FP16 and INT8 (Q/DQ) ONNX from the FP32 ONNX, the sensitivity ranking, ONNX Runtime's graph fixes."""
