"""Writing quantized models in formats other runtimes load."""

from bitsmith.export.onnx import export_onnx

__all__ = ["export_onnx"]
