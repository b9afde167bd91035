"""`python -m baichuan_jax.summary PRESET [...]`: parameters, FLOPs and memory of model presets."""

from __future__ import annotations

import argparse
import sys

from baichuan_jax import configs


def _gb(n: float) -> str:
  return f"{n / 1e9:,.2f} GB"


def table(name: str, seq_len: int | None = None) -> str:
  """The summary table of one preset as text."""
  cfg = configs.get(name)
  c = configs.param_counts(cfg)
  f = configs.flops_per_token(cfg, seq_len)
  b = configs.param_bytes(cfg)
  seq = seq_len or cfg.max_seq_len
  rows = [
      ("layers x hidden x heads", f"{cfg.num_layers} x {cfg.hidden_size} x {cfg.num_heads}"),
      ("FFN / vocab", f"{cfg.intermediate_size} / {cfg.vocab_size:,}"),
      ("positions / head", f"{cfg.position_embedding} / {'NormHead' if cfg.norm_head else 'plain'}"),
      ("params: embedding", f"{c['embedding']:,}"),
      ("params: attention", f"{c['attention']:,}"),
      ("params: mlp", f"{c['mlp']:,}"),
      ("params: norms", f"{c['norms']:,}"),
      ("params: head", f"{c['head']:,}"),
      ("params: total", f"{c['total']:,}"),
      (f"train FLOPs/token @ seq {seq}", f"{f['total']:.4g} (6N {f['dense']:.4g} + attn {f['attention']:.4g})"),
      ("params in bf16", _gb(b["bf16"])),
      ("params in fp32", _gb(b["fp32"])),
      ("fp32 params + AdamW m, v", _gb(b["fp32_adamw_train_state"])),
  ]
  w = max(len(k) for k, _ in rows)
  lines = [f"== {name} ==" ] + [f"{k:<{w}}  {v}" for k, v in rows]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m baichuan_jax.summary",
      description="Print exact parameter counts, training FLOPs per token and parameter memory "
                  "for Baichuan presets.")
  p.add_argument("presets", nargs="*", default=None,
                 help=f"preset names (default: all). Choices: {', '.join(configs.names())}")
  p.add_argument("--seq-len", type=int, default=None,
                 help="sequence length for the attention FLOPs term (default: preset max_seq_len)")
  args = p.parse_args(argv)
  names = args.presets or configs.names()
  for name in names:
    if name not in configs.names():
      p.error(f"unknown preset {name!r}; choose from {', '.join(configs.names())}")
  print("\n\n".join(table(n, args.seq_len) for n in names))
  return 0


if __name__ == "__main__":
  sys.exit(main())
