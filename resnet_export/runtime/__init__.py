"""What runs an artifact: PyTorch, ONNX Runtime, OpenVINO; batches; the CUDA device and the runners on it."""
