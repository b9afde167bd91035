"""RoPE vs ALiBi ablation entry point (see experiments/configs/ablation_positions.py).

  python experiments/ablation.py --config=experiments/configs/ablation_positions.py \
      --workdir=/tmp/ablation --docs_dir=docs/results

Resumable: re-running with the same --workdir trains only the runs that have not finished.
Writes ablation_results.{md,json}, ablation_loss_curves.png and ablation_extrapolation.png to
--workdir (and copies them to --docs_dir when given).
"""

from absl import app, flags
from ml_collections import config_flags

from baichuan_jax.research import ablation

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/ablation_positions.py",
    "Ablation config file; append ':gpu' for the accelerator size.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/baichuan_ablation",
                               "Directory for per-run results, tables and plots (resumable).")
_DOCS_DIR = flags.DEFINE_string("docs_dir", None,
                                "Also copy the tables and plots here (e.g. docs/results).")


def main(argv):
  del argv
  cfg = _CONFIG.value
  if _DOCS_DIR.value is not None:
    cfg.docs_dir = _DOCS_DIR.value
  summary = ablation.run_ablation(cfg, _WORKDIR.value)
  print(f"\nwrote {_WORKDIR.value}/ablation_results.md"
        + ("" if summary["complete"] else " (PARTIAL: some runs have not finished)"))


if __name__ == "__main__":
  app.run(main)
