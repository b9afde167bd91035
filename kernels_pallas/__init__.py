"""Pallas kernels for Baichuan (GPU via Triton, TPU via Mosaic, CPU via interpret mode)."""
