"""Measures option-letter scoring: the output head at the last position vs full-sequence logits.

    python benchmarks/eval_scoring.py [--preset tiny] [--vocab 125696] [--batch 4] [--seq 256]

Our `score_fn` applies the output head only at each row's last real token; the alternative a
user would reach for (as generic harnesses do) computes `[batch, seq, vocab]` logits and gathers
one row. Both are jitted; the script checks they agree, then reports the median wall time per
batch and XLA's temporary-buffer size for each.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from baichuan_jax import configs
from baichuan_jax.eval.model_fns import score_fns
from baichuan_jax.eval.scoring import pad_batch
from baichuan_jax.model import BaichuanLM, init_params


def _time(fn, repeats):
  fn()  # compile + warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--vocab", type=int, default=125696, help="default: Baichuan 2's vocabulary")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  cfg = configs.get(args.preset, vocab_size=args.vocab, num_layers=args.layers, dtype="float32",
                    max_seq_len=max(args.seq, 256))
  params = jax.jit(lambda r: init_params(cfg, r))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  rows = [list(rng.integers(3, args.vocab, size=int(n)))
          for n in rng.integers(args.seq // 2, args.seq + 1, size=args.batch)]
  batch = pad_batch(rows, 0, "right", length=args.seq)
  args_dev = [jnp.asarray(x) for x in (batch.tokens, batch.positions, batch.segment_ids,
                                       batch.last_index)]
  model = BaichuanLM(cfg)

  def full(p, tokens, positions, seg, last):
    logits = model.apply({"params": p}, tokens, positions=positions, segment_ids=seg)
    return logits[jnp.arange(tokens.shape[0]), last]  # [batch, vocab] from [batch, seq, vocab]

  def last_only(p, tokens, positions, seg, last):
    from baichuan_jax.model import head_logits  # pylint: disable=import-outside-toplevel
    hidden = model.apply({"params": p}, tokens, positions=positions, segment_ids=seg,
                         return_hidden=True)
    return head_logits(hidden[jnp.arange(tokens.shape[0]), last], p["lm_head"], cfg.norm_head)

  score_fn, _ = score_fns(cfg, params)
  np.testing.assert_allclose(score_fn(batch), np.asarray(jax.jit(full)(params, *args_dev)),
                             rtol=2e-4, atol=2e-4)
  print(f"# jax {jax.__version__}, {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"python {platform.python_version()}; preset {args.preset} with {args.layers} layers, "
        f"vocab {args.vocab}, batch {args.batch} x seq {args.seq}, fp32")
  print("| method | median s / batch | XLA temp buffers (MiB) |")
  print("|---|---:|---:|")
  for name, fn in (("full logits, gather last", full), ("head at last position (ours)", last_only)):
    jf = jax.jit(fn)
    mem = jf.lower(params, *args_dev).compile().memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20 if mem else float("nan")
    sec = _time(lambda: jax.block_until_ready(jf(params, *args_dev)), args.repeats)
    print(f"| {name} | {sec:.4f} | {temp:.1f} |")


if __name__ == "__main__":
  main()
