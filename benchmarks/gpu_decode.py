"""Batch-1 KV-cache decode speed of a 7B-shaped model against the memory-bandwidth limit.

Builds Baichuan2-7B's shape (32 layers, hidden 4096, vocab 125,696) with random bf16 weights
(parameters and compute in bf16) twice, once with RoPE and once with ALiBi (the only difference),
and generates with `baichuan_jax.infer.generate` (jitted prefill, then a host loop over a jitted
single-token step on the pre-allocated cache), greedy, batch 1, no stop token.

Decode tokens/s is (N_long - N_short) / (t_long - t_short) over two generations of N_long and
N_short new tokens (both compiled first), which cancels the prefill and host overheads.

Each step must read every weight used in a matmul once (all but the embedding table, of which it
reads one row) plus the KV cache slots attention reads; the bandwidth limit is
tokens/s <= bandwidth / bytes-per-step. Bandwidth is measured in the same process with a large
device-to-device copy (bytes read + written), and the datasheet value is given too.

Usage:
  python benchmarks/gpu_decode.py --new-tokens 2048 --out docs/results/decode.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baichuan_jax import configs  # noqa: E402
from baichuan_jax.infer.generate import generate  # noqa: E402
from baichuan_jax.model import BaichuanLM, init_cache, init_params  # noqa: E402
from baichuan_jax.model.transformer import DecoderLayer, _context  # noqa: E402

DATASHEET_BW = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def copy_bandwidth(gib: float = 4.0, iters: int = 20) -> float:
  """Bytes/s of a device-to-device copy (read + write counted)."""
  n = int(gib * 2 ** 30 / 2)
  x = jnp.ones((n,), jnp.bfloat16) * jax.random.normal(jax.random.PRNGKey(0), (), jnp.bfloat16)
  f = jax.jit(lambda x: x * 2)  # one read, one write per element
  f(x).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(iters):
    y = f(x)
  y.block_until_ready()
  return 2 * x.nbytes * iters / (time.perf_counter() - t0)


def random_params(cfg, seed=0):
  """Random bf16 parameters of the model's exact tree (std 0.02; RMSNorm scales at 1)."""
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  out = []
  for key, (path, leaf) in zip(keys, leaves):
    if "norm" in jax.tree_util.keystr(path):
      out.append(jnp.ones(leaf.shape, leaf.dtype))
      continue
    fill = jax.jit(lambda k, shape=leaf.shape, dtype=leaf.dtype:
                   (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    out.append(fill(key))
  return jax.tree_util.tree_unflatten(tree, out)


def bytes_per_step(cfg, cache_len: int) -> dict:
  """Bytes one decode step must read: matmul weights and the KV cache slots attention reads."""
  counts = configs.param_counts(cfg)
  weights = 2 * (counts["total"] - counts["embedding"])  # bf16; one embedding row is negligible
  head_dim = cfg.hidden_size // cfg.num_heads
  kv = 2 * cfg.num_layers * cache_len * cfg.num_kv_heads * head_dim * 2
  return {"weights": weights, "kv_cache": kv}


def time_generate(cfg, params, prompt, n):
  generate(cfg, params, [prompt], max_new_tokens=n, stop_token_ids=[])  # compile
  t0 = time.perf_counter()
  out = generate(cfg, params, [prompt], max_new_tokens=n, stop_token_ids=[])
  sec = time.perf_counter() - t0
  if len(out[0].tokens) != n:
    raise RuntimeError(f"generated {len(out[0].tokens)} tokens, expected {n}")
  return sec


def step_breakdown(cfg, params, cache_len, iters=20):
  """Milliseconds of one jitted single-token forward: with the KV cache, and without any cache.

  Separates the model's per-token cost from the generation loop around it.
  """
  model = BaichuanLM(cfg)
  tok = jnp.ones((1, 1), jnp.int32)
  pos = jnp.full((1, 1), cache_len // 2, jnp.int32)
  seg = jnp.ones((1, 1), jnp.int32)

  @jax.jit
  def no_cache(params):
    return model.apply({"params": params}, tok, positions=pos, segment_ids=seg,
                       return_hidden=True)[:, -1]

  @functools.partial(jax.jit, donate_argnums=(1,))
  def with_cache(params, cache):
    hidden, cache = model.apply({"params": params}, tok, positions=pos, segment_ids=seg,
                                cache=cache, return_hidden=True)
    return hidden[:, -1], cache

  out = {}
  jax.block_until_ready(no_cache(params))
  t0 = time.perf_counter()
  for _ in range(iters):
    h = no_cache(params)
  jax.block_until_ready(h)
  out["forward_no_cache_ms"] = (time.perf_counter() - t0) / iters * 1e3
  cache = init_cache(cfg, 1, cache_len)
  h, cache = with_cache(params, cache)
  jax.block_until_ready(cache)
  t0 = time.perf_counter()
  for _ in range(iters):
    h, cache = with_cache(params, cache)
  jax.block_until_ready(cache)
  out["forward_with_cache_ms"] = (time.perf_counter() - t0) / iters * 1e3

  # What `generate` runs per step: the same stacked weights through an unrolled layer loop.
  unrolled_model = BaichuanLM(cfg, unroll_layers=True)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def unrolled_with_cache(params, cache):
    hidden, cache = unrolled_model.apply({"params": params}, tok, positions=pos, segment_ids=seg,
                                         cache=cache, return_hidden=True)
    return hidden[:, -1], cache

  h, cache = unrolled_with_cache(params, cache)
  jax.block_until_ready(cache)
  t0 = time.perf_counter()
  for _ in range(iters):
    h, cache = unrolled_with_cache(params, cache)
  jax.block_until_ready(cache)
  out["forward_unroll_layers_with_cache_ms"] = (time.perf_counter() - t0) / iters * 1e3

  # The same unrolled step inside a device loop (`fori_loop` of `iters` steps, one call): XLA
  # then copies the static weight slices on every iteration. This is why `generate` drives the
  # steps from the host.
  @functools.partial(jax.jit, donate_argnums=(1,))
  def fori(params, cache):
    def body(_, carry):
      acc, cache = carry
      hidden, cache = unrolled_model.apply({"params": params}, tok, positions=pos,
                                           segment_ids=seg, cache=cache, return_hidden=True)
      return acc + hidden[:, -1, :1].astype(jnp.float32), cache
    return jax.lax.fori_loop(0, iters, body, (jnp.zeros((1, 1), jnp.float32), cache))

  jax.block_until_ready(fori(params, init_cache(cfg, 1, cache_len)))
  cache = jax.block_until_ready(init_cache(cfg, 1, cache_len))
  t0 = time.perf_counter()
  jax.block_until_ready(fori(params, cache))
  out["unroll_layers_in_fori_loop_ms_per_step"] = (time.perf_counter() - t0) / iters * 1e3

  # The same layers applied one by one to per-layer weight arrays (sliced once, outside the jit,
  # so nothing is sliced per step): the floor for the layer loop. (Stops at the final hidden
  # state before the norm.)
  per_layer = [jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(cfg.num_layers)]
  per_layer = jax.block_until_ready(jax.tree.map(jnp.copy, per_layer))
  layer = DecoderLayer(cfg)

  @jax.jit
  def unrolled(embed, per_layer):
    ctx, _ = _context(tok, pos, seg, None)
    x = jnp.take(embed, tok, axis=0).astype(cfg.dtype)
    for p in per_layer:
      x, _ = layer.apply({"params": p}, x, ctx, None)
    return x[:, -1]

  jax.block_until_ready(unrolled(params["embed_tokens"], per_layer))
  t0 = time.perf_counter()
  for _ in range(iters):
    h = unrolled(params["embed_tokens"], per_layer)
  jax.block_until_ready(h)
  out["layers_unrolled_no_head_ms"] = (time.perf_counter() - t0) / iters * 1e3
  del per_layer
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--preset", default="baichuan2-7b", help="model shape (configs.names())")
  p.add_argument("--new-tokens", type=int, default=2048, help="N_long")
  p.add_argument("--short-tokens", type=int, default=128, help="N_short")
  p.add_argument("--prompt-len", type=int, default=16)
  p.add_argument("--positions", default="rope,alibi")
  p.add_argument("--breakdown", action="store_true",
                 help="also time one jitted token forward with and without the KV cache")
  p.add_argument("--copy-gib", type=float, default=4.0, help="size of the bandwidth probe")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  args = p.parse_args(argv)
  if args.new_tokens <= args.short_tokens:
    p.error(f"--new-tokens={args.new_tokens} must exceed --short-tokens={args.short_tokens}")
  dev = jax.devices()[0]
  bw = {"measured_copy": copy_bandwidth(args.copy_gib)}
  for key, value in DATASHEET_BW.items():
    if key in dev.device_kind:
      bw["datasheet"] = value
  env = dict(device=dev.device_kind, jax=jax.__version__, bandwidth_tb_s={k: v / 1e12 for k, v in
                                                                         bw.items()},
             argv=sys.argv)
  print(json.dumps(env), flush=True)
  rows = []
  prompt = list(np.random.default_rng(0).integers(3, 1000, size=args.prompt_len))
  for pos in args.positions.split(","):
    cfg = configs.get(args.preset, position_embedding=pos, dtype="bfloat16",
                      param_dtype="bfloat16")
    params = random_params(cfg)
    t_long = time_generate(cfg, params, prompt, args.new_tokens)
    t_short = time_generate(cfg, params, prompt, args.short_tokens)
    tok_s = (args.new_tokens - args.short_tokens) / (t_long - t_short)
    # The cache holds the padded prompt plus N_long slots; attention reads all of them each step.
    cache_len = -(-(-(-args.prompt_len // 16) * 16 + args.new_tokens) // 16) * 16
    need = bytes_per_step(cfg, cache_len)
    row = dict(position_embedding=pos, params=configs.param_counts(cfg)["total"],
               new_tokens=args.new_tokens, seconds_long=t_long, seconds_short=t_short,
               decode_tokens_per_s=tok_s, ms_per_token=1e3 / tok_s,
               end_to_end_tokens_per_s=args.new_tokens / t_long, bytes_per_step=need)
    for name, value in bw.items():
      row[f"limit_weights_{name}"] = value / need["weights"]
      row[f"fraction_weights_{name}"] = tok_s / (value / need["weights"])
      row[f"fraction_weights_kv_{name}"] = tok_s / (value / (need["weights"] + need["kv_cache"]))
    if args.breakdown:
      row["breakdown"] = step_breakdown(cfg, params, cache_len)
    rows.append(row)
    print(json.dumps(row), flush=True)
    del params
    if args.out:
      Path(args.out).parent.mkdir(parents=True, exist_ok=True)
      Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=1))
  print("| positions | decode tok/s | ms/token | limit tok/s (weights, copy bw) | fraction "
        "| fraction incl. KV reads | end-to-end tok/s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['position_embedding']} | {r['decode_tokens_per_s']:.1f} | {r['ms_per_token']:.2f} "
          f"| {r['limit_weights_measured_copy']:.1f} | {r['fraction_weights_measured_copy']:.1%} "
          f"| {r['fraction_weights_kv_measured_copy']:.1%} | {r['end_to_end_tokens_per_s']:.1f} |")


if __name__ == "__main__":
  main()
