"""Two processes on localhost train as one: `jax.distributed.initialize` (gloo CPU collectives),
2 fake CPU devices per process, a hybrid mesh with data parallelism across the processes and
tensor parallelism inside each, ZeRO-3. Each process feeds only its rows of the global batch;
the losses and final parameters must equal a one-device run in this (pytest) process.

Running this file as a script is the worker side (`python tests/test_multihost.py --worker`);
pytest starts two of them.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

STEPS, BATCH, SEQ = 3, 8, 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _configs():
  from baichuan_jax import configs, train  # pylint: disable=import-outside-toplevel
  model_cfg = configs.get("tiny", num_layers=2, dtype="float32")
  tc = train.default_train_config()
  tc.batch_size, tc.seq_len = BATCH, SEQ
  tc.warmup_steps, tc.total_steps, tc.peak_lr = 1, 20, 1e-3
  tc.loss_chunk_size = 16
  return model_cfg, tc


def _batch(seed, vocab):
  """A global batch of packed rows (two documents and a padded tail per row)."""
  r = np.random.RandomState(seed)
  x = r.randint(3, vocab, (BATCH, SEQ + 1)).astype(np.int32)
  seg = np.ones((BATCH, SEQ), np.int32)
  pos = np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1))
  for i in range(BATCH):
    cut, end = r.randint(4, SEQ // 2), r.randint(SEQ // 2 + 2, SEQ + 1)
    seg[i, cut:], seg[i, end:] = 2, 0
    pos[i, cut:] -= cut
    pos[i, end:] = 0
  return {"inputs": x[:, :-1], "targets": x[:, 1:], "positions": pos, "segment_ids": seg,
          "loss_mask": (seg > 0).astype(np.int32)}


def _worker():
  """One process of the two-process job; prints `RESULT {json}` on its last line."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from baichuan_jax import distributed, sharding, train  # pylint: disable=import-outside-toplevel

  plan = distributed.initialize()  # everything from JAX_* environment variables
  smoke = distributed.check()  # the launch scripts' all-reduce smoke test
  model_cfg, tc = _configs()
  tc.zero_stage = 3
  tc.mesh.data, tc.mesh.model, tc.mesh.dcn_data = 2, 2, 2
  mesh = sharding.make_mesh(tc.mesh)
  # Tensor parallelism never leaves a process; the data axis spans the two processes.
  procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
  rows = sharding.host_batch_rows(mesh, BATCH)
  state = train.create_train_state(model_cfg, tc, mesh)
  step = train.make_train_step(model_cfg, tc, mesh)
  losses = []
  for i in range(STEPS):
    full = _batch(i, model_cfg.vocab_size)
    state, metrics = step(state, {k: v[rows] for k, v in full.items()})  # this process's rows
    losses.append(float(metrics["loss"]))
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    np.savez(os.environ["MULTIHOST_PARAMS"], *jax.tree.leaves(params))
  print("RESULT " + json.dumps({
      "source": plan.source, "process_index": jax.process_index(),
      "process_count": jax.process_count(), "devices": jax.device_count(),
      "local_devices": jax.local_device_count(), "mesh_processes": procs.tolist(),
      "rows": [rows.start, rows.stop], "losses": losses, "check": smoke}),
        flush=True)
  jax.distributed.shutdown()


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_workers(params_path, n=2):
  port = _free_port()
  procs = []
  for pid in range(n):
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
               JAX_PROCESS_ID=str(pid), MULTIHOST_PARAMS=str(params_path),
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    for var in ("SLURM_NTASKS", "SLURM_PROCID", "TPU_WORKER_HOSTNAMES", "BAICHUAN_CLUSTER"):
      env.pop(var, None)
    procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _collect(procs, timeout):
  results = []
  deadline = time.monotonic() + timeout
  for p in procs:
    try:
      out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError(f"worker did not finish in {timeout} s") from None
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"worker failed (rc {p.returncode}):\n{out[-4000:]}"
    results.append(json.loads(lines[-1][len("RESULT "):]))
  return results


def test_two_processes_match_one(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  from baichuan_jax import sharding, train  # pylint: disable=import-outside-toplevel

  params_path = tmp_path / "params.npz"
  procs = _start_workers(params_path)
  try:
    # The one-process reference runs meanwhile, on one device of this process.
    model_cfg, tc = _configs()
    tc.zero_stage, tc.mesh.data, tc.mesh.model = 0, 1, 1
    mesh = sharding.make_mesh(tc.mesh, jax.devices()[:1])
    state = train.create_train_state(model_cfg, tc, mesh)
    step = train.make_train_step(model_cfg, tc, mesh)
    want = []
    for i in range(STEPS):
      state, metrics = step(state, _batch(i, model_cfg.vocab_size))
      want.append(float(metrics["loss"]))
    want_params = jax.tree.leaves(jax.device_get(state.params))
  finally:
    results = _collect(procs, timeout=240)

  assert [r["process_index"] for r in results] == [0, 1]
  for r in results:
    assert r["source"] == "env" and r["process_count"] == 2
    assert r["devices"] == 4 and r["local_devices"] == 2
    # mesh [data=2, fsdp=1, model=2]: process p owns data row p, both of its model columns.
    assert r["mesh_processes"] == [[[0, 0]], [[1, 1]]]
    # One all-reduce over 4 devices of (process index + 1): 1 + 1 + 2 + 2.
    assert r["check"] == {"processes": 2, "devices": 4, "sum": 6.0, "expected": 6.0}
  assert [r["rows"] for r in results] == [[0, BATCH // 2], [BATCH // 2, BATCH]]
  # Both processes see the same (replicated) loss, equal to the one-device run.
  assert results[0]["losses"] == results[1]["losses"]
  np.testing.assert_allclose(results[0]["losses"], want, rtol=0, atol=1e-5)
  assert abs(want[-1] - want[0]) > 1e-3  # training moved the loss: the match is not trivial
  with np.load(params_path) as got:
    got_params = [got[f"arr_{i}"] for i in range(len(got.files))]
  assert len(got_params) == len(want_params)
  for a, b in zip(got_params, want_params):
    # Adam's 1/sqrt(v) amplifies fp32 reduction-order noise in rare embedding rows (see
    # test_train_step), so parameters get a looser bound than the losses.
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-4)


# ----------------------------------------------------------------------------------------------
# Where the process layout comes from (pure; no processes started).


def _resolve(cfg=None, **environ):
  from baichuan_jax import distributed  # pylint: disable=import-outside-toplevel
  return distributed.resolve(cfg, environ)


def test_resolve_single_process_without_cluster_env():
  plan = _resolve(HOME="/root")
  assert (plan.source, plan.num_processes, plan.process_id, plan.multi_process) == (
      "none", 1, 0, False)


def test_resolve_from_jax_environment_and_config_override():
  plan = _resolve(JAX_COORDINATOR_ADDRESS="10.1.2.3:1234", JAX_NUM_PROCESSES="4",
                  JAX_PROCESS_ID="3", JAX_LOCAL_DEVICE_IDS="0,1")
  assert plan == type(plan)("env", 4, 3, "10.1.2.3:1234", (0, 1))
  from baichuan_jax import distributed  # pylint: disable=import-outside-toplevel
  cfg = distributed.default_config()
  cfg.coordinator_address, cfg.num_processes, cfg.process_id = "host0:99", 2, 1
  plan = _resolve(cfg, JAX_COORDINATOR_ADDRESS="10.1.2.3:1234", JAX_NUM_PROCESSES="4")
  assert (plan.source, plan.coordinator_address, plan.num_processes, plan.process_id) == (
      "config", "host0:99", 2, 1)


def test_resolve_slurm_one_task_per_gpu_and_per_node():
  slurm = dict(SLURM_JOB_ID="12345", SLURM_NTASKS="16", SLURM_PROCID="9", SLURM_LOCALID="1",
               SLURM_STEP_NUM_NODES="2", SLURM_STEP_NODELIST="gpu[007-008]")
  plan = _resolve(**slurm)
  # JAX's SLURM convention for the port: 65535 - 4095 + job id mod 4096 = 61440 + 57.
  assert plan == type(plan)("slurm", 16, 9, "gpu007:61497", (1,))
  per_node = dict(slurm, SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="0")
  plan = _resolve(**per_node)
  assert (plan.num_processes, plan.process_id, plan.local_device_ids) == (2, 1, None)


def test_first_slurm_host():
  from baichuan_jax.distributed import first_slurm_host  # pylint: disable=import-outside-toplevel
  assert first_slurm_host("node001") == "node001"
  assert first_slurm_host("a12,b[1-3]") == "a12"
  assert first_slurm_host("gpu[010,007-009],cpu1") == "gpu010"
  assert first_slurm_host("dgx-a100-[01-16]") == "dgx-a100-01"


def test_resolve_tpu_is_left_to_jax_detection():
  plan = _resolve(TPU_WORKER_HOSTNAMES="t1v-0,t1v-1,t1v-2,t1v-3", TPU_WORKER_ID="2")
  assert (plan.source, plan.coordinator_address, plan.multi_process) == ("tpu", None, True)
  assert _resolve(TPU_WORKER_HOSTNAMES="localhost").source == "none"  # a single-host TPU VM
  assert _resolve(BAICHUAN_CLUSTER="tpu").source == "tpu"


def test_resolve_rejects_bad_values_with_their_names():
  import pytest  # pylint: disable=import-outside-toplevel
  cases = [
      (dict(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="2"),
       r"process_id=2 is invalid for num_processes=2: must be in \[0, 2\)"),
      (dict(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="two", JAX_PROCESS_ID="0"),
       r"JAX_NUM_PROCESSES='two' is invalid: must be an integer >= 1"),
      (dict(JAX_COORDINATOR_ADDRESS="hostonly", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0"),
       r"coordinator address 'hostonly' is invalid: expected host:port"),
      (dict(JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0"), r"JAX_COORDINATOR_ADDRESS .* is not set"),
      (dict(SLURM_NTASKS="4", SLURM_PROCID="0"), r"SLURM_STEP_NODELIST / SLURM_JOB_NODELIST"),
      (dict(BAICHUAN_CLUSTER="k8s"), r"distributed.cluster='k8s' is invalid"),
  ]
  for environ, msg in cases:
    with pytest.raises(ValueError, match=msg):
      _resolve(**environ)


if __name__ == "__main__" and "--worker" in sys.argv:
  _worker()
