"""The training loop on a synthetic loader: config errors before compiling, NaN skip, roll back past
bad batches, resume past a corrupted checkpoint (bit-identical), SIGTERM saves and resumes."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baichuan_jax import checkpoint as ckpt
from baichuan_jax import configs, sharding, train
from baichuan_jax.train import trainer
from experiments.configs import pretrain

MODEL = dict(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=2, intermediate_size=128,
             vocab_size=256, max_seq_len=32, dtype="float32")
BATCH, SEQ = 4, 16


def _cfg(total=10, **kw):
  c = pretrain.get_config("tiny")
  c.model = configs.get("tiny", **MODEL)
  c.data.vocab_size = 256
  t = c.train
  t.batch_size, t.seq_len, t.total_steps, t.warmup_steps, t.peak_lr = BATCH, SEQ, total, 2, 3e-3
  c.num_devices, c.peak_flops, c.tensorboard, c.compilation_cache = 1, 1e11, False, ""
  c.eval_every, c.eval_batches, c.sample_tokens = 0, 2, 0
  c.checkpoint.async_save = False
  for k, v in kw.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _batch(index: int) -> dict:
  r = np.random.RandomState(index)
  x = r.randint(3, MODEL["vocab_size"], (BATCH, SEQ + 1)).astype(np.int32)
  return {"inputs": x[:, :-1], "targets": x[:, 1:],
          "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
          "segment_ids": np.ones((BATCH, SEQ), np.int32), "loss_mask": np.ones((BATCH, SEQ), np.int32)}


POISON = 0  # inputs[0, 0] == pad id marks a batch whose loss (and gradient) is made non-finite


class Synthetic:
  """A DataSource: batch i of the stream is `_batch(order(i))`; optional poison and SIGTERM."""
  tokenizer_path = None

  def __init__(self, order=lambda i: i, poison=(), sigterm_at=None):
    self.order, self.poison, self.sigterm_at = order, set(poison), sigterm_at

  def train(self, process_index, process_count):
    assert (process_index, process_count) == (0, 1)
    return _Iter(self)

  def validation(self, process_index, process_count):
    return [_batch(10_000 + i) for i in range(2)]


class _Iter:
  def __init__(self, src):
    self.src, self.i = src, 0

  def __iter__(self):
    return self

  def __next__(self):
    i = self.i
    self.i += 1
    if self.src.sigterm_at == i:
      os.kill(os.getpid(), signal.SIGTERM)
    b = _batch(self.src.order(i))
    if i in self.src.poison:
      b["inputs"][0, 0] = POISON
    return b

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def _poison_loss(cfg):
  base = train.lm_loss_fn(cfg.model, cfg.train)

  def loss_fn(params, batch, rng):
    loss, m = base(params, batch, rng)
    loss = loss * jnp.where(jnp.any(batch["inputs"][:, 0] == POISON), jnp.inf, 1.0)
    return loss, dict(m, loss=loss)

  return loss_fn


@pytest.fixture(autouse=True, scope="module")
def _compilation_cache(tmp_path_factory):
  """Every run re-jits the same step: a persistent cache turns the repeats into cache hits."""
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.parametrize("field,value,message", [
    ("eval_batches", 0, "eval_batches=0"),
    ("data.vocab_size", 512, "data.vocab_size=512 .*model.vocab_size=256"),
    ("train.mesh.data", 3, "mesh data=3 .* 1 are available"),
    ("train.seq_len", 64, "seq_len=64"),
    ("checkpoint.keep_last", 0, "checkpoint.keep_last=0"),
])
def test_bad_config_fails_before_compiling(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    trainer.run(_cfg(**{field: value}), str(tmp_path), data=Synthetic())
  assert not os.path.exists(tmp_path / "checkpoints")


def test_mesh_errors_name_the_cause(tmp_path):
  with pytest.raises(ValueError, match="num_heads=2 is not divisible by mesh.model=4"):
    trainer.run(_cfg(num_devices=8, **{"train.mesh.model": 4}), str(tmp_path), data=Synthetic())
  with pytest.raises(ValueError, match="batch_size=4 .* not divisible by the data-parallel size"):
    trainer.run(_cfg(num_devices=8), str(tmp_path), data=Synthetic())


def test_nan_step_leaves_params_and_optimizer_state_unchanged():
  cfg = _cfg()
  mesh = sharding.make_mesh(cfg.train.mesh, jax.devices()[:1])
  state = train.create_train_state(cfg.model, cfg.train, mesh)
  step = train.make_train_step(cfg.model, cfg.train, mesh, loss_fn=_poison_loss(cfg), donate=False)
  # Two good steps (the first runs at warm-up LR 0), then a poisoned one.
  good, m1 = step(step(state, _batch(0))[0], _batch(3))
  bad_batch = _batch(1)
  bad_batch["inputs"][0, 0] = POISON
  bad, m2 = step(good, bad_batch)
  assert float(m1["skipped"]) == 0 and float(m2["skipped"]) == 1
  assert not np.isfinite(float(m2["loss"]))
  assert _bits(bad.params) == _bits(good.params) and _bits(bad.opt_state) == _bits(good.opt_state)
  assert _bits(good.params) != _bits(state.params)
  assert int(bad.step) == 3 and int(bad.skipped) == 1 and int(bad.consecutive_bad) == 1
  # The next good step updates again and resets the bad-step run.
  again, _ = step(bad, _batch(2))
  assert int(again.consecutive_bad) == 0 and _bits(again.params) != _bits(bad.params)


def test_rollback_restores_checkpoint_and_skips_the_bad_batches(tmp_path):
  # Batches 4 and 5 are poisoned: steps 5 and 6 are skipped, and with max_bad_steps=2 the loop
  # rolls back to checkpoint 3 and continues with batch 6. Expected final state: a clean run on
  # batches 0, 1, 2, 6, 7, ... (the update of step 4 on batch 3 was discarded with the rollback).
  cfg = _cfg(total=9, **{"train.max_bad_steps": 2, "checkpoint.save_every": 3})
  res = trainer.run(cfg, str(tmp_path / "a"), data=Synthetic(poison=(4, 5)),
                    loss_fn=_poison_loss(cfg), progress=False)
  assert res.rollbacks == 1
  assert [r["step"] for r in res.history] == list(range(1, 10))
  assert all(r["skipped"] == 0 for r in res.history)
  ref = trainer.run(cfg, str(tmp_path / "b"), data=Synthetic(order=lambda i: i if i < 3 else i + 3),
                    loss_fn=_poison_loss(cfg), progress=False)
  assert ref.rollbacks == 0
  assert _bits(res.state.params) == _bits(ref.state.params)
  assert _bits(res.state.opt_state) == _bits(ref.state.opt_state)
  # Poison every batch from 4 on: rollbacks cannot help, and the run stops with an error.
  cfg.max_rollbacks = 1
  with pytest.raises(RuntimeError, match="after 1 rollbacks"):
    trainer.run(cfg, str(tmp_path / "c"), data=Synthetic(poison=range(4, 100)),
                loss_fn=_poison_loss(cfg), progress=False)


def _flip_middle(path):
  raw = bytearray(open(path, "rb").read())
  mid = len(raw) // 2
  raw[mid:mid + 4] = bytes(b ^ 0xFF for b in raw[mid:mid + 4])
  open(path, "wb").write(bytes(raw))


def test_corrupted_checkpoint_is_skipped_and_resume_is_exact(tmp_path):
  cfg = _cfg(total=8, **{"checkpoint.save_every": 2, "checkpoint.keep_last": 3})
  full = trainer.run(cfg, str(tmp_path / "full"), data=Synthetic(), progress=False)
  assert full.resumed_from is None

  # The same run preempted after step 6 (same schedule), then its newest checkpoint damaged.
  part = str(tmp_path / "part")
  assert trainer.run(cfg, part, data=Synthetic(sigterm_at=6), progress=False).preempted
  step6 = os.path.join(ckpt.checkpoint_dir(part), "6", "params")
  files = [os.path.join(r, n) for r, _, ns in os.walk(step6) for n in ns]
  _flip_middle(max(files, key=os.path.getsize))

  res = trainer.run(cfg, part, data=Synthetic(), progress=False)
  assert res.resumed_from == 4
  assert [s for s, _ in res.rejected_checkpoints] == [6]
  assert os.listdir(os.path.join(ckpt.checkpoint_dir(part), "rejected"))[0].startswith("6-")
  assert [r["step"] for r in res.history] == list(range(1, 9))
  assert _bits(res.state.params) == _bits(full.state.params)
  assert _bits(res.state.opt_state) == _bits(full.state.opt_state)
  assert [r["loss"] for r in res.history] == [r["loss"] for r in full.history]


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
  cfg = _cfg(total=8, **{"checkpoint.save_every": 100, "eval_every": 4})
  workdir = str(tmp_path)
  # SIGTERM arrives while batch 4 is read, i.e. during step 4.
  res = trainer.run(cfg, workdir, data=Synthetic(sigterm_at=4), progress=False)
  assert res.preempted and int(res.state.step) == 4
  mgr = ckpt.CheckpointManager(ckpt.checkpoint_dir(workdir))
  assert mgr.steps() == [4]
  mgr.close()
  assert signal.getsignal(signal.SIGTERM) is not None  # the handler was put back
  res2 = trainer.run(cfg, workdir, data=Synthetic(), progress=False)
  assert res2.resumed_from == 4 and not res2.preempted and int(res2.state.step) == 8
  assert [r["step"] for r in res2.history] == list(range(0, 9))
  assert [e["step"] for e in res2.evals] == [0, 4, 8]
  assert os.path.exists(os.path.join(workdir, "loss_curve.png"))


# ----------------------------------------------------------------------------------------------
# Robustness: nothing non-finite passes for a good run, saves fail loudly, separate spikes.


def test_inf_learning_rate_is_rejected_before_anything_runs(tmp_path):
  with pytest.raises(ValueError, match="peak_lr=inf is invalid: must be a finite number"):
    trainer.run(_cfg(**{"train.peak_lr": float("inf")}), str(tmp_path), data=Synthetic())
  assert not os.path.exists(tmp_path / "checkpoints")


def test_non_finite_params_are_never_saved(tmp_path, monkeypatch):
  # The step's guard keeps params finite; this checks the last line of defence behind it by
  # making the step itself return NaN params after step 4.
  make = trainer.step_lib.make_train_step

  def poisoned(*args, **kwargs):
    step = make(*args, **kwargs)

    def call(state, batch):
      state, m = step(state, batch)
      if int(state.step) >= 5:
        state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
      return state, m

    return call

  monkeypatch.setattr(trainer.step_lib, "make_train_step", poisoned)
  cfg = _cfg(total=8, **{"checkpoint.save_every": 3})
  with pytest.raises(trainer.TrainingStopped,
                     match=r"step 6: refusing to save non-finite .*last good checkpoint is step 3"):
    trainer.run(cfg, str(tmp_path), data=Synthetic(), progress=False)
  params = ckpt.load_params(str(tmp_path))
  assert ckpt.CheckpointManager(ckpt.checkpoint_dir(str(tmp_path))).steps() == [3]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_four_separate_spikes_each_cured_by_one_rollback(tmp_path):
  # Stream batches 4-5, 12-13, 20-21, 28-29 are poisoned; max_bad_steps=2, so each pair causes a
  # rollback. With max_rollbacks=3 a count that never resets stops at the 4th spike (what the
  # run used to do); separated by >= rollback_reset_steps healthy steps, every spike is cured.
  poison = [4, 5, 12, 13, 20, 21, 28, 29]
  cfg = _cfg(total=24, **{"train.max_bad_steps": 2, "checkpoint.save_every": 3,
                          "max_rollbacks": 3, "rollback_reset_steps": 3})
  res = trainer.run(cfg, str(tmp_path / "a"), data=Synthetic(poison=poison),
                    loss_fn=_poison_loss(cfg), progress=False)
  assert res.rollbacks == 4 and int(res.state.step) == 24
  assert [r["step"] for r in res.history] == list(range(1, 25))
  assert all(r["skipped"] == 0 for r in res.history)
  # The same spikes with a reset longer than the gaps: consecutive, so the 4th one stops the run.
  cfg.rollback_reset_steps = 100
  with pytest.raises(trainer.TrainingStopped, match="again after 3 rollbacks"):
    trainer.run(cfg, str(tmp_path / "b"), data=Synthetic(poison=poison),
                loss_fn=_poison_loss(cfg), progress=False)


def _fail_saves(monkeypatch, fail_steps):
  """Orbax saves of the steps in `fail_steps` raise ENOSPC (an injected write error)."""
  import errno  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  real = ocp.CheckpointManager.save
  calls = []

  def save(self, step, *args, **kwargs):
    calls.append(step)
    if fail_steps(step, calls):
      raise OSError(errno.ENOSPC, "No space left on device",
                    os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp", "params"))
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  return calls


def test_a_failed_save_is_reported_and_retried(tmp_path, monkeypatch, caplog):
  cfg = _cfg(total=9, **{"checkpoint.save_every": 3, "checkpoint.retry_backoff_s": 0.01})
  ref = trainer.run(cfg, str(tmp_path / "ref"), data=Synthetic(), progress=False)
  calls = _fail_saves(monkeypatch, lambda step, calls: step == 6 and calls.count(6) == 1)
  with caplog.at_level("ERROR"):
    res = trainer.run(cfg, str(tmp_path / "run"), data=Synthetic(), progress=False)
  assert calls == [3, 6, 6, 9]
  line = [r.getMessage() for r in caplog.records if "checkpoint step 6" in r.getMessage()][0]
  assert "No space left on device" in line and "6.orbax-checkpoint-tmp" in line
  assert "previous checkpoint: 3" in line and "\n" not in line
  mgr = ckpt.CheckpointManager(ckpt.checkpoint_dir(str(tmp_path / "run")))
  assert mgr.steps() == [6, 9]
  mgr.close()
  assert _bits(res.state.params) == _bits(ref.state.params)
  assert "No space left on device" in open(tmp_path / "run" / ckpt.ERROR_LOG).read()


def test_saves_that_keep_failing_stop_the_run_naming_the_safe_step(tmp_path, monkeypatch):
  _fail_saves(monkeypatch, lambda step, calls: step > 3)
  cfg = _cfg(total=9, **{"checkpoint.save_every": 3, "checkpoint.retry_backoff_s": 0.01,
                         "checkpoint.save_retries": 2})
  with pytest.raises(trainer.TrainingStopped,
                     match=r"No space left on device.*2 retries failed: stopping; the last good "
                     r"checkpoint is step 3"):
    trainer.run(cfg, str(tmp_path), data=Synthetic(), progress=False)
  mgr = ckpt.CheckpointManager(ckpt.checkpoint_dir(str(tmp_path)))
  assert mgr.steps() == [3]  # intact and restorable
  mgr.close()
  assert int(ckpt.load_params(str(tmp_path))["norm"]["weight"].shape[0]) == MODEL["hidden_size"]


def test_free_space_is_checked_before_each_save(tmp_path, monkeypatch):
  import collections  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  real = shutil.disk_usage
  usage = collections.namedtuple("usage", "total used free")
  state = {"full": False}

  def disk_usage(path):
    u = real(path)
    return usage(u.total, u.used, 1000) if state["full"] else u

  monkeypatch.setattr(shutil, "disk_usage", disk_usage)
  mgr = ckpt.CheckpointManager(str(tmp_path / "c"), async_save=False)
  s = {"params": {"w": jnp.ones((64, 64))}, "step": jnp.zeros((), jnp.int32)}
  mgr.save(1, s)
  mgr.wait()
  state["full"] = True
  with pytest.raises(ckpt.CheckpointSaveError, match=r"step 2: not enough free space .* 1,000 "
                     r"bytes free.*No space left on device \(previous checkpoint: 1\)"):
    mgr.save(2, s)
  assert mgr.steps() == [1]
  mgr.close()


def test_the_command_line_ends_with_one_line_naming_the_safe_step(tmp_path, monkeypatch, capsys):
  def stopped(cfg, workdir):
    raise trainer.TrainingStopped("checkpoint step 6: writing X failed: No space left on device; "
                                  "the last good checkpoint is step 3 in X")

  monkeypatch.setattr(trainer, "setup_runtime", lambda cfg: None)
  monkeypatch.setattr(trainer, "run", stopped)
  assert trainer.main(_cfg(), str(tmp_path)) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("stopped: checkpoint step 6") and "last good checkpoint is step 3" in err[-1]
