"""Test session set-up: 8 fake CPU devices (for mesh tests) before jax is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture
def lower_triton_for_an_h200():
  """CUDA lowerings of Triton kernels on this CPU machine under any jax
  (`kernels_pallas.triton_target`: jax >= 0.11 asks the local GPU for a compute capability).
  The test modules that lower Triton kernels for CUDA use it for every test."""
  import kernels_pallas  # here, not at the top: the environment above comes before jax
  with kernels_pallas.triton_target():
    yield
