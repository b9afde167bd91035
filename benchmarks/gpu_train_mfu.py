"""Model FLOPs utilisation of a ~1B Baichuan-shaped bf16 training step on one GPU.

The model is Baichuan-7B-shaped (SwiGLU, RoPE, vocab 64,000, untied head) scaled to hidden 2048,
16 heads of 128, 18 layers and the 8/3 FFN rule (5504): 1.17B parameters. Each run builds the real
training step (`baichuan_jax.train.make_train_step`: AdamW, fp32 master weights, bf16 compute,
split output-layer loss, grad clipping, NaN skip) on a one-device mesh and times it on random
tokens at sequence length 4096.

MFU = (model FLOPs per token x tokens per second) / peak, with `configs.flops_per_token` (6N for
the matmul weights plus 12 * layers * heads * head_dim * seq for attention, no causal halving: the
PaLM/MaxText convention) and two peaks: the datasheet's dense bf16 rate (989 TFLOP/s for H100 SXM)
and the rate of a large bf16 matmul measured in the same process. Recomputed FLOPs (remat) are not
counted, so remat lowers MFU.

Usage:
  python benchmarks/gpu_train_mfu.py --runs pallas:none:4,xla:full:4 --out docs/results/mfu.json
  (a run is attention_impl:remat_policy:batch_size)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baichuan_jax import configs, sharding, train  # noqa: E402
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)

DATASHEET_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def model_config(impl: str, remat: str, seq: int, layers: int, hidden: int, heads: int):
  return configs.get("baichuan-7b", hidden_size=hidden, num_heads=heads, num_kv_heads=heads,
                     num_layers=layers, intermediate_size=configs.ffn_width(hidden),
                     max_seq_len=seq, dtype="bfloat16", param_dtype="float32",
                     attention_impl=impl, remat_policy=remat)


def matmul_peak(n: int = 8192, iters: int = 20) -> float:
  """Measured bf16 matmul rate (FLOP/s) on random data."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(iters):
    out = f(a, b)
  out.block_until_ready()
  return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def train_setup(batch: int, seq: int, loss_chunk_size: int | None = None):
  """(train config, one-device mesh) of the timed step: batch x seq tokens, defaults otherwise
  (`loss_chunk_size`: positions per chunk of the split output-layer loss, 0 = whole logits;
  None keeps the default, 1024)."""
  tcfg = train.default_train_config()
  tcfg.batch_size, tcfg.seq_len = batch, seq
  if loss_chunk_size is not None:
    tcfg.loss_chunk_size = loss_chunk_size
  tcfg.mesh.data, tcfg.mesh.model = 1, 1
  tcfg.warmup_steps = 10
  return tcfg, sharding.make_mesh(tcfg.mesh, jax.devices()[:1])


def optimizer_programs(tcfg, recompute=None):
  """(guarded, plain): the optimizer update alone as two jitted `fn(state, grads)`, neither
  donating its input.
  - `guarded` -> the new TrainState: what the training step runs after the backward pass
    (`train.step.guarded_update`: global norm, clip, AdamW with decoupled weight decay, the
    finiteness checks of the loss, the gradient norm, the new params and the new moments, and
    the select that keeps the old state on a bad step), traced with
    `train.step.GUARD_RECOMPUTE = recompute` (None: as the module has it);
  - `plain` -> (new params, new optimizer state): the same optax chain (`train.make_optimizer`)
    and `optax.apply_updates`, unguarded.
  """
  import optax

  from baichuan_jax.train import step as step_lib
  opt, schedule = train.make_optimizer(tcfg), train.lr_schedule(tcfg)

  def guarded(s, g):
    saved = step_lib.GUARD_RECOMPUTE  # read when traced: set for this trace only
    step_lib.GUARD_RECOMPUTE = saved if recompute is None else recompute
    try:
      return step_lib.guarded_update(s, g, {"loss": jnp.float32(1.0)}, s.rng, opt, schedule)[0]
    finally:
      step_lib.GUARD_RECOMPUTE = saved

  def plain(s, g):
    updates, new_opt = opt.update(g, s.opt_state, s.params)
    return optax.apply_updates(s.params, updates), new_opt

  return jax.jit(guarded), jax.jit(plain)


def optimizer_update_timing(state, tcfg, iters: int = 10) -> dict:
  """The optimizer update alone (`optimizer_programs`), on the step's own state (its fp32 params
  and AdamW moments), both programs on the same gradients (a constant 1e-3 tree, an argument,
  not a compile-time constant).

  `min_bytes` is the least traffic any implementation needs: the gradients read twice (once for
  the clipping norm, once by the update), params and floating-point optimizer state read and
  written once (32 bytes per fp32 parameter). Returns ms per update of each, their difference
  (the guard's cost), `min_bytes`, and the largest |difference| between the two new param trees.
  Also the guard's other form (`train.step.GUARD_RECOMPUTE` flipped): its ms
  (`optimizer_guarded_other_ms`), which form each is (`optimizer_guard_recompute`: the step's),
  and whether the two guarded states are the same bits (`optimizer_guard_forms_equal`).
  """
  from baichuan_jax.train import step as step_lib
  guarded_j, plain_j = optimizer_programs(tcfg)
  other_j, _ = optimizer_programs(tcfg, recompute=not step_lib.GUARD_RECOMPUTE)
  grads = jax.jit(lambda p: jax.tree.map(lambda x: jnp.full_like(x, 1e-3), p))(state.params)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree)  # noqa: E731
                            if jnp.issubdtype(x.dtype, jnp.inexact))
  row = dict(optimizer_min_bytes=2 * nbytes(grads) + 2 * nbytes(state.params)
             + 2 * nbytes(state.opt_state),
             optimizer_guarded_ms=median_seconds(guarded_j, state, grads, iters=iters) * 1e3,
             optimizer_plain_ms=median_seconds(plain_j, state, grads, iters=iters) * 1e3,
             optimizer_guarded_other_ms=median_seconds(other_j, state, grads, iters=iters) * 1e3,
             optimizer_guard_recompute=bool(step_lib.GUARD_RECOMPUTE))
  row["optimizer_guard_ms"] = row["optimizer_guarded_ms"] - row["optimizer_plain_ms"]
  new_g, (new_p, _) = guarded_j(state, grads), plain_j(state, grads)
  row["optimizer_guarded_vs_plain_max_abs_diff"] = float(max(
      jnp.max(jnp.abs(a - b)) for a, b in zip(jax.tree.leaves(new_g.params),
                                              jax.tree.leaves(new_p))))
  new_o = other_j(state, grads)
  row["optimizer_guard_forms_equal"] = same_bits((new_g.params, new_g.opt_state),
                                                 (new_o.params, new_o.opt_state))
  return row


@jax.jit
def _bits_equal(a, b):
  def leaf(x, y):
    if jnp.issubdtype(x.dtype, jnp.floating):  # bit patterns, so NaN == NaN and -0 != +0
      kind = jnp.dtype(f"uint{x.dtype.itemsize * 8}")
      x, y = jax.lax.bitcast_convert_type(x, kind), jax.lax.bitcast_convert_type(y, kind)
    return x.shape == y.shape and jnp.all(x == y)
  return jnp.all(jnp.stack([jnp.asarray(e) for e in jax.tree.leaves(jax.tree.map(leaf, a, b))]))


def same_bits(a, b) -> bool:
  """True when two trees of arrays hold the same bits, compared on the device (no copy of the
  trees to the host)."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return bool(_bits_equal(a, b))


def peak_text(row) -> str:
  """A row's peak GiB as text: its own peak, or "<= X" when an earlier run had set a higher one."""
  if row.get("peak_gib") is not None:
    return f"{row['peak_gib']:.1f}"
  return f"<= {row['peak_gib_at_most']:.1f}" if row.get("peak_gib_at_most") else "-"


def run_one(impl, remat, batch, seq, steps, warmup, layers, hidden, heads, peaks,
            profile_dir=None, loss_chunk_size=None, optimizer_probe=False):
  """One timed configuration -> a result row. With `profile_dir`, two more steps run under
  `jax.profiler.trace(profile_dir)` after the timing (not counted in it); `loss_chunk_size` as
  for `train_setup`; with `optimizer_probe`, the row also holds `optimizer_update_timing` on the
  step's state and `optimizer_share_of_step` (the guarded update's time over the step's)."""
  cfg = model_config(impl, remat, seq, layers, hidden, heads)
  tcfg, mesh = train_setup(batch, seq, loss_chunk_size)
  row = dict(attention_impl=impl, remat_policy=remat, batch=batch, seq=seq,
             loss_chunk_size=int(tcfg.loss_chunk_size),
             params=configs.param_counts(cfg)["total"])
  # The device's peak is the process's (it cannot be reset): a row owns it only if it rose.
  peak_before = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
  t0 = time.perf_counter()
  state = train.create_train_state(cfg, tcfg, mesh)
  step = train.make_train_step(cfg, tcfg, mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, cfg.vocab_size, size=(batch, seq + 1)).astype(np.int32)
  data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
          "segment_ids": np.ones((batch, seq), np.int32),
          "loss_mask": np.ones((batch, seq), np.int32)}
  try:
    state, m = step(state, data)  # compiles
    jax.block_until_ready(m)
    row["compile_s"] = time.perf_counter() - t0
    for _ in range(warmup):
      state, m = step(state, data)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, data)
    jax.block_until_ready(m)
    sec = (time.perf_counter() - t0) / steps
    loss = float(m["loss"])  # after 1 + warmup + steps updates, whether or not profiled
    if profile_dir:
      with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        for _ in range(2):
          state, m = step(state, data)
        jax.block_until_ready(m)
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = str(e).split("\n")[0][:300]
    return row
  if optimizer_probe:
    try:
      row.update(optimizer_update_timing(state, tcfg))
      row["optimizer_share_of_step"] = row["optimizer_guarded_ms"] / (sec * 1e3)
    except Exception as e:  # pylint: disable=broad-except
      row["optimizer_error"] = str(e).split("\n")[0][:300]
  flops = configs.flops_per_token(cfg, seq)
  tok_s = batch * seq / sec
  row.update(step_s=sec, tokens_per_s=tok_s, loss=loss,
             model_tflops=flops["total"] * tok_s / 1e12,
             flops_per_token=flops)
  for name, peak in peaks.items():
    row[f"mfu_{name}"] = flops["total"] * tok_s / peak
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use", 0)
  if not stats:  # no memory statistics on this backend (the CPU)
    row["peak_gib"] = None
  elif peak > peak_before or not peak_before:  # this configuration set the process's peak
    row["peak_gib"] = peak / 2 ** 30
  else:  # an earlier, larger configuration did: this one's peak is at most that
    row["peak_gib"], row["peak_gib_at_most"] = None, peak_before / 2 ** 30
  del state
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--runs", default="pallas:none:4,xla:full:4,pallas:full:4",
                 help="comma-separated attention_impl:remat_policy:batch_size")
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--layers", type=int, default=18)
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--steps", type=int, default=10, help="timed steps per run")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--loss-chunk", type=int, default=None,
                 help="positions per chunk of the split output-layer loss (0: whole logits; "
                      "default: the train config's 1024)")
  p.add_argument("--optimizer", action="store_true",
                 help="also time the optimizer update alone on each run's state (guarded, as "
                      "the step runs it, and plain optax), against its least traffic")
  p.add_argument("--matmul-size", type=int, default=8192, help="n of the n x n x n peak probe")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  args = p.parse_args(argv)
  runs = []
  for spec in args.runs.split(","):
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] not in ("xla", "pallas") or not parts[2].isdigit():
      p.error(f"--runs entry {spec!r} is invalid: expected impl:remat:batch, "
              "e.g. pallas:none:4 (impl xla or pallas)")
    runs.append((parts[0], parts[1], int(parts[2])))
  dev = jax.devices()[0]
  peaks = {"measured_matmul": matmul_peak(args.matmul_size)}
  for key, value in DATASHEET_PEAK.items():
    if key in dev.device_kind:
      peaks["datasheet"] = value
      break
  env = dict(device=dev.device_kind, jax=jax.__version__,
             peaks_tflops={k: v / 1e12 for k, v in peaks.items()}, argv=sys.argv)
  print(json.dumps(env), flush=True)
  rows = []
  for impl, remat, batch in runs:
    row = run_one(impl, remat, batch, args.seq, args.steps, args.warmup, args.layers,
                  args.hidden, args.heads, peaks, loss_chunk_size=args.loss_chunk,
                  optimizer_probe=args.optimizer)
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.out:
      Path(args.out).parent.mkdir(parents=True, exist_ok=True)
      Path(args.out).write_text(json.dumps(dict(env=env, rows=rows), indent=1))
  print("| attention | remat | batch x seq | step s | tokens/s | model TFLOP/s | MFU (datasheet) "
        "| MFU (measured matmul) | peak GiB |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "error" in r:
      print(f"| {r['attention_impl']} | {r['remat_policy']} | {r['batch']}x{r['seq']} | "
            f"failed: {r['error'][:80]} |")
      continue
    print(f"| {r['attention_impl']} | {r['remat_policy']} | {r['batch']}x{r['seq']} | "
          f"{r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['model_tflops']:.0f} | "
          f"{r.get('mfu_datasheet', float('nan')):.1%} | {r['mfu_measured_matmul']:.1%} | "
          f"{peak_text(r)} |")


if __name__ == "__main__":
  main()
