"""``python -m baichuan_jax.generate``: the batch generation CLI, kept at its old path (the code is
in ``baichuan_jax.infer.generate_cli``)."""
import sys
from baichuan_jax.infer.generate_cli import (  # noqa: F401  (re-exports)
    add_sampling_flags, encode_records, main, read_prompts, resolve_max_new, run_batches)

if __name__ == "__main__":
  sys.exit(main())
