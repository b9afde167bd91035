"""Inference: KV-cache generation, sampling, the Baichuan chat template and weight-only quantization."""

import sys as _sys

from baichuan_jax.infer import generation
from baichuan_jax.infer.chat_template import (DEFAULT_SAMPLING, build_chat_prompt, chat_reply,
                                              chat_stop_ids)
from baichuan_jax.infer.generation import Completion, Generator, StreamEvent, generate, shard_params

# The generation module was `infer/generate.py`, a name the `generate` function shadows here; the
# old module path still imports (`from baichuan_jax.infer.generate import Generator`).
_sys.modules.setdefault(__name__ + ".generate", generation)

__all__ = ["Completion", "DEFAULT_SAMPLING", "Generator", "StreamEvent", "build_chat_prompt",
           "chat_reply", "chat_stop_ids", "generate", "generation", "shard_params"]
