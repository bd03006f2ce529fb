"""dsrpipe: train compact CNNs directly with Dynamic Sparse Reparameterization, ship sparse ONNX."""

__version__ = "0.1.0"
