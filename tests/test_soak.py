"""Soak: 20 random faults (SIGKILL at random moments, flipped bytes, truncated files) over one
tiny run, which still ends bit-identical to an uninterrupted run (seeded; about a minute)."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from baichuan_jax import checkpoint as ckpt
from baichuan_jax.train import trainer
from tests import soak_helpers as helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = 20
KILLS = 5


def _steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    rows = [json.loads(l) for l in f if l.endswith("\n") and l.strip()]
  return max((r["step"] for r in rows), default=0)


def _committed(ckdir):
  if not os.path.isdir(ckdir):
    return []
  return sorted(int(n) for n in os.listdir(ckdir) if n.isdigit())


def _damage(rng, ckdir, step, kind):
  """Flips bytes in / truncates a random file of committed checkpoint `step` (its data files,
  orbax metadata and our meta/data JSON alike)."""
  folder = os.path.join(ckdir, str(step))
  files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns
           if n != ckpt.FILE_SIZES and os.path.getsize(os.path.join(r, n)) > 0]
  path = rng.choice(files)
  raw = bytearray(open(path, "rb").read())
  if kind == "flip":
    at = rng.randrange(len(raw))
    raw[at:at + 4] = bytes(b ^ 0xFF for b in raw[at:at + 4])
  else:
    raw = raw[:rng.randrange(len(raw))]
  open(path, "wb").write(bytes(raw))
  return os.path.relpath(path, ckdir)


def test_twenty_random_faults_end_bit_identical(tmp_path):
  rng = random.Random(22)
  cache = str(tmp_path / "xla")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  ref = trainer.run(helpers.config(), str(tmp_path / "ref"), data=helpers.Stream(),
                    progress=False)

  workdir = str(tmp_path / "run")
  ckdir = ckpt.checkpoint_dir(workdir)
  cmd = [sys.executable, os.path.join(ROOT, "tests", "soak_helpers.py"), workdir, cache]
  faults, damaged = [], set()
  t_start = time.time()
  # Each process start costs seconds (imports, loading the compiled step), so KILLS runs are
  # killed and the other faults are spread over them.
  for seg in range(KILLS):
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    start = _steps(workdir)
    quota = -(-(FAULTS - KILLS - len(faults) + seg) // (KILLS - seg))  # damage left / runs left
    # Kill at a random step of this run (or, one time in five, during start-up), a few
    # milliseconds after it is logged: mid-step, mid-save, mid-metrics-write alike.
    # Targets spread the kills over the rest of the run, so that every kill lands before the end.
    span = max(1, (helpers.TOTAL - 2 - start) // (KILLS - seg))
    target = None if rng.random() < 0.2 else min(start + rng.randint(1, span), helpers.TOTAL - 1)
    deadline = time.time() + (rng.uniform(0.5, 4.0) if target is None else 120)
    while proc.poll() is None and time.time() < deadline:
      if target is not None and _steps(workdir) >= target:
        time.sleep(rng.uniform(0, 0.02))
        break
      # Bit rot of the newest committed checkpoint while the run goes on (never the oldest:
      # something intact must remain to resume from).
      steps = _committed(ckdir)
      if len(steps) >= 2 and steps[-1] not in damaged and quota > 0 and rng.random() < 0.3:
        kind = rng.choice(["flip", "truncate"])
        faults.append((kind, _damage(rng, ckdir, steps[-1], kind)))
        damaged.add(steps[-1])
        quota -= 1
      time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    faults.append(("kill", f"at step {_steps(workdir)}"))
    # And while it is down, the newest checkpoint rots until the quota is used.
    steps = _committed(ckdir)
    while quota > 0 and len(steps) >= 2:
      kind = rng.choice(["flip", "truncate"])
      faults.append((kind, _damage(rng, ckdir, steps[-1], kind)))
      damaged.add(steps[-1])
      quota -= 1
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  elapsed = time.time() - t_start
  kinds = [k for k, _ in faults]
  assert len(faults) == FAULTS and kinds.count("kill") == KILLS, faults
  assert kinds.count("flip") and kinds.count("truncate"), faults

  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["final_step"] == helpers.TOTAL
  mgr = ckpt.CheckpointManager(ckdir)
  final = mgr.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                  sharding=x.sharding),
                                   ref.state))
  mgr.close()
  assert final.step == helpers.TOTAL
  bits = lambda t: [np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(t))]
  assert bits(final.state.params) == bits(ref.state.params)
  assert bits(final.state.opt_state) == bits(ref.state.opt_state)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  assert [r["loss"] for r in rows] == [r["loss"] for r in ref.history]
  print(f"soak: {len(faults)} faults ({', '.join(f'{k} {w}' for k, w in faults)}) in "
        f"{elapsed:.0f} s")
