"""The start and the end of a profiled training step, kernel by kernel, from its GPU trace.

benchmarks/gpu_suite.py buckets the step's device time by kernel name (`trace_top_ops`). This
reads the same trace in launch order instead, for the two parts the buckets mix into the rest:

- the head: every kernel before the first flash-attention kernel (the first layer's). Reported
  as its total and the `loop_broadcast_fusion` share (zero-initialised buffers);
- the optimizer: every kernel after the step's last backward matmul or Pallas kernel, split into
  the gradient norm (reductions before the first update fusion), the AdamW update (loop add
  fusions over 100 us: the big elementwise passes that write the new state), the finiteness
  reductions (reductions after the first update fusion), the guard's selects (`loop_select`
  fusions) and other small kernels.

The split is by kernel name and position, so it fits the step XLA builds for the ~1B model
(train.step.guarded_update after the layer scan); a step built otherwise needs a fresh look.

  python benchmarks/trace_phases.py docs/results/gpu_suite_h200_train_trace.json.gz --steps 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

BACKWARD_END = re.compile(r"^(nvjet|gemm_fusion|baichuan_)")  # a matmul or a Pallas kernel
UPDATE_MIN_US = 100.0


def device_spans(path) -> list:
  """The device's kernel spans ("ph": "X" on a GPU process), in launch order."""
  path = Path(path)
  try:
    with gzip.open(path) as f:
      trace = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"{path}: no such file (gpu_suite.py writes $OUT/train_trace.json.gz)")
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a gzipped JSON trace ({e})") from None
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  gpus = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
          and "GPU" in e.get("args", {}).get("name", "")}
  if not gpus:
    raise ValueError(f"{path}: no GPU device process in the trace (a CPU run has no kernels)")
  return sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in gpus),
                key=lambda e: e["ts"])


def step_phases(spans: list) -> dict:
  """ms of one step's head and optimizer parts (see the module docstring)."""
  names = [e["name"] for e in spans]
  flash = [i for i, n in enumerate(names) if n.startswith("baichuan_flash")]
  if not flash:
    raise ValueError("no flash-attention kernel in the step: not a pallas training step")
  head = spans[:flash[0]]
  end = max(i for i, n in enumerate(names) if BACKWARD_END.search(n))
  opt = spans[end + 1:]
  ms = lambda es: sum(e["dur"] for e in es) / 1e3  # noqa: E731
  updates = [i for i, e in enumerate(opt)
             if e["name"].startswith("loop_add_fusion") and e["dur"] > UPDATE_MIN_US]
  first = updates[0] if updates else len(opt)
  parts = {"gradient norm": [e for e in opt[:first] if e["name"].startswith("input_reduce")],
           "AdamW update": [opt[i] for i in updates],
           "finiteness reductions": [e for e in opt[first:]
                                     if e["name"].startswith("input_reduce")],
           "guard selects": [e for e in opt if e["name"].startswith("loop_select")]}
  counted = {id(e) for es in parts.values() for e in es}
  parts["other"] = [e for e in opt if id(e) not in counted]
  return dict(head_ms=ms(head),
              head_broadcast_ms=ms([e for e in head if "broadcast" in e["name"]]),
              optimizer_ms=ms(opt), optimizer_parts_ms={k: ms(v) for k, v in parts.items()})


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("trace", help="a train_trace.json.gz from benchmarks/gpu_suite.py")
  p.add_argument("--steps", type=int, default=2, help="steps in the trace (the suite traces 2)")
  args = p.parse_args(argv)
  try:
    spans = device_spans(args.trace)
    if args.steps < 1 or len(spans) % args.steps:
      raise ValueError(f"--steps {args.steps} is invalid: the trace's {len(spans)} kernels do "
                       "not split into that many equal steps")
    per = len(spans) // args.steps
    steps = [step_phases(spans[i * per:(i + 1) * per]) for i in range(args.steps)]
  except ValueError as e:
    p.error(str(e))
  for i, r in enumerate(steps):
    parts = ", ".join(f"{k} {v:.2f}" for k, v in r["optimizer_parts_ms"].items())
    print(f"step {i}: head {r['head_ms']:.2f} ms ({r['head_broadcast_ms']:.2f} broadcasts); "
          f"optimizer {r['optimizer_ms']:.2f} ms: {parts}")
  return steps


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
