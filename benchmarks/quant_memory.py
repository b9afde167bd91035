"""Parameter memory of the 13B presets in bf16 / int8 / int4, from abstract shapes (no weights).

    python benchmarks/quant_memory.py [--group-size 128] [--presets baichuan-13b baichuan2-13b]

Shapes come from `jax.eval_shape(init_params)` and `jax.eval_shape(quant.quantize_params)`, so
nothing is allocated. Linear layers (W_pack, o_proj, gate/up/down) are quantized; the embedding
and output head stay bf16 ("int8"/"int4"), or are quantized too ("int8 all"/"int4 all": int8 per
vocabulary row, int4 in groups). int8 stores one fp32 scale per output channel; int4 packs two
values per byte with one fp16 scale per `--group-size` inputs and output channel.

The Baichuan 2 report's 13B numbers (bf16 / int8 / int4: 26.0 / 15.8 / 9.7 GB) are GPU memory of
the loaded model; they are printed beside ours in GiB (2^30 bytes), which is how 13.9 B bf16
parameters come to 26.0.
"""

from __future__ import annotations

import argparse
import sys

from baichuan_jax import configs
from baichuan_jax.infer import quant

PUBLISHED_GB = {"bf16": 26.0, "int8": 15.8, "int4": 9.7}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--presets", nargs="+", default=["baichuan-13b", "baichuan2-13b"],
                 choices=configs.names())
  p.add_argument("--group-size", type=int, default=quant.DEFAULT_GROUP_SIZE)
  args = p.parse_args(argv)
  rows = quant.memory_table(tuple(args.presets), args.group_size)
  gib = lambda b: b / 2**30
  print(f"int4 group size {args.group_size}; GiB = 2^30 bytes\n")
  print("| preset | params | bf16 GiB | int8 GiB | int4 GiB | int8 all GiB | int4 all GiB |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    n = configs.param_counts(configs.get(r["preset"]))["total"]
    print(f"| {r['preset']} | {n / 1e9:.2f} B | {gib(r['bf16']):.2f} | {gib(r['int8']):.2f} | "
          f"{gib(r['int4']):.2f} | {gib(r['int8_all']):.2f} | {gib(r['int4_all']):.2f} |")
  print(f"| published Baichuan2-13B | | {PUBLISHED_GB['bf16']} | {PUBLISHED_GB['int8']} | "
        f"{PUBLISHED_GB['int4']} | | |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
