"""Scaling-law study entry point (see experiments/configs/scaling.py).

  python experiments/scaling.py --config=experiments/configs/scaling.py \
      --workdir=/tmp/scaling --docs_dir=docs/results

Resumable: re-running with the same --workdir trains only the runs that are missing and prints the
progress table. Writes scaling_results.{md,json}, scaling_fit.png and scaling_optimal_size.png.
"""

from absl import app, flags
from ml_collections import config_flags

from baichuan_jax.research import scaling

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/scaling.py",
    "Scaling config file; append ':gpu' for the accelerator ladder.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/baichuan_scaling",
                               "Directory for per-run results, tables and plots (resumable).")
_DOCS_DIR = flags.DEFINE_string("docs_dir", None,
                                "Also copy the tables and plots here (e.g. docs/results).")


def main(argv):
  del argv
  cfg = _CONFIG.value
  if _DOCS_DIR.value is not None:
    cfg.docs_dir = _DOCS_DIR.value
  out = scaling.run_scaling(cfg, _WORKDIR.value)
  for p in out["predictions"]:
    print(f"held-out {p['name']}: predicted {p['predicted']:.4f}, actual {p['actual']:.4f} "
          f"({p['rel_error']:+.2%})")
  print(f"wrote {_WORKDIR.value}/scaling_results.md"
        + ("" if out["complete"] else " (PARTIAL: some runs have not finished)"))


if __name__ == "__main__":
  app.run(main)
