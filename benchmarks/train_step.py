"""Training throughput and MFU: our jitted train step vs `transformers.LlamaForCausalLM` in torch.

Both sides train the same-shaped decoder (Baichuan-7B is the LLaMA architecture: RoPE, SwiGLU,
RMSNorm, untied head) on the same random batches with AdamW (betas 0.9/0.95, eps 1e-8, weight
decay 0.1, clip 0.5), fp32, on this machine, in one run. Our side is
`train.make_train_step` (one `jax.jit`: forward, backward, clip, AdamW, non-finite check);
torch's is eager `LlamaForCausalLM` + `torch.optim.AdamW` (`--torch-compile` tries
`torch.compile`). Steps alternate between the two (round robin) so that load from other
programs on a shared machine hits both alike; the median step time is reported.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs from `configs.flops_per_token`
(6 x matmul parameters + attention, no causal halving: the PaLM/MaxText convention) and the
peak MEASURED on this machine as the best of large fp32 matmuls in XLA and in torch.

    python benchmarks/train_step.py                          # tiny preset, batch 8 x 256
    python benchmarks/train_step.py --preset small --batch 4 --seq 512 --steps 5
    python benchmarks/train_step.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from baichuan_jax import configs, sharding, train


def matmul_peak(n: int, repeats: int) -> dict[str, float]:
  """Best fp32 FLOP/s of an [n, n] x [n, n] matmul in XLA and in torch (2 n^3 FLOPs each)."""
  import torch  # pylint: disable=import-outside-toplevel
  flops = 2.0 * n ** 3
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  mm(a, b).block_until_ready()
  best_jax = min(_timed(lambda: mm(a, b).block_until_ready()) for _ in range(repeats))
  ta, tb = torch.randn(n, n), torch.randn(n, n)
  torch.matmul(ta, tb)
  best_torch = min(_timed(lambda: torch.matmul(ta, tb)) for _ in range(repeats))
  return {"jax": flops / best_jax, "torch": flops / best_torch,
          "peak": flops / min(best_jax, best_torch)}


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def make_batches(cfg, batch: int, seq: int, n: int, seed: int = 0) -> list[dict]:
  """`n` loader-contract batches of random tokens (one document per row, no padding)."""
  r = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    x = r.randint(3, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    ones = np.ones((batch, seq), np.int32)
    out.append({"inputs": x[:, :-1], "targets": x[:, 1:],
                "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
                "segment_ids": ones, "loss_mask": ones})
  return out


class JaxSide:
  """Our train step on one device (fp32 master weights and compute)."""

  def __init__(self, cfg, batch: int, seq: int, loss_chunk: int):
    tc = train.default_train_config()
    tc.batch_size, tc.seq_len, tc.zero_stage = batch, seq, 0
    tc.warmup_steps, tc.total_steps, tc.peak_lr = 10, 1000, 1e-4
    tc.loss_chunk_size = loss_chunk
    tc.mesh.data, tc.mesh.model = 1, 1
    self.mesh = sharding.make_mesh(tc.mesh, jax.devices()[:1])
    self.state = train.create_train_state(cfg, tc, self.mesh)
    self.step_fn = train.make_train_step(cfg, tc, self.mesh)
    self.loss = float("nan")

  def compile(self, batch: dict) -> float:
    t0 = time.perf_counter()
    self.step(batch)
    return time.perf_counter() - t0

  def step(self, batch: dict) -> None:
    self.state, metrics = self.step_fn(self.state, batch)
    self.loss = float(metrics["loss"])  # blocks until the step is done


class TorchSide:
  """`transformers.LlamaForCausalLM` of the same shape, AdamW, clip 0.5, fp32."""

  def __init__(self, cfg, compile_model: bool):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    self.torch = torch
    torch.manual_seed(0)
    lcfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, hidden_act="silu")
    lcfg._attn_implementation = "sdpa"  # pylint: disable=protected-access
    self.model = transformers.LlamaForCausalLM(lcfg).train()
    self.params = sum(p.numel() for p in self.model.parameters())
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                                 weight_decay=0.1)
    self.forward = torch.compile(self.model) if compile_model else self.model
    self.loss = float("nan")

  def compile(self, batch: dict) -> float:
    t0 = time.perf_counter()
    self.step(batch)
    return time.perf_counter() - t0

  def step(self, batch: dict) -> None:
    torch = self.torch
    inputs = torch.from_numpy(batch["inputs"]).long()
    targets = torch.from_numpy(batch["targets"]).long()
    logits = self.forward(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.5)
    self.opt.step()
    self.loss = float(loss.detach())


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", default="tiny", choices=configs.names(), help="model shape")
  p.add_argument("--num-layers", type=int, default=None, help="override the preset's layers")
  p.add_argument("--batch", type=int, default=8, help="sequences per step")
  p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
  p.add_argument("--steps", type=int, default=8, help="timed steps per side (after 1 warm-up)")
  p.add_argument("--loss-chunk", type=int, default=0,
                 help="our split-loss chunk (train config loss_chunk_size); 0 = whole logits, "
                      "the faster choice when the logits fit")
  p.add_argument("--remat", default="none", help="our remat policy (torch does not remat)")
  p.add_argument("--matmul-n", type=int, default=2048, help="size of the peak-FLOP/s matmul")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  p.add_argument("--torch-compile", action="store_true", help="torch.compile the torch model")
  p.add_argument("--skip-torch", action="store_true", help="time only our step")
  p.add_argument("--json", help="also write the results to this JSON file")
  args = p.parse_args(argv)

  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  over = dict(dtype="float32", param_dtype="float32", norm_head=False, z_loss_weight=0.0,
              position_embedding="rope", remat_policy=args.remat, attention_impl="xla")
  if args.num_layers:
    over["num_layers"] = args.num_layers
  cfg = configs.get(args.preset, **over)
  if args.seq > cfg.max_seq_len:
    p.error(f"--seq={args.seq} exceeds the preset's max_seq_len={cfg.max_seq_len}")
  tokens = args.batch * args.seq
  flops_tok = configs.flops_per_token(cfg, args.seq)["total"]
  dev = jax.devices()[0]
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load avg {os.getloadavg()[0]:.1f}; jax {jax.__version__} ({dev.platform}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}")
  print(f"# {args.preset}: {configs.param_counts(cfg)['total']:,} params, {cfg.num_layers} "
        f"layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; batch {args.batch} x "
        f"{args.seq} = {tokens} tokens/step; {flops_tok / 1e6:.1f} MFLOP/token", flush=True)

  peak = matmul_peak(args.matmul_n, repeats=5)
  print(f"# measured fp32 matmul peak ({args.matmul_n}^3): XLA {peak['jax'] / 1e9:.1f}, torch "
        f"{peak['torch'] / 1e9:.1f} GFLOP/s -> peak {peak['peak'] / 1e9:.1f} GFLOP/s", flush=True)

  batches = make_batches(cfg, args.batch, args.seq, args.steps + 1)
  sides = {"baichuan-jax": JaxSide(cfg, args.batch, args.seq, args.loss_chunk)}
  if not args.skip_torch:
    sides["torch LlamaForCausalLM"] = TorchSide(cfg, args.torch_compile)
    ours = configs.param_counts(cfg)["total"]
    if sides["torch LlamaForCausalLM"].params != ours:
      raise SystemExit(f"shape mismatch: torch model has {sides['torch LlamaForCausalLM'].params:,}"
                       f" parameters, ours {ours:,}")
  warm = {name: side.compile(batches[0]) for name, side in sides.items()}
  times = {name: [] for name in sides}
  for i in range(args.steps):  # round robin: contention hits both sides alike
    for name, side in sides.items():
      times[name].append(_timed(lambda s=side, b=batches[i + 1]: s.step(b)))

  results = {}
  print("\n| implementation | first step (compile) | median step | tokens/s | model TFLOP/s | "
        "MFU | loss after |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for name, side in sides.items():
    med = statistics.median(times[name])
    tps = tokens / med
    achieved = tps * flops_tok
    results[name] = {"first_step_s": warm[name], "median_step_s": med, "step_times": times[name],
                     "tokens_per_s": tps, "flops_per_s": achieved, "mfu": achieved / peak["peak"],
                     "final_loss": side.loss}
    print(f"| {name} | {warm[name]:.2f} s | {med * 1e3:.0f} ms | {tps:,.0f} | "
          f"{achieved / 1e12:.3f} | {100 * achieved / peak['peak']:.1f}% | {side.loss:.3f} |")
  if len(results) == 2:
    a, b = results.values()
    print(f"\nspeed-up of baichuan-jax over torch: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x")
  print(f"# load avg after: {os.getloadavg()[0]:.1f}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as fh:
      json.dump({"args": vars(args), "peak": peak, "flops_per_token": flops_tok,
                 "tokens_per_step": tokens, "results": results, "jax": jax.__version__,
                 "torch": torch.__version__, "transformers": transformers.__version__}, fh,
                indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
