"""What the SwiGLU product's backward keeps, and what that costs: `layers.SWIGLU_VJP` on and off.

The backward pass of the training step reads the activations the forward saved for it. In the
layer scan each saved array is a [layers, ...] stack that XLA zero-fills before the loop, writes
layer by layer and reads back in the backward loop, so every saved byte is written twice and read
once. jax's autodiff of silu(gate) * up saves every intermediate of the formula; `layers.swiglu`
(`SWIGLU_VJP = True`) saves only gate and up and recomputes the sigmoid in its backward.

Two parts, both on the machine at hand:

1. `saved` (nothing is run): the activations the backward of the ~1B benchmark step keeps
   (benchmarks/gpu_train_mfu.py's model: hidden 2048, 18 layers, FFN 5504; batch x seq as
   benchmarks/gpu_suite.py runs it, attention_impl "pallas" traced for CUDA), from the leaves of
   `jax.vjp`'s residuals under `jax.eval_shape` (the loss on whole logits: the output layer's
   share differs from the split loss the step runs, the layer stack's does not), grouped by
   shape and dtype. "stacked" counts the arrays whose leading axis is the layer axis (the layer
   scan's saved activations and weight casts).
2. `run`: a CPU-sized model (`--layers/--hidden/--heads/--run-seq/--run-batch`, attention_impl
   "xla", bf16 compute, fp32 parameters): the jitted value_and_grad of the LM loss with each
   setting, its compiled temporaries (XLA's memory analysis for this backend), its median time
   (the two arms alternate, so load on a shared machine hits both alike), whether the losses are
   the same bits, and each arm's gradient error against the same model computed in fp32.

    python benchmarks/swiglu_residuals.py                       # both parts, defaults
    python benchmarks/swiglu_residuals.py --part saved --batch 8
    python benchmarks/swiglu_residuals.py --part run --layers 2 --hidden 512 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import gpu_train_mfu  # benchmarks/gpu_train_mfu.py: the ~1B model's config
import kernels_pallas
from baichuan_jax import losses
from baichuan_jax.model import BaichuanLM, init_params, layers

GB = 1e9


def _loss_fn(model):
  def loss(params, tokens):
    return losses.lm_loss(model.apply({"params": params}, tokens[:, :-1]), tokens[:, 1:],
                          z_loss_weight=2e-4)["loss"]
  return loss


def saved_activations(cfg, batch: int, seq: int, switch: bool) -> dict:
  """The arrays the backward of the LM loss keeps with `layers.SWIGLU_VJP = switch` (traced
  only: shapes, no values). Returns totals and a table grouped by (shape, dtype)."""
  old = layers.SWIGLU_VJP
  layers.SWIGLU_VJP = switch
  try:
    loss = _loss_fn(BaichuanLM(cfg))
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    res = jax.eval_shape(lambda p, t: jax.vjp(lambda p: loss(p, t), p)[1], params, tokens)
  finally:
    layers.SWIGLU_VJP = old
  groups = collections.Counter((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(res))
  rows = sorted(({"shape": list(s), "dtype": d, "count": n,
                  "bytes": int(np.prod(s)) * np.dtype(d).itemsize * n}
                 for (s, d), n in groups.items()), key=lambda r: -r["bytes"])
  ffn = (cfg.num_layers, batch, seq, cfg.intermediate_size)
  return {"swiglu_vjp": switch, "rows": rows,
          "total_bytes": sum(r["bytes"] for r in rows),
          "stacked_bytes": sum(r["bytes"] for r in rows
                               if len(r["shape"]) > 1 and r["shape"][0] == cfg.num_layers),
          "ffn_arrays": sum(r["count"] for r in rows if tuple(r["shape"]) == ffn)}


def run_cpu(layers_n: int, hidden: int, heads: int, seq: int, batch: int, iters: int) -> dict:
  """Both settings of `layers.SWIGLU_VJP` on a model this machine runs: compiled temporaries,
  median seconds of value_and_grad, loss bits and gradient error against fp32."""
  cfg = gpu_train_mfu.model_config("xla", "none", seq, layers_n, hidden, heads)
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq + 1), 3, cfg.vocab_size)
  compiled, out = {}, {}
  old = layers.SWIGLU_VJP
  try:
    for switch in (False, True):  # the switch is read when the program is traced
      layers.SWIGLU_VJP = switch
      fn = jax.jit(jax.value_and_grad(_loss_fn(BaichuanLM(cfg))))
      compiled[switch] = fn.lower(params, tokens).compile()
      mem = compiled[switch].memory_analysis()
      out[switch] = {"temp_bytes": int(mem.temp_size_in_bytes), "times": []}
  finally:
    layers.SWIGLU_VJP = old
  results = {s: jax.block_until_ready(compiled[s](params, tokens)) for s in compiled}
  for _ in range(iters):
    for switch in (False, True):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled[switch](params, tokens))
      out[switch]["times"].append(time.perf_counter() - t0)
  f32 = copy.deepcopy(cfg)  # the same model computed in fp32: the reference
  f32.dtype = "float32"
  with jax.default_matmul_precision("highest"):
    exact = jax.jit(jax.grad(_loss_fn(BaichuanLM(f32))))(params, tokens)
  for switch in (False, True):
    grads = results[switch][1]
    err = [float(jnp.linalg.norm((g - e).ravel()) / jnp.linalg.norm(e.ravel()))
           for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(exact))]
    out[switch].update(median_s=float(np.median(out[switch]["times"])), loss=float(
        results[switch][0]), grad_rel_err_mean=float(np.mean(err)),
        grad_rel_err_max=float(np.max(err)))
  return {"config": dict(layers=layers_n, hidden=hidden, heads=heads, ffn=cfg.intermediate_size,
                         seq=seq, batch=batch, vocab=cfg.vocab_size, iters=iters),
          "same_loss_bits": out[False]["loss"] == out[True]["loss"],
          "autodiff": out[False], "swiglu_vjp": out[True]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--part", choices=("saved", "run", "both"), default="both",
                 help="saved: the ~1B step's kept activations (traced); run: time a CPU model")
  p.add_argument("--batch", type=int, default=4, help="saved: rows of the ~1B step")
  p.add_argument("--seq", type=int, default=4096, help="saved: sequence length of the ~1B step")
  p.add_argument("--layers", type=int, default=4, help="run: layers of the CPU model")
  p.add_argument("--hidden", type=int, default=1024, help="run: hidden size (FFN by the 8/3 rule)")
  p.add_argument("--heads", type=int, default=8, help="run: attention heads")
  p.add_argument("--run-seq", type=int, default=1024, help="run: sequence length")
  p.add_argument("--run-batch", type=int, default=2, help="run: rows")
  p.add_argument("--iters", type=int, default=8, help="run: timed calls per arm")
  p.add_argument("--json", help="also write the results to this JSON file")
  args = p.parse_args(argv)
  for name in ("batch", "seq", "layers", "hidden", "heads", "run_seq", "run_batch", "iters"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
  dev = jax.devices()[0]
  result = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "python": platform.python_version(), "command": "python benchmarks/swiglu_residuals.py "
            + " ".join(argv if argv is not None else sys.argv[1:])}
  print(f"# {dev.platform} ({dev.device_kind}), jax {jax.__version__}")
  if args.part in ("saved", "both"):
    with kernels_pallas.lowering_platform("cuda"):
      cfg = gpu_train_mfu.model_config("pallas", "none", args.seq, 18, 2048, 16)
      arms = [saved_activations(cfg, args.batch, args.seq, s) for s in (False, True)]
    result["saved"] = {"batch": args.batch, "seq": args.seq, "autodiff": arms[0],
                       "swiglu_vjp": arms[1]}
    print(f"\n~1B step ({args.batch} x {args.seq}, 18 layers, FFN {cfg.intermediate_size}): "
          "what the backward keeps")
    print("| SwiGLU backward | [L, b, s, ffn] arrays | stacked (layer scan) GB | all GB |")
    print("|---|---:|---:|---:|")
    for name, a in zip(("jax autodiff", "layers.swiglu"), arms):
      print(f"| {name} | {a['ffn_arrays']} | {a['stacked_bytes'] / GB:.2f} | "
            f"{a['total_bytes'] / GB:.2f} |")
  if args.part in ("run", "both"):
    r = run_cpu(args.layers, args.hidden, args.heads, args.run_seq, args.run_batch, args.iters)
    result["run"] = r
    c = r["config"]
    print(f"\nCPU model ({c['layers']} layers, hidden {c['hidden']}, FFN {c['ffn']}, "
          f"{c['batch']} x {c['seq']}, vocab {c['vocab']:,}): value_and_grad, median of "
          f"{c['iters']}; losses the same bits: {r['same_loss_bits']}")
    print("| SwiGLU backward | s per call | XLA temporaries MiB | grad rel. error vs fp32 "
          "(mean / max over leaves) |")
    print("|---|---:|---:|---:|")
    for name, key in (("jax autodiff", "autodiff"), ("layers.swiglu", "swiglu_vjp")):
      a = r[key]
      print(f"| {name} | {a['median_s']:.3f} | {a['temp_bytes'] / 2**20:,.0f} | "
            f"{a['grad_rel_err_mean']:.5f} / {a['grad_rel_err_max']:.5f} |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as fh:
      json.dump(result, fh, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
