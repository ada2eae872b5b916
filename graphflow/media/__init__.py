"""Media and models: opening and decoding video (PyAV, NVDEC), model files (registry, inspection, quantization)
and the backends that run them (ONNX Runtime, torch, TensorRT)."""
