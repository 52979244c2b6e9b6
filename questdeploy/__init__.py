"""questdeploy: QuEST low-bit quantization of diffusion UNets, exported to deployable ONNX Q/DQ and TensorRT."""

__version__ = "0.1.0"
