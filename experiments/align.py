"""Alignment entry point.

Two recipes, chosen by the config file:

* `experiments/configs/rlhf_sentiment.py` (default): on real Chinese reviews, pretrain a small
  policy, train a reward model, run PPO with actor/reference/reward/critic, and run chat SFT:

    python -m experiments.align --config=experiments/configs/rlhf_sentiment.py --workdir=/tmp/rlhf

  `--stages=pretrain,rm` (etc.) runs some stages; each stage writes `<stage>_metrics.jsonl`,
  `<stage>.png` and `<stage>_summary.json` to --workdir, its weights as a checkpoint under it.
* `experiments/configs/sft.py`: chat SFT (LoRA or full) on your own JSONL from a checkpoint.

Override any config key on the command line, e.g. `--config.ppo.iterations=100`.
"""

import json
import logging

from absl import app, flags
from ml_collections import config_flags

from baichuan_jax.align import recipes, sentiment

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/rlhf_sentiment.py",
                                          "Experiment config file (ml_collections).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/baichuan_rlhf",
                               "Directory for parameters, metrics, plots and summaries.")
_STAGES = flags.DEFINE_list("stages", ["all"], "Stages to run in order: all, or any of "
                            "pretrain, rm, ppo, sft (each needs the earlier stages' outputs); "
                            "rlhf_sentiment config only.")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("baichuan_jax").setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax reports every read/write at INFO
  cfg = _CONFIG.value
  if cfg.get("task", "rlhf_sentiment") == "sft":
    out = recipes.run_sft(cfg, _WORKDIR.value)
  else:
    out = sentiment.run(cfg, _WORKDIR.value, _STAGES.value)
  print(json.dumps(out, ensure_ascii=False, indent=2))


if __name__ == "__main__":
  app.run(main)
