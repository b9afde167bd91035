"""Pretraining entry point (the README's first command).

  python -m experiments.train --config experiments/configs/pretrain.py --workdir /tmp/baichuan_tiny
  python -m experiments.train --config experiments/configs/pretrain.py:baichuan2-7b,h100 \
      --config.dry_run=True

`--config` takes `FILE[:PRESET[,HARDWARE]]`; any field can be overridden with `--config.x=y`
(e.g. `--config.train.total_steps=50 --config.train.peak_lr=1e-3`). Running again with the same
`--workdir` resumes from the newest verified checkpoint. See docs/training.md.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from baichuan_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/pretrain.py",
    "Pretraining config file, optionally with :PRESET[,HARDWARE] (tiny, baichuan-7b, "
    "baichuan-13b, baichuan2-7b, baichuan2-13b; hardware h100 or v5p).")
_WORKDIR = flags.DEFINE_string(
    "workdir", "/tmp/baichuan_tiny",
    "Run folder: checkpoints/, metrics.jsonl, tensorboard/, loss_curve.png, summary.json. "
    "An existing run in it is resumed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      stream=sys.stdout)
  for noisy in ("absl", "jax", "orbax", "tensorstore"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  sys.exit(trainer.main(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main)
