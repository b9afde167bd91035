"""``python -m baichuan_jax.serve``: the OpenAI-compatible server, kept at its old path (the code is
in ``baichuan_jax.infer.server``). Imported, this name is that module itself, so
``from baichuan_jax import serve`` gives ``serve.make_server``, ``serve.main`` and the rest."""
import sys

from baichuan_jax.infer import server

if __name__ == "__main__":
  sys.exit(server.main())
else:
  sys.modules[__name__] = server
