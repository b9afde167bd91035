"""The soak test's run (tests/test_soak.py): a tiny model on a deterministic synthetic stream.

`python tests/soak_helpers.py WORKDIR XLA_CACHE` trains it in WORKDIR (resuming what is there);
the test kills it with SIGKILL at random moments and damages its checkpoints in between.
"""

import os
import sys
import time

import numpy as np

MODEL = dict(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2, intermediate_size=64,
             vocab_size=128, max_seq_len=16, dtype="float32")
BATCH, SEQ, TOTAL = 2, 8, 40


def config():
  from baichuan_jax import configs  # pylint: disable=import-outside-toplevel
  from experiments.configs import pretrain  # pylint: disable=import-outside-toplevel
  c = pretrain.get_config("tiny")
  c.model = configs.get("tiny", **MODEL)
  c.data.vocab_size = MODEL["vocab_size"]
  t = c.train
  t.batch_size, t.seq_len, t.total_steps, t.warmup_steps, t.peak_lr = BATCH, SEQ, TOTAL, 2, 3e-3
  t.zero_stage, t.loss_chunk_size = 0, 0
  c.num_devices, c.peak_flops, c.tensorboard, c.compilation_cache = 1, 1e11, False, ""
  c.eval_every, c.sample_tokens = 0, 0
  # Async saves (the default path) every 2 steps; nothing deleted, so an intact older checkpoint
  # is always there to fall back to.
  c.checkpoint.save_every, c.checkpoint.keep_last, c.checkpoint.async_save = 2, 100, True
  return c


def batch(index: int) -> dict:
  r = np.random.RandomState(index)
  x = r.randint(3, MODEL["vocab_size"], (BATCH, SEQ + 1)).astype(np.int32)
  return {"inputs": x[:, :-1], "targets": x[:, 1:],
          "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
          "segment_ids": np.ones((BATCH, SEQ), np.int32),
          "loss_mask": np.ones((BATCH, SEQ), np.int32)}


class Stream:
  """A resumable DataSource: batch i of the stream is `batch(i)`."""
  tokenizer_path = None

  def train(self, process_index, process_count):
    return _Iter()

  def validation(self, process_index, process_count):
    return [batch(10_000)]


class _Iter:
  def __init__(self):
    self.i = 0

  def __iter__(self):
    return self

  def __next__(self):
    if os.environ.get("SOAK_BATCH_SECONDS"):  # a slow reader: keeps a run alive for a while
      time.sleep(float(os.environ["SOAK_BATCH_SECONDS"]))
    self.i += 1
    return batch(self.i - 1)

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def main(workdir: str, cache: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from baichuan_jax.train import trainer  # pylint: disable=import-outside-toplevel
  trainer.run(config(), workdir, data=Stream(), progress=False)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
