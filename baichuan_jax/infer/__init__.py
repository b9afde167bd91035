"""Inference: KV-cache generation, sampling, the Baichuan chat template and weight-only quantization."""

from baichuan_jax.infer.chat_template import (DEFAULT_SAMPLING, build_chat_prompt, chat_reply,
                                              chat_stop_ids)
from baichuan_jax.infer.generate import Completion, Generator, StreamEvent, generate, shard_params

__all__ = ["Completion", "DEFAULT_SAMPLING", "Generator", "StreamEvent", "build_chat_prompt",
           "chat_reply", "chat_stop_ids", "generate", "shard_params"]
