"""Alignment entry point: pretrain a small policy, train a reward model, run PPO, run chat SFT.

Example (the reduced run recorded in docs/alignment.md):

  python experiments/align.py --config=experiments/configs/rlhf_sentiment.py \
      --workdir=/tmp/rlhf --stages=all --config.ppo.iterations=100

Each stage writes `<stage>_metrics.jsonl`, `<stage>.png` and `<stage>_summary.json` to --workdir.
"""

import json
import logging

from absl import app, flags
from ml_collections import config_flags

from baichuan_jax.align import sentiment

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/rlhf_sentiment.py",
                                          "Experiment config file (ml_collections).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/baichuan_rlhf",
                               "Directory for parameters, metrics, plots and summaries.")
_STAGES = flags.DEFINE_list("stages", ["all"], "Stages to run in order: all, or any of "
                            "pretrain, rm, ppo, sft (each needs the earlier stages' outputs).")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  out = sentiment.run(_CONFIG.value, _WORKDIR.value, _STAGES.value)
  print(json.dumps(out, ensure_ascii=False, indent=2))


if __name__ == "__main__":
  app.run(main)
