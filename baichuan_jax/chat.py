"""``python -m baichuan_jax.chat``: the interactive chat CLI, kept at its old path (the code is in
``baichuan_jax.infer.chat_cli``)."""
import sys
from baichuan_jax.infer.chat_cli import ChatSession, main, repl  # noqa: F401  (re-exports)

if __name__ == "__main__":
  sys.exit(main())
