"""Installs baichuan-jax: `pip install -e .` (core) or `pip install -e ".[test]"` (with test tools)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _reqs(name):
  lines = (HERE / name).read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


TORCH = [
    # torch is only a test reference / optional .bin loader. Pin the CPU build that CI machines
    # carry locally: a looser range pulls several GB of CUDA wheels.
    "torch==2.13.0",
    "transformers>=4.40",
]

DASK = [
    # Beam's DaskRunner (apache-beam 2.77 asks for dask and distributed >= 2024.4.2, its own
    # `apache-beam[dask]` extra); tests/test_data_clean_dask.py runs the cleaning pipeline on a
    # local 2-worker dask.distributed cluster.
    "dask>=2024.4.2,<2027",
    "distributed>=2024.4.2,<2027",
]

setup(
    name="baichuan-jax",
    version="0.1.0",
    description="JAX/Flax reproduction of the Baichuan and Baichuan 2 language models",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["baichuan_jax*", "kernels_pallas*", "experiments*"]),
    install_requires=_reqs("requirements.txt"),
    extras_require={
        "torch": TORCH,
        "dask": DASK,
        "test": TORCH + DASK + ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100",
                         # tests/test_notebook.py runs the Colab tour headless.
                         "nbclient>=0.10,<1", "nbformat>=5.9,<6", "ipykernel>=6.29,<8",
                         # tests/test_infer_serve.py talks to the server with the official client.
                         "openai>=1.40,<3",
                         # tests/test_triton_sm90.py compiles the GPU kernels for sm_90 (no GPU).
                         "triton>=3.9,<3.10"],
    },
)
