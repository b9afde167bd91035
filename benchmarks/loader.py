"""Packed-loader throughput vs the tiny model's training throughput (tokens/s, same machine, same run).

Measures, on the default tokenized corpus (``baichuan_jax.data.default_data``, built if missing):

  ours                  ``baichuan_jax.data.Loader`` (Grain over TFDS ArrayRecord, our packer), with
                        0 (inline) and 2 reader threads
  grain-concat-split    the alternative a Grain user would reach for: the same source, shuffle and
                        shard, packed by ``grain.experimental.ConcatThenSplitIterDataset`` + ``batch``
  train-step            the tiny preset's jitted train step (AdamW, batch 8 x 256, fp32, one CPU
                        device): the rate the loader has to keep up with

Row tokens/s counts every slot of a batch (batch x seq_len per batch); "real" counts non-padding
tokens; tokens/CPU-s divides by the process's CPU time (all threads), which is far less sensitive
than wall time to other jobs sharing the machine. Usage:

  python benchmarks/loader.py                         # 300 batches per loader, 20 train steps
  python benchmarks/loader.py --batches 100 --steps 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def bench_loader(make, batches: int, warmup: int = 5) -> dict:
  it = make()
  for _ in range(warmup):
    next(it)
  real = 0
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(batches):
    b = next(it)
    real += int(b["loss_mask"].sum()) if "loss_mask" in b else int((b["inputs_segment_ids"] > 0).sum())
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  shape = b["inputs"].shape
  n = batches * shape[0] * shape[1]
  return {"batches": batches, "seconds": dt, "cpu_seconds": cpu, "tokens_per_s": n / dt,
          "real_tokens_per_s": real / dt, "tokens_per_cpu_s": n / cpu}


def grain_concat_split(dataset_path, batch_size, seq_len, seed):
  """Grain's own packer on the same document stream (shuffled, sharded, bos/eos added)."""
  import grain  # pylint: disable=import-outside-toplevel
  import grain.experimental as ge  # pylint: disable=import-outside-toplevel
  from baichuan_jax.data import loader, tokenized  # pylint: disable=import-outside-toplevel
  src = tokenized.open_split(dataset_path, "train")
  docs = loader.DocumentStream(grain.MapDataset.source(src), None, seed=seed, shuffle=True,
                               process_index=0, process_count=1, num_epochs=None)
  ex = docs.map(lambda r: loader.to_example(r, 1, 2)).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  packed = ge.ConcatThenSplitIterDataset(ex, length_struct={"inputs": seq_len, "targets": seq_len})
  return iter(packed.batch(batch_size))


def bench_train(batch_size: int, seq_len: int, steps: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from baichuan_jax import configs, sharding, train  # pylint: disable=import-outside-toplevel
  model_cfg = configs.get("tiny", dtype="float32")
  train_cfg = train.default_train_config()
  train_cfg.batch_size, train_cfg.seq_len = batch_size, seq_len
  train_cfg.mesh.data = 1
  mesh = sharding.make_mesh(train_cfg.mesh, jax.devices()[:1])
  state = train.create_train_state(model_cfg, train_cfg, mesh)
  step = train.make_train_step(model_cfg, train_cfg, mesh)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(3, model_cfg.vocab_size, (batch_size, seq_len), dtype=np.int32)}
  batch["targets"] = np.roll(batch["inputs"], -1, axis=1)
  batch["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()
  batch["segment_ids"] = np.ones((batch_size, seq_len), np.int32)
  batch["loss_mask"] = np.ones((batch_size, seq_len), np.int32)
  state, m = step(state, batch)  # compile
  jax.block_until_ready(m)
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  n = steps * batch_size * seq_len
  return {"steps": steps, "seconds": dt, "cpu_seconds": cpu, "tokens_per_s": n / dt,
          "real_tokens_per_s": n / dt, "tokens_per_cpu_s": n / cpu}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--seq-len", type=int, default=256)
  p.add_argument("--batches", type=int, default=300, help="batches timed per loader")
  p.add_argument("--steps", type=int, default=20, help="train steps timed (0 = skip)")
  p.add_argument("--dataset", default=None, help="tokenized dataset (default: default_data())")
  p.add_argument("--json", default=None, help="also write results here")
  args = p.parse_args(argv)

  from baichuan_jax.data import Loader, default_data  # pylint: disable=import-outside-toplevel
  dataset = args.dataset or default_data(vocab_size=4096).dataset_path
  bs, sl = args.batch_size, args.seq_len
  results = {}
  for threads in (0, 2):
    results[f"ours (read_threads={threads})"] = bench_loader(
        lambda t=threads: Loader(dataset, "train", batch_size=bs, seq_len=sl, seed=0,
                                 process_index=0, process_count=1, read_threads=t), args.batches)
  results["grain ConcatThenSplit + batch"] = bench_loader(
      lambda: grain_concat_split(dataset, bs, sl, 0), args.batches)
  if args.steps:
    results["tiny train step (1 CPU device)"] = bench_train(bs, sl, args.steps)

  import grain  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  env = {"cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "machine": platform.machine(), "python": sys.version.split()[0],
         "jax": jax.__version__, "grain": getattr(grain, "__version__", "?"),
         "batch": f"{bs} x {sl}", "dataset": str(dataset)}
  print(json.dumps(env))
  print(f"| {'what':<34} | {'tokens/s':>10} | {'real tokens/s':>13} | {'tokens/CPU-s':>12} | "
        f"{'seconds':>7} |")
  print(f"|{'-' * 36}|{'-' * 12}|{'-' * 15}|{'-' * 14}|{'-' * 9}|")
  for name, r in results.items():
    print(f"| {name:<34} | {r['tokens_per_s']:>10,.0f} | {r['real_tokens_per_s']:>13,.0f} | "
          f"{r['tokens_per_cpu_s']:>12,.0f} | {r['seconds']:>7.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"env": env, "results": results}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
