"""The main job as a user runs it (`python -m experiments.train`, subprocesses on the built corpus):
the shortened default end to end, SIGKILL-and-resume bit identity, the dry run, bad flags."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from baichuan_jax import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/pretrain.py"


def _env(devices=None):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _cmd(workdir, *flags):
  return [sys.executable, "-m", "experiments.train", f"--config={CONFIG}", f"--workdir={workdir}",
          *flags]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


def _rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip() and l.endswith("\n")]


def test_default_main_job_end_to_end(tmp_path, cache):
  workdir = str(tmp_path / "run")
  out = subprocess.run(
      _cmd(workdir, "--config.train.total_steps=3", "--config.train.warmup_steps=1",
           "--config.train.batch_size=4", "--config.train.seq_len=64", "--config.eval_every=3",
           "--config.eval_batches=2", "--config.sample_tokens=8", "--config.peak_flops=1e11",
           f"--config.compilation_cache={cache}"),
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [0, 1, 2, 3]
  assert all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in rows[1:])
  for key in ("loss", "z_loss", "grad_norm", "lr", "tokens_per_s", "mfu", "total_skipped"):
    assert key in rows[-1]
  assert rows[-1]["tokens_per_s"] > 0 and rows[1]["tokens_per_s"] is None  # step 1 compiles
  # Validation loss at step 0 (untrained) and at the end; three steps at LR 3e-3 lower it.
  assert rows[3]["val_loss"] < rows[0]["val_loss"]
  assert "validation loss:" in out.stdout and "sample (greedy): 新年来临，" in out.stdout
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["final_step"] == 3 and summary["sample"].startswith("新年来临，")
  for name in ("loss_curve.png", "tensorboard"):
    assert os.path.exists(os.path.join(workdir, name))
  assert ckpt.CheckpointManager(ckpt.checkpoint_dir(workdir)).steps() == [3]


def test_sigkill_and_resume_is_bit_identical(tmp_path, cache):
  flags = ["--config.model.num_layers=2", "--config.model.dtype=float32",
           "--config.train.batch_size=8", "--config.train.seq_len=128",
           "--config.train.total_steps=12", "--config.train.warmup_steps=2",
           "--config.checkpoint.save_every=3", "--config.eval_every=0", "--config.sample_tokens=0",
           "--config.tensorboard=False", "--config.peak_flops=1e11",
           f"--config.compilation_cache={cache}"]
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  a = subprocess.run(_cmd(full, *flags), cwd=ROOT, env=_env(), capture_output=True, text=True,
                     timeout=600)
  assert a.returncode == 0, a.stderr[-3000:]

  proc = subprocess.Popen(_cmd(part, *flags), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if any(r["step"] >= 7 for r in _rows(part)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  killed_at = max(r["step"] for r in _rows(part))
  assert 7 <= killed_at < 12

  b = subprocess.run(_cmd(part, *flags), cwd=ROOT, env=_env(), capture_output=True, text=True,
                     timeout=600)
  assert b.returncode == 0, b.stderr[-3000:]
  summary = json.load(open(os.path.join(part, "summary.json")))
  assert summary["resumed_from"] in (3, 6) and summary["final_step"] == 12
  # Same losses step by step, and bit-identical final parameters.
  assert [r["loss"] for r in _rows(part)] == [r["loss"] for r in _rows(full)]
  pa, pb = ckpt.load_params(full), ckpt.load_params(part)
  import jax  # pylint: disable=import-outside-toplevel
  la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
  assert len(la) == len(lb) == 10  # tiny: embed, 2 norms, W_pack, o_proj, 3 mlp, norm, head
  assert all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def test_dry_run_prints_per_device_memory(tmp_path):
  out = subprocess.run(
      _cmd(str(tmp_path), "--config.dry_run=True", "--config.dry_run_devices=8",
           "--config.train.mesh.model=2", "--config.train.zero_stage=3",
           "--config.train.seq_len=64"),
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh data=4 x fsdp=1 x model=2 (8 devices); per device:" in out.stdout
  for line in ("params", "optimizer state", "activations/temps", "peak"):
    assert line in out.stdout
  assert not os.path.exists(tmp_path / "checkpoints")


def test_bad_flags_fail_fast_with_the_reason(tmp_path):
  out = subprocess.run(_cmd(str(tmp_path), "--config.train.mesh.model=3"), cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "model=3" in out.stderr and "does not divide the 1 devices" in out.stderr
  out = subprocess.run(_cmd(str(tmp_path), "--config.train.peak_lr=-1"), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "peak_lr=-1" in out.stderr
