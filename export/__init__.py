"""Deployment kit for exported esmpp models: a Triton model repository generator and an onnxruntime server
example. Imports only onnx, onnxruntime, numpy and PIL — a server does not need torch or esmpp."""
