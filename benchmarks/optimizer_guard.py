"""The NaN/inf guard's two forms against plain optax: the optimizer update alone, on one device.

`train.step.guarded_update` keeps every bit of the old state on a non-finite step. It has two
forms (`train.step.GUARD_RECOMPUTE`): the select over the written-out update (False), or a
check pass followed by the update computed again with the select inside it (True). This script
times both against plain optax (the same chain: `train.make_optimizer`) on a synthetic fp32
state of `--layers` stacked [hidden, hidden] weights x 3, the layout of the model's scanned
layers. It also reports how many parameter-sized arrays each compiled program writes, and
whether the two guarded forms give the same bits.

  JAX_PLATFORMS=cpu python benchmarks/optimizer_guard.py --layers 16
  python benchmarks/optimizer_guard.py --layers 96 --out /tmp/guard.json   # a GPU

On a GPU this elementwise work is memory-bound: fewer written arrays should mean less time. On
a CPU it is compute-bound: the recompute form evaluates the AdamW formula twice. The GPU suite
(benchmarks/gpu_suite.py, train section) times the same two forms on the ~1B step's own state.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baichuan_jax.train import step as step_lib  # noqa: E402
from baichuan_jax.train import optim  # noqa: E402
from baichuan_jax.train.config import default_train_config  # noqa: E402
import gpu_train_mfu  # noqa: E402  (benchmarks/gpu_train_mfu.py)


def programs(tcfg):
  """{name: jitted fn(state, grads)}: the two guarded forms and plain optax
  (`gpu_train_mfu.optimizer_programs`, as the GPU suite times them)."""
  select, plain = gpu_train_mfu.optimizer_programs(tcfg, recompute=False)
  recompute, _ = gpu_train_mfu.optimizer_programs(tcfg, recompute=True)
  return {"select (GUARD_RECOMPUTE=False)": select,
          "recompute (GUARD_RECOMPUTE=True)": recompute, "plain optax": plain}


def param_sized_outputs(compiled_text: str, shape: tuple) -> int:
  """How many arrays of `shape` (fp32) the entry computation's fusions write."""
  entry = compiled_text[compiled_text.index("ENTRY"):]
  big = f"f32[{','.join(map(str, shape))}]"
  single = len(re.findall(re.escape(big) + r"[^ ]* fusion\(", entry))
  multi = sum(m.count(big) for m in re.findall(r"= \(([^)]*)\) fusion\(", entry))
  return single + multi


def run(layers: int, hidden: int, iters: int) -> dict:
  if layers < 1 or hidden < 8:
    raise ValueError(f"--layers {layers} / --hidden {hidden} are invalid: need >= 1 and >= 8")
  tcfg = default_train_config()
  opt = optim.make_optimizer(tcfg)
  shape = (layers, hidden, hidden)
  params = {"layers": {f"w{i}": jnp.full(shape, 0.01, jnp.float32) for i in range(3)},
            "final_norm": {"scale": jnp.ones((hidden,), jnp.float32)}}
  state = step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=opt.init(params),
                              rng=jax.random.key(0), skipped=jnp.int32(0),
                              consecutive_bad=jnp.int32(0))
  grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)
  progs = programs(tcfg)
  rows, outs = {}, {}
  for name, fn in progs.items():
    rows[name] = dict(param_sized_writes=param_sized_outputs(
        fn.lower(state, grads).compile().as_text(), shape))
    outs[name] = jax.block_until_ready(fn(state, grads))  # compile + warm up
  times = {name: [] for name in progs}
  for _ in range(iters):  # interleaved, so drift hits every program alike
    for name, fn in progs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state, grads))
      times[name].append(time.perf_counter() - t0)
  for name in progs:
    rows[name]["ms"] = float(np.median(times[name]) * 1e3)
  a, b = (outs[n] for n in list(progs)[:2])
  same = gpu_train_mfu.same_bits((a.params, a.opt_state), (b.params, b.opt_state))
  return dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
              jax=jax.__version__, parameters=3 * layers * hidden * hidden + hidden,
              iters=iters, programs=rows, guarded_forms_same_bits=same,
              command=" ".join(["python", "benchmarks/optimizer_guard.py"] + sys.argv[1:]))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--layers", type=int, default=16, help="stacked layers (default 16)")
  p.add_argument("--hidden", type=int, default=1024, help="weight side (default 1024)")
  p.add_argument("--iters", type=int, default=7, help="timed updates per program (median)")
  p.add_argument("--out", help="also write the result as JSON here")
  args = p.parse_args(argv)
  try:
    result = run(args.layers, args.hidden, args.iters)
  except ValueError as e:
    p.error(str(e))
  print(f"{result['device']} ({result['backend']}), jax {result['jax']}, "
        f"{result['parameters']:,} fp32 parameters")
  for name, r in result["programs"].items():
    print(f"  {name:34s} {r['ms']:9.1f} ms   writes {r['param_sized_writes']} param-sized arrays")
  print(f"  the two guarded forms give the same bits: {result['guarded_forms_same_bits']}")
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
