"""Validation perplexity of a trained small model: fp32 vs bf16 vs weight-only int8 / int4.

    python benchmarks/quant_quality.py                      # trains a tiny model here first
    python benchmarks/quant_quality.py --checkpoint WORKDIR # a model trained by experiments.train

Without `--checkpoint` the script trains the `tiny` preset on the default corpus (built under
~/.cache/baichuan_jax on first use) with the library's train step, for `--steps` steps, then
evaluates every variant on the same `--eval-batches` validation batches (packed sequences, loss on
real tokens only). Variants: fp32 weights; bf16 weights and compute; int8 (per output channel) and
int4 (groups of `--group-size` inputs) on every linear layer with bf16 compute; and the same with
the embedding and output head quantized too ("all").
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def train_tiny(steps: int, layers: int, seed: int, batch: int, seq_len: int):
  """Trains `tiny` on the default corpus; returns (model cfg, params, dataset path, tokenizer)."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from baichuan_jax import configs, sharding, train  # pylint: disable=import-outside-toplevel
  from baichuan_jax.data import default_data, make_loader  # pylint: disable=import-outside-toplevel
  paths = default_data(vocab_size=4096)
  cfg = configs.get("tiny", num_layers=layers)
  tcfg = train.default_train_config()
  tcfg.total_steps, tcfg.warmup_steps, tcfg.peak_lr = steps, max(1, steps // 10), 3e-3
  tcfg.batch_size, tcfg.seq_len, tcfg.seed = batch, seq_len, seed
  tcfg.mesh.data = -1
  mesh = sharding.make_mesh(tcfg.mesh)
  state = train.create_train_state(cfg, tcfg, mesh)
  step = train.make_train_step(cfg, tcfg, mesh)
  loader = make_loader(paths.dataset_path, "train", batch_size=tcfg.batch_size,
                       seq_len=tcfg.seq_len, seed=seed)
  bar = tqdm(range(steps), desc="train tiny", file=sys.stderr)
  for _ in bar:
    state, metrics = step(state, next(loader))
    bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
  return cfg, jax.device_get(state.params), str(paths.dataset_path), str(paths.tokenizer_path)


def _logits_fn(cfg):
  from baichuan_jax.infer import quant  # pylint: disable=import-outside-toplevel
  from baichuan_jax.model import BaichuanLM  # pylint: disable=import-outside-toplevel

  @jax.jit
  def nll(params, batch):
    p = dict(params)
    p["embed_tokens"] = quant.embedding_table(params["embed_tokens"], jnp.dtype(cfg.dtype))
    head = params["lm_head"]
    if quant.is_quantized(head):
      p["lm_head"] = jnp.zeros((cfg.hidden_size, cfg.vocab_size), jnp.dtype(cfg.dtype))
    hidden = BaichuanLM(cfg).apply({"params": p}, batch["inputs"], positions=batch["positions"],
                                   segment_ids=batch["segment_ids"], return_hidden=True)
    logits = quant.head_matmul(hidden, head, cfg.norm_head)  # [batch, seq, vocab] fp32
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return -jnp.sum(tok * mask), jnp.sum(mask)
  return nll


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", default=None, help="training workdir to evaluate instead")
  p.add_argument("--dataset", default=None, help="tokenized dataset (default: the default data)")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--batch", type=int, default=8, help="training rows per step")
  p.add_argument("--seq-len", type=int, default=256, help="training and evaluation row length")
  p.add_argument("--eval-batches", type=int, default=16)
  p.add_argument("--group-size", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)

  from baichuan_jax.data import default_data, make_loader  # pylint: disable=import-outside-toplevel
  from baichuan_jax.infer import loading, quant  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  if args.checkpoint:
    model = loading.load_model(checkpoint=args.checkpoint)
    cfg, params = model.cfg, jax.device_get(model.params)
    dataset = args.dataset or str(default_data(vocab_size=cfg.vocab_size).dataset_path)
    source = f"checkpoint {args.checkpoint}"
  else:
    cfg, params, dataset, _ = train_tiny(args.steps, args.layers, args.seed, args.batch,
                                         args.seq_len)
    source = (f"tiny ({args.layers} layers) trained {args.steps} steps of {args.batch}x"
              f"{args.seq_len} tokens here")
  train_s = time.time() - t0
  batches = list(make_loader(dataset, "validation", batch_size=8,
                             seq_len=min(args.seq_len, cfg.max_seq_len),
                             num_batches=args.eval_batches))
  variants = {
      "fp32": ("float32", lambda q: q),
      "bf16": ("bfloat16", lambda q: jax.tree.map(lambda x: x.astype(jnp.bfloat16), q)),
      "int8": ("bfloat16", lambda q: quant.quantize_params(q, "int8", dtype=jnp.bfloat16)),
      "int4": ("bfloat16", lambda q: quant.quantize_params(q, "int4", args.group_size,
                                                           dtype=jnp.bfloat16)),
      "int8 all": ("bfloat16", lambda q: quant.quantize_params(
          q, "int8", embedding=True, head=True, dtype=jnp.bfloat16)),
      "int4 all": ("bfloat16", lambda q: quant.quantize_params(
          q, "int4", args.group_size, embedding=True, head=True, dtype=jnp.bfloat16)),
  }
  rows = []
  for name, (dtype, make) in variants.items():
    vcfg = cfg.copy_and_resolve_references()
    vcfg.dtype = dtype
    vparams = make(params)
    nll_fn = _logits_fn(vcfg)
    tot, n = 0.0, 0.0
    for b in batches:
      s, c = nll_fn(vparams, {k: jnp.asarray(v) for k, v in b.items()})
      tot, n = tot + float(s), n + float(c)
    rows.append({"variant": name, "bytes": quant.tree_nbytes(vparams), "nll": tot / n,
                 "ppl": math.exp(tot / n), "tokens": int(n)})
    print(json.dumps(rows[-1]), flush=True)
  base = rows[0]["ppl"]
  print(f"\n{source}; {rows[0]['tokens']} validation tokens; int4 group size {args.group_size}; "
        f"train+load {train_s:.0f}s\n")
  print("| weights | parameter MB | val loss | perplexity | vs fp32 |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['bytes'] / 1e6:.1f} | {r['nll']:.4f} | {r['ppl']:.2f} | "
          f"{100 * (r['ppl'] / base - 1):+.2f}% |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"source": source, "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
