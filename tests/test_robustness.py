"""No silent corruption: non-finite configs and updates, the workdir lock, save failures, rollback
counting, one-line checkpoint errors, absurd HF configs, undecodable data input."""

import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from baichuan_jax import configs, sharding, train
from baichuan_jax.train import config as train_config
from baichuan_jax.train import step as step_lib

INF, NAN = float("inf"), float("nan")


# ----------------------------------------------------------------------------------------------
# 1. Every config number finite; the step guard checks the update itself.


@pytest.mark.parametrize("field,value", [("init_std", INF), ("rope_theta", NAN),
                                         ("z_loss_weight", INF), ("rms_norm_eps", NAN)])
def test_model_config_rejects_non_finite_by_name(field, value):
  with pytest.raises(ValueError, match=f"config.{field}={value} is invalid: must be a finite"):
    configs.get("tiny", **{field: value})


def test_model_config_type_errors_name_the_field():
  with pytest.raises(ValueError, match="config.hidden_size='256' is invalid: must be of type int"):
    configs.get("tiny", hidden_size="256")
  with pytest.raises(ValueError, match="config.eos_id=4096 is invalid: must be < vocab_size=4096"):
    configs.get("tiny", eos_id=4096)


@pytest.mark.parametrize("field,value", [("peak_lr", INF), ("peak_lr", NAN), ("eps", INF),
                                         ("weight_decay", INF), ("grad_clip", INF),
                                         ("min_lr_ratio", NAN), ("betas", (0.9, NAN))])
def test_train_config_rejects_non_finite_by_name(field, value):
  tc = train_config.default_train_config()
  tc[field] = value
  with pytest.raises(ValueError, match=f"train config {field}=.* is invalid"):
    train_config.validate_train_config(tc)


def _tiny_state():
  cfg = configs.get("tiny", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2,
                    intermediate_size=64, vocab_size=64, max_seq_len=16, dtype="float32")
  tc = train_config.default_train_config()
  tc.batch_size, tc.seq_len, tc.warmup_steps, tc.total_steps, tc.loss_chunk_size = 2, 8, 0, 10, 0
  tc.zero_stage = 0
  mesh = sharding.make_mesh(tc.mesh, jax.devices()[:1])
  return cfg, tc, train.create_train_state(cfg, tc, mesh)


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(tree))]


def test_guard_skips_a_non_finite_update_with_finite_loss_and_gradient():
  _, _, state = _tiny_state()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
  metrics = {"loss": jnp.float32(1.0)}
  sched = lambda _: jnp.float32(INF)  # noqa: E731
  # lr = inf: the gradient and loss are finite, the update is -inf * g -> params -inf.
  new, m = step_lib.guarded_update(state, grads, metrics, state.rng, optax.sgd(INF), sched)
  assert float(m["skipped"]) == 1 and int(new.skipped) == 1 and int(new.consecutive_bad) == 1
  assert math.isfinite(float(m["grad_norm"]))
  assert _bits(new.params) == _bits(state.params)
  # The same with a finite lr applies the update.
  ok, m = step_lib.guarded_update(state, grads, metrics, state.rng, optax.sgd(0.5), sched)
  assert float(m["skipped"]) == 0
  leaf = jax.tree.leaves(state.params)[0]
  assert np.allclose(np.asarray(jax.tree.leaves(ok.params)[0]), np.asarray(leaf) - 0.5e-3)


@pytest.mark.parametrize("case", ["good", "lr inf", "nan gradient", "param overflow"])
def test_both_guard_forms_give_the_same_bits(monkeypatch, case):
  # GUARD_RECOMPUTE (check first, then recompute the update with the select inside it) against
  # the select over the written-out update: the same new state, bit for bit, jitted as the step
  # runs it, on a good step (AdamW from the train config) and on three kinds of bad one.
  cfg, tc, state = _tiny_state()
  opt, sched = train.make_optimizer(tc), train.lr_schedule(tc)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)
  if case == "lr inf":
    opt = optax.sgd(INF)
  elif case == "nan gradient":
    leaf = jax.tree.leaves(grads)[1]
    grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan) if g is leaf else g, grads)
  elif case == "param overflow":
    # finite loss, gradient norm and lr, but one parameter leaves the fp32 range (1 + 1e30 *
    # 1e9): only the check of the new state catches it
    opt = optax.sgd(1e30)
    state = state.replace(opt_state=opt.init(state.params))
    leaf = jax.tree.leaves(grads)[2]
    grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(-1e9) if g is leaf else g, grads)
  metrics = {"loss": jnp.float32(1.0)}
  runs = {}
  for recompute in (False, True):
    monkeypatch.setattr(step_lib, "GUARD_RECOMPUTE", recompute)
    fn = jax.jit(lambda s, g: step_lib.guarded_update(s, g, metrics, s.rng, opt, sched))
    runs[recompute] = fn(state, grads)
    text = fn.lower(state, grads).as_text()
    assert ("optimization_barrier" in text) == recompute
  (a, ma), (b, mb) = runs[False], runs[True]
  assert _bits(a) == _bits(b)
  assert _bits(ma) == _bits(mb)
  assert float(ma["skipped"]) == (0.0 if case == "good" else 1.0)
  assert math.isfinite(float(ma["grad_norm"])) == (case != "nan gradient")
  if case != "good":
    assert _bits(a.params) == _bits(state.params) and _bits(a.opt_state) == _bits(state.opt_state)
  else:
    assert _bits(a.params) != _bits(state.params)


def test_the_recompute_guard_writes_what_plain_optax_writes():
  # benchmarks/optimizer_guard.py on a small stacked state: the compiled recompute form writes
  # as many parameter-sized arrays as plain optax (each new param and moment once, plus what
  # plain optax itself writes); the select form writes the update out before selecting it
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
  import optimizer_guard
  result = optimizer_guard.run(layers=2, hidden=64, iters=1)
  writes = {name.split()[0]: r["param_sized_writes"] for name, r in result["programs"].items()}
  assert writes["recompute"] == writes["plain"] < writes["select"]
  assert writes["plain"] >= 9  # 3 weights x (param, mu, nu)
  assert result["guarded_forms_same_bits"] is True
  # the comparison is of bits, on the device: NaN equals itself, -0.0 differs from 0.0
  import gpu_train_mfu
  tree = {"w": jnp.asarray([1.0, jnp.nan]), "count": jnp.asarray([3], jnp.int32)}
  assert gpu_train_mfu.same_bits(tree, dict(tree))
  assert not gpu_train_mfu.same_bits(tree, dict(tree, w=jnp.asarray([1.0, 2.0])))
  assert not gpu_train_mfu.same_bits({"w": jnp.zeros(2)}, {"w": -jnp.zeros(2)})
  assert not gpu_train_mfu.same_bits(tree, {"w": tree["w"]})
  assert result["parameters"] == 3 * 2 * 64 * 64 + 64
  with pytest.raises(ValueError, match="--layers 0 / --hidden 64 are invalid"):
    optimizer_guard.run(layers=0, hidden=64, iters=1)


def test_update_finite_checks_params_and_every_moment():
  params = {"a": jnp.ones((3,)), "b": jnp.ones((2, 2)), "n": jnp.ones((2,), jnp.int32)}
  opt = optax.adam(1e-3)
  state = opt.init(params)
  assert bool(step_lib.update_finite(params, state))
  for where in ("params", "mu", "nu"):
    bad_p, bad_s = params, state
    if where == "params":
      bad_p = dict(params, b=params["b"].at[1, 0].set(jnp.inf))
    else:
      adam = state[0]
      tree = getattr(adam, where)
      tree = dict(tree, a=tree["a"].at[2].set(jnp.nan))
      bad_s = (adam._replace(**{where: tree}),) + tuple(state[1:])
    assert not bool(step_lib.update_finite(bad_p, bad_s)), where
  # a lone array (its treedef matches every leaf): checked leaf by leaf
  assert not bool(step_lib.update_finite(jnp.ones(2), (jnp.asarray([1.0, jnp.nan]),)))


# ----------------------------------------------------------------------------------------------
# 2. One writer per workdir.

import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from baichuan_jax import checkpoint as ckpt  # noqa: E402
from baichuan_jax import workdir_lock  # noqa: E402

HOLD = """
import sys, time
from baichuan_jax import workdir_lock
workdir_lock.acquire(sys.argv[1], "train")
print("held", flush=True)
time.sleep(600)
"""


def _holder(workdir):
  """A separate process holding the workdir lock (as a running trainer does)."""
  proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_a_second_writer_is_refused_naming_the_holder_then_a_dead_holder_is_taken_over(tmp_path):
  proc = _holder(tmp_path)
  try:
    t0 = time.time()
    with pytest.raises(workdir_lock.WorkdirLocked,
                       match=rf"in use by train run pid {proc.pid} on host {socket.gethostname()}"):
      workdir_lock.acquire(tmp_path, "sft")
    assert time.time() - t0 < 1  # at once, no waiting
    assert workdir_lock.held_by_other(tmp_path)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  # kill -9 leaves the file (naming the dead pid); the kernel dropped the flock: taken over.
  assert workdir_lock.read_holder(tmp_path)["pid"] == proc.pid
  assert not workdir_lock.held_by_other(tmp_path)
  with workdir_lock.hold(tmp_path, "sft") as lock:
    assert workdir_lock.read_holder(tmp_path)["pid"] == os.getpid()
    with workdir_lock.hold(tmp_path, "nested"):  # re-entrant in one process
      pass
    assert workdir_lock.held_here(tmp_path) and lock.depth == 1
  assert not workdir_lock.held_here(tmp_path)


def test_a_lock_kept_only_by_an_orphan_of_a_dead_pid_is_taken_over(tmp_path):
  # A live process holds the flock but the file names a pid of this host that has exited
  # (a forked child that outlived its killed parent): the file is replaced and taken.
  proc = _holder(tmp_path)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  path = workdir_lock.lock_path(tmp_path)
  with open(path, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": dead.pid, "purpose": "train",
               "since": time.time()}, f)
  try:
    with workdir_lock.hold(tmp_path, "train"):
      assert workdir_lock.read_holder(tmp_path)["pid"] == os.getpid()
  finally:
    proc.kill()
    proc.wait()


def test_trainer_refuses_a_locked_workdir_and_tmp_cleanup_spares_live_runs(tmp_path):
  from experiments.configs import pretrain  # pylint: disable=import-outside-toplevel
  from baichuan_jax.train import trainer  # pylint: disable=import-outside-toplevel
  ckdir = tmp_path / "checkpoints"
  inflight = ckdir / "5.orbax-checkpoint-tmp"
  inflight.mkdir(parents=True)
  proc = _holder(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirLocked, match=f"pid {proc.pid}"):
      trainer.run(pretrain.get_config("tiny"), str(tmp_path), data=object())
    assert not (tmp_path / "metrics.jsonl").exists()
    # Another process opening the checkpoints of a live run leaves its in-flight save alone.
    ckpt.CheckpointManager(str(ckdir)).close()
    assert inflight.exists()
  finally:
    proc.kill()
    proc.wait()
  # The run is dead: its leftover is garbage and goes at the next start-up.
  ckpt.CheckpointManager(str(ckdir)).close()
  assert not inflight.exists()


def test_alignment_and_research_runs_take_the_workdir_lock(tmp_path):
  from baichuan_jax.align import recipes, sentiment  # pylint: disable=import-outside-toplevel
  from baichuan_jax.research import ablation, scaling  # pylint: disable=import-outside-toplevel
  proc = _holder(tmp_path)
  try:
    for fn, args in ((recipes.run_sft, (None,)), (sentiment.run, (None,)),
                     (ablation.run_ablation, (None,)), (scaling.run_scaling, (None,))):
      with pytest.raises(workdir_lock.WorkdirLocked, match=f"pid {proc.pid}"):
        fn(*args, workdir=str(tmp_path), **({"stages": ["all"]} if fn is sentiment.run else {}))
  finally:
    proc.kill()
    proc.wait()


# ----------------------------------------------------------------------------------------------
# 6. HF configs checked against the files before anything is allocated.

import tracemalloc  # noqa: E402

from baichuan_jax import hf, hf_config_check  # noqa: E402
from baichuan_jax.model import init_params  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  cfg = configs.get("tiny", num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=2,
                    intermediate_size=128, vocab_size=256, max_seq_len=64)
  params = jax.device_get(init_params(cfg, jax.random.PRNGKey(0)))
  path = tmp_path_factory.mktemp("hf") / "ckpt"
  hf.save(cfg, params, path, shard_size=40_000)  # several shards + model.safetensors.index.json
  assert (path / "model.safetensors.index.json").exists()
  return path


def _copy_with(src, dst, **changes):
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(src, dst)
  conf = json.loads((dst / "config.json").read_text())
  conf.update(changes)
  (dst / "config.json").write_text(json.dumps(conf))
  return dst


@pytest.mark.parametrize("changes,message", [
    ({"num_hidden_layers": 10 ** 7},
     r"num_hidden_layers=10000000 is invalid: the checkpoint's tensors hold layers 0..1"),
    ({"num_hidden_layers": 3}, r"num_hidden_layers=3 is invalid"),
    ({"max_position_embeddings": 10 ** 15}, r"max_position_embeddings=1000000000000000 is invalid"),
    ({"hidden_size": "256"}, r"hidden_size='256' is invalid: must be an integer"),
    ({"rms_norm_eps": float("inf")}, r"rms_norm_eps=inf is invalid: must be a finite number"),
    ({"intermediate_size": 4096}, r"intermediate_size, hidden_size\) = \(4096, 64\) but "
     r"model.layers.0.mlp.gate_proj.weight has shape \[128, 64\]"),
])
def test_absurd_hf_configs_fail_fast_naming_file_and_field(hf_dir, tmp_path, changes, message):
  bad = _copy_with(hf_dir, tmp_path / "bad", **changes)
  tracemalloc.start()
  t0 = time.time()
  try:
    with pytest.raises(ValueError, match=message) as err:
      hf.load(bad)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert str(bad / "config.json") in str(err.value)
  assert time.time() - t0 < 5 and peak < 20 << 20  # bounded: no allocation from the claims


def test_index_paths_are_confined_to_the_checkpoint_folder(hf_dir, tmp_path):
  for shard in ("../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"):
    bad = _copy_with(hf_dir, tmp_path / f"bad{abs(hash(shard))}")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = shard
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"points outside the checkpoint folder"):
      hf.load(bad)
  # A symlinked shard that leads out of the folder is refused as well.
  bad = _copy_with(hf_dir, tmp_path / "link")
  index = json.loads((bad / "model.safetensors.index.json").read_text())
  name = sorted(set(index["weight_map"].values()))[0]
  outside = tmp_path / "elsewhere.safetensors"
  (bad / name).rename(outside)
  (bad / name).symlink_to(outside)
  with pytest.raises(ValueError, match=r"points outside the checkpoint folder"):
    hf_config_check.check_checkpoint(bad, json.loads((bad / "config.json").read_text()))


def test_a_valid_hf_checkpoint_still_loads(hf_dir):
  cfg, params = hf.load(hf_dir)
  assert cfg.num_layers == 2 and params["layers"]["mlp"]["gate_proj"]["kernel"].shape[0] == 2


# ----------------------------------------------------------------------------------------------
# 7. Undecodable data input names the file and the line.


def test_invalid_utf8_names_file_line_and_column(tmp_path):
  from baichuan_jax.data import corpus, tokenizer  # pylint: disable=import-outside-toplevel
  txt = tmp_path / "notes.txt"
  txt.write_bytes("第一行\nsecond line\nthird \xff line\n".encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
  with pytest.raises(ValueError, match=rf"{txt}:3: invalid UTF-8 at column 7 \(byte 0xff"):
    list(tokenizer.read_texts([txt]))
  jl = tmp_path / "train.jsonl"
  jl.write_bytes(b'{"text": "ok"}\n{"text": "bad \xe4\xb8 here"}\n')
  with pytest.raises(ValueError, match=rf"{jl}:2: invalid UTF-8 at column 15"):
    list(tokenizer.read_texts([jl]))
  with pytest.raises(ValueError, match=rf"{jl}:2: invalid UTF-8"):
    list(corpus.read_jsonl(jl))  # what the tokenized-dataset builder reads documents with


def test_two_trainers_on_one_workdir_the_second_exits_at_once(tmp_path):
  # The failure as it was seen: two real trainers started on one workdir.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir, cache = str(tmp_path / "run"), str(tmp_path / "xla")
  cmd = [sys.executable, os.path.join(root, "tests", "soak_helpers.py"), workdir, cache]
  # The first run reads a batch every 0.5 s, so it is still training when the second starts.
  first = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, env=dict(os.environ, SOAK_BATCH_SECONDS="0.5"))
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 120
  while not (os.path.exists(metrics) and os.path.getsize(metrics)) and time.time() < deadline:
    assert first.poll() is None, first.stderr.read()[-3000:]
    time.sleep(0.05)
  second = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
  assert first.poll() is None, "the first run ended before the second one started"
  assert second.returncode != 0
  assert f"is in use by train run pid {first.pid} on host {socket.gethostname()}" in second.stderr
  assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
  with open(metrics) as f:
    steps = [json.loads(l)["step"] for l in f]
  from tests import soak_helpers  # pylint: disable=import-outside-toplevel
  assert steps == list(range(1, soak_helpers.TOTAL + 1))  # one history, no step twice
