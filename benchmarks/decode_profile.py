"""Where a CPU decode step's time goes: XLA ops of `generate`'s device loop, grouped by kind.

    python benchmarks/decode_profile.py --batch 16            # tiny shape, as benchmarks/decode.py

Runs `baichuan_jax.infer.generate` once to compile, then once under `jax.profiler.trace`, and sums
the XLA CPU op events of that run per op kind (the HLO name without its numeric suffix), divided by
the number of decode steps. Kinds are put in three groups: matmul (XNNPACK fusions and dots),
data movement (slices, dynamic-update-slices, copies, transposes, broadcasts) and the rest. The
tiny shape is the one `benchmarks/decode.py` compares with `transformers`.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax
import numpy as np

MATMUL = ("ynn_fusion", "dot", "xnn_fusion", "onednn")
MOVEMENT = ("slice", "copy", "transpose", "update-slice", "broadcast", "concatenate")
# Runtime and Python frames; and control-flow ops, whose time is that of their body ops (counted).
_NOT_OPS = re.compile(r"^\$|Thunk|Slinky|np\.asarray|Pjit|Execute|copy_to_host|^end: ")
CONTROL_FLOW = ("while", "conditional", "call")


def group_of(kind: str) -> str:
  if kind.startswith(MATMUL):
    return "matmul"
  if any(m in kind for m in MOVEMENT):
    return "data movement"
  return "other"


def op_times(trace_dir: str) -> collections.Counter:
  """Microseconds per XLA op kind in the perfetto trace under `trace_dir`."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
  with gzip.open(files[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kinds = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not _NOT_OPS.search(e["name"]):
      kind = re.sub(r"[.\d]+$", "", e["name"])
      if kind not in CONTROL_FLOW:
        kinds[kind] += e.get("dur", 0)
  return kinds


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--new-tokens", type=int, default=128)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--top", type=int, default=12, help="op kinds listed")
  p.add_argument("--no-split", action="store_true",
                 help="slice the stacked layer weights inside the loop, as models above "
                      "SPLIT_LAYERS_MAX_BYTES do, instead of copying them per layer first")
  args = p.parse_args(argv)
  if args.no_split:
    import importlib  # pylint: disable=import-outside-toplevel
    importlib.import_module("baichuan_jax.infer.generate").SPLIT_LAYERS_MAX_BYTES = 0
  from baichuan_jax import configs  # pylint: disable=import-outside-toplevel
  from baichuan_jax.infer import generate  # pylint: disable=import-outside-toplevel
  from baichuan_jax.model import init_params  # pylint: disable=import-outside-toplevel
  cfg = configs.get("tiny", num_layers=args.layers, dtype="float32", norm_head=False,
                    position_embedding="rope")
  params = jax.jit(functools.partial(init_params, cfg))(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
  run = lambda: generate(cfg, params, prompts, max_new_tokens=args.new_tokens,  # noqa: E731
                         stop_token_ids=[], decode_loop="device")
  run()  # compile
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      run()
    kinds = op_times(d)
  steps = args.new_tokens - 1  # the first token comes from the prefill
  per_step = {k: v / steps / 1000 for k, v in kinds.items()}
  groups = collections.Counter()
  for k, ms in per_step.items():
    groups[group_of(k)] += ms
  print(f"# jax {jax.__version__}, {jax.devices()[0].device_kind}, batch {args.batch}, "
        f"{args.layers} layers, prompt {args.prompt_len}, {args.new_tokens} new tokens"
        f"{', weights sliced per token' if args.no_split else ''}; "
        "ms per decode step (prefill included, spread over the steps)")
  print(f"total XLA op time: {sum(per_step.values()):.2f} ms/step")
  for g, ms in groups.most_common():
    print(f"  {g:<14} {ms:7.2f}")
  print("| op kind | group | ms / step |\n|---|---|---:|")
  for k, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"| {k} | {group_of(k)} | {ms:.3f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
