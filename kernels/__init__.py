"""Fused Triton kernels for adapters (installed as ``fxadapt.kernels``)."""
