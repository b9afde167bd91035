"""Peak memory of the output layer + loss (forward and backward): whole logits vs split operator.

For each token count, compiles `value_and_grad` of the Baichuan 2 output layer + loss
(NormHead, cross-entropy + max-z loss) with respect to the final hidden states and the head
weight, twice: the plain way (`losses.lm_loss(head_logits(...))`, whole [tokens, vocab] fp32
logits) and the split way (`train.chunked_lm_loss`). Nothing is executed: the numbers are
XLA's compiled memory analysis (`jax.jit(...).lower(...).compile().memory_analysis()`) for the
backend in use, so vocab 125,696 at many thousands of tokens is sized on a laptop CPU.

    python benchmarks/chunked_loss_memory.py                       # Baichuan2-7B head, CPU
    python benchmarks/chunked_loss_memory.py --tokens 4096 16384 --hidden 5120   # 13B head
    python benchmarks/chunked_loss_memory.py --json out.json

Columns: temp = XLA temporaries (activations of this sub-graph), peak = arguments + outputs +
temporaries - donated aliases, i.e. what the device holds at the worst moment of this step.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp

from baichuan_jax import losses
from baichuan_jax.model import head_logits
from baichuan_jax.train import chunked_lm_loss

MiB = 2**20


def _measure(fn, hidden, kernel, targets, mask):
  grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
  t0 = time.perf_counter()
  compiled = grad.lower(hidden, kernel, targets, mask).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  return {"temp_bytes": int(mem.temp_size_in_bytes), "peak_bytes": int(peak),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes), "compile_seconds": seconds}


def run(tokens: int, hidden: int, vocab: int, seq_len: int, chunk: int, vocab_chunks: int,
        dtype: str, z_loss_weight: float) -> dict:
  """Memory of the full and split loss for `tokens` tokens ([tokens / seq_len, seq_len] rows)."""
  batch = max(tokens // seq_len, 1)
  seq = tokens // batch
  h = jax.ShapeDtypeStruct((batch, seq, hidden), jnp.dtype(dtype))
  w = jax.ShapeDtypeStruct((hidden, vocab), jnp.float32)  # fp32 master head
  t = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
  m = jax.ShapeDtypeStruct((batch, seq), jnp.int32)

  def full(h, w, t, m):
    return losses.lm_loss(head_logits(h, w, True), t, m, z_loss_weight)["loss"]

  def split(h, w, t, m):
    return chunked_lm_loss(h, w, t, m, norm_head=True, z_loss_weight=z_loss_weight,
                           chunk_size=chunk, vocab_chunks=vocab_chunks)["loss"]

  return {"tokens": batch * seq, "batch": batch, "seq": seq,
          "logits_fp32_bytes": batch * seq * vocab * 4,
          "full": _measure(full, h, w, t, m), "split": _measure(split, h, w, t, m)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384],
                 help="tokens per step of the output layer (batch x sequence)")
  p.add_argument("--hidden", type=int, default=4096, help="hidden size (7B: 4096, 13B: 5120)")
  p.add_argument("--vocab", type=int, default=125_696, help="vocabulary (Baichuan 2: 125,696)")
  p.add_argument("--seq-len", type=int, default=4096, help="sequence length of a row")
  p.add_argument("--chunk", type=int, default=1024,
                 help="sequence positions per chunk (train config loss_chunk_size)")
  p.add_argument("--vocab-chunks", type=int, default=4,
                 help="vocabulary chunks (train config loss_vocab_chunks); must divide --vocab")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                 help="dtype of the hidden states (compute dtype)")
  p.add_argument("--z-loss-weight", type=float, default=2e-4, help="max-z loss weight")
  p.add_argument("--json", help="also write the results to this JSON file")
  args = p.parse_args(argv)
  if args.vocab % args.vocab_chunks:
    p.error(f"--vocab-chunks={args.vocab_chunks} must divide --vocab={args.vocab}")

  dev = jax.devices()[0]
  print(f"# {dev.platform} ({dev.device_kind}), jax {jax.__version__}, python "
        f"{platform.python_version()}; hidden {args.hidden}, vocab {args.vocab:,}, "
        f"{args.dtype} hidden states, chunk {args.chunk} x {args.vocab_chunks} vocab chunks")
  print("| tokens | fp32 logits | full: temp | full: peak | split: temp | split: peak | "
        "peak saved |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  rows = []
  for n in args.tokens:
    r = run(n, args.hidden, args.vocab, args.seq_len, args.chunk, args.vocab_chunks, args.dtype,
            args.z_loss_weight)
    rows.append(r)
    f, s = r["full"], r["split"]
    print(f"| {r['tokens']:,} | {r['logits_fp32_bytes'] / MiB:,.0f} MiB | "
          f"{f['temp_bytes'] / MiB:,.0f} MiB | {f['peak_bytes'] / MiB:,.0f} MiB | "
          f"{s['temp_bytes'] / MiB:,.0f} MiB | {s['peak_bytes'] / MiB:,.0f} MiB | "
          f"{f['peak_bytes'] / s['peak_bytes']:.1f}x |", flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as fh:
      json.dump({"args": vars(args), "device": dev.device_kind, "jax": jax.__version__,
                 "results": rows}, fh, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
