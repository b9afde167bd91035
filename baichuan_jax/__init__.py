"""baichuan-jax: a JAX/Flax reproduction of the Baichuan and Baichuan 2 language models."""

__version__ = "0.1.0"
