"""Deployment: ONNX export, weight encodings, int8, shrinking dead channels, validation, predict."""
