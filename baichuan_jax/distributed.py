"""Multi-host start-up: `jax.distributed.initialize` from config or environment.

Every process of a multi-host job runs the same program; before touching a device each calls
`initialize(cfg)`. Where the coordinator, process count and process id come from, in order:

1. `cfg` fields (`coordinator_address`, `num_processes`, `process_id`, `local_device_ids`), e.g.
   `--config.distributed.coordinator_address=10.0.0.2:8476` on the command line;
2. the environment `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`,
   `JAX_LOCAL_DEVICE_IDS` (any launcher: torchrun-like wrappers, Kubernetes, a shell loop);
3. SLURM (`srun`): `SLURM_NTASKS`, `SLURM_PROCID`, the first host of `SLURM_STEP_NODELIST`
   (or `SLURM_JOB_NODELIST`) as coordinator, a port derived from the job id; with several
   tasks per node each task owns one GPU (`SLURM_LOCALID`);
4. Cloud TPU VMs: `TPU_WORKER_HOSTNAMES` with more than one host, `MEGASCALE_COORDINATOR_ADDRESS`
   (multislice) or `BAICHUAN_CLUSTER=tpu`; JAX reads the rest from the TPU metadata server;
5. otherwise one process: nothing to initialise.

`cfg.cluster` (or `BAICHUAN_CLUSTER`) forces one source: "auto" (the order above), "none",
"env", "slurm" or "tpu". `resolve` is a pure function of (cfg, environ) so the detection is
testable without a cluster; `initialize` acts on its result.

On CPU, cross-process collectives need an implementation: `cpu_collectives` ("gloo" by
default) is set before initialising, which is how the two-process localhost test runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional

import jax
import ml_collections

CLUSTERS = ("auto", "none", "env", "slurm", "tpu")


def default_config() -> ml_collections.ConfigDict:
  """Distributed start-up fields (all optional; empty / -1 means "detect")."""
  c = ml_collections.ConfigDict()
  # Where to read the process layout from: auto | none | env | slurm | tpu (see module doc).
  c.cluster = "auto"
  # host:port of process 0's coordination service ("" = from the environment).
  c.coordinator_address = ""
  # Processes in the job (0 = from the environment).
  c.num_processes = 0
  # This process's rank in [0, num_processes) (-1 = from the environment).
  c.process_id = -1
  # Comma-separated local accelerator ids this process drives ("" = all it sees).
  c.local_device_ids = ""
  # Coordinator port used when it is derived (SLURM); 0 = 61440 + job id mod 4096, as JAX does.
  c.port = 0
  # Seconds to wait for every process to reach the coordinator.
  c.initialization_timeout = 300
  # Cross-process collectives on CPU devices ("gloo"; "" leaves JAX's default: none).
  c.cpu_collectives = "gloo"
  return c


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` will do (or did): the detected layout of this process."""
  source: str  # "none" (single process), "config", "env", "slurm" or "tpu"
  num_processes: int  # 0 when JAX detects it (TPU)
  process_id: int  # -1 when JAX detects it (TPU)
  coordinator_address: Optional[str] = None  # None when JAX detects it (TPU)
  local_device_ids: Optional[tuple[int, ...]] = None

  @property
  def multi_process(self) -> bool:
    return self.source != "none"


def _get(cfg: Any, name: str, default: Any) -> Any:
  if cfg is None:
    return default
  value = cfg.get(name, default) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else getattr(
      cfg, name, default)
  return default if value is None else value


def _int(value: Any, field: str, minimum: int) -> int:
  try:
    out = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{field}={value!r} is invalid: must be an integer >= {minimum}") from None
  if out < minimum or isinstance(value, bool) or (isinstance(value, float) and out != value):
    raise ValueError(f"{field}={value!r} is invalid: must be an integer >= {minimum}")
  return out


def _device_ids(value: Any, field: str) -> Optional[tuple[int, ...]]:
  if value in (None, "", ()):
    return None
  if isinstance(value, int) and not isinstance(value, bool):
    return (value,)
  parts = value.split(",") if isinstance(value, str) else list(value)
  try:
    return tuple(int(p) for p in parts)
  except (TypeError, ValueError):
    raise ValueError(f"{field}={value!r} is invalid: must be comma-separated integers, "
                     "e.g. '0,1'") from None


def first_slurm_host(nodelist: str) -> str:
  """First host name of a SLURM node list: 'gpu[007-010,012],cpu1' -> 'gpu007'.

  Args:
    nodelist: `SLURM_STEP_NODELIST` / `SLURM_JOB_NODELIST` value.
  Returns:
    The first host, zero padding kept.
  Raises:
    ValueError: for an empty or malformed list.
  """
  m = re.match(r"\s*([^,\[\s]+)(\[([^\]]+)\])?", nodelist or "")
  if not m:
    raise ValueError(f"SLURM node list {nodelist!r} is empty or malformed")
  prefix, ranges = m.group(1), m.group(3)
  if ranges is None:
    return prefix
  first = ranges.split(",")[0].split("-")[0].strip()
  if not first.isdigit():
    raise ValueError(f"SLURM node list {nodelist!r}: range {ranges!r} does not start with a number")
  return prefix + first


def _pick_cluster(cluster: str, environ: Mapping[str, str]) -> str:
  if cluster != "auto":
    return cluster
  if "JAX_COORDINATOR_ADDRESS" in environ or "JAX_NUM_PROCESSES" in environ:
    return "env"
  if int(environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS", "1")) or 1) > 1:
    return "slurm"
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return "none"


def resolve(cfg: Any = None, environ: Optional[Mapping[str, str]] = None) -> Plan:
  """Works out this process's place in the job from `cfg` and the environment; pure.

  Args:
    cfg: a `default_config()`-like ConfigDict / mapping (None: all defaults).
    environ: environment mapping (default `os.environ`).
  Returns:
    A `Plan`. Explicit `cfg` fields override whatever the environment says.
  Raises:
    ValueError: naming the field or variable when a value is missing or malformed, or the
      process id does not fit the process count.
  """
  environ = os.environ if environ is None else environ
  cluster = str(_get(cfg, "cluster", "auto") or "auto")
  if cluster == "auto":
    cluster = environ.get("BAICHUAN_CLUSTER", "auto") or "auto"
  if cluster not in CLUSTERS:
    raise ValueError(f"distributed.cluster={cluster!r} is invalid: allowed {CLUSTERS}")
  addr = _get(cfg, "coordinator_address", "") or None
  nproc = _int(_get(cfg, "num_processes", 0), "distributed.num_processes", 0)
  pid = _int(_get(cfg, "process_id", -1), "distributed.process_id", -1)
  local = _device_ids(_get(cfg, "local_device_ids", ""), "distributed.local_device_ids")
  explicit = addr is not None and nproc > 0 and pid >= 0
  source = "config" if explicit and cluster in ("auto", "env") else _pick_cluster(cluster, environ)
  if source == "none":
    if addr or nproc > 1:
      raise ValueError("distributed.coordinator_address, num_processes and process_id must all "
                       f"be set for a multi-process run (got {addr!r}, {nproc}, {pid})")
    return Plan("none", 1, 0)
  if source == "tpu":
    # The TPU runtime knows the slice topology; JAX asks the metadata server for the rest.
    return Plan("tpu", nproc, pid, addr, local)
  if source == "env":
    addr = addr or environ.get("JAX_COORDINATOR_ADDRESS")
    if nproc == 0:
      nproc = _int(environ.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES", 1)
    if pid < 0:
      pid = _int(environ.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID", 0)
    local = local or _device_ids(environ.get("JAX_LOCAL_DEVICE_IDS", ""), "JAX_LOCAL_DEVICE_IDS")
    if not addr:
      raise ValueError("JAX_COORDINATOR_ADDRESS (or distributed.coordinator_address) is not set")
  elif source == "slurm":
    if nproc == 0:
      nproc = _int(environ.get("SLURM_NTASKS", environ.get("SLURM_NPROCS")), "SLURM_NTASKS", 1)
    if pid < 0:
      pid = _int(environ.get("SLURM_PROCID"), "SLURM_PROCID", 0)
    if addr is None:
      nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
      if not nodes:
        raise ValueError("SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is not set: launch with srun")
      port = _int(_get(cfg, "port", 0), "distributed.port", 0)
      if port == 0:
        job = _int(environ.get("SLURM_JOB_ID"), "SLURM_JOB_ID", 0)
        port = 65535 - 4095 + job % 4096  # the ephemeral range JAX's own SLURM support uses
      addr = f"{first_slurm_host(nodes)}:{port}"
    nnodes = int(environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_NNODES", "1")) or 1)
    if local is None and nproc > nnodes and "SLURM_LOCALID" in environ:
      # More tasks than nodes: one task per GPU, the task's local rank picks its GPU.
      local = (_int(environ["SLURM_LOCALID"], "SLURM_LOCALID", 0),)
  if ":" not in addr:
    raise ValueError(f"coordinator address {addr!r} is invalid: expected host:port")
  if not 0 <= pid < nproc:
    raise ValueError(f"process_id={pid} is invalid for num_processes={nproc}: "
                     f"must be in [0, {nproc})")
  return Plan(source, nproc, pid, addr, local)


def initialize(cfg: Any = None, environ: Optional[Mapping[str, str]] = None) -> Plan:
  """Resolves the layout and calls `jax.distributed.initialize` when there is more than one process.

  Call before anything touches a device (creating arrays, `jax.devices()`).

  Args:
    cfg: `default_config()`-like (None: detect everything from the environment).
    environ: environment mapping (default `os.environ`).
  Returns:
    The `Plan` acted on. After it `jax.process_count()` equals `plan.num_processes`.
  Raises:
    RuntimeError: if JAX came up with a different process count than planned.
  """
  plan = resolve(cfg, environ)
  if not plan.multi_process:
    return plan
  collectives = _get(cfg, "cpu_collectives", "gloo")
  if collectives:
    # Only the CPU client reads it; harmless on GPU/TPU where NCCL/ICI do the collectives.
    jax.config.update("jax_cpu_collectives_implementation", collectives)
  kwargs = dict(initialization_timeout=_int(_get(cfg, "initialization_timeout", 300),
                                            "distributed.initialization_timeout", 1))
  if plan.source != "tpu":
    kwargs.update(coordinator_address=plan.coordinator_address, num_processes=plan.num_processes,
                  process_id=plan.process_id,
                  local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None)
  jax.distributed.initialize(**kwargs)
  if plan.num_processes and jax.process_count() != plan.num_processes:
    raise RuntimeError(f"jax.distributed.initialize produced {jax.process_count()} processes, "
                       f"expected {plan.num_processes} ({plan.source})")
  if plan.source == "tpu":
    plan = dataclasses.replace(plan, num_processes=jax.process_count(),
                               process_id=jax.process_index())
  return plan


def describe(plan: Plan) -> str:
  """One line for the log: source, rank, coordinator and the devices this process sees."""
  if not plan.multi_process:
    return f"single process, {jax.local_device_count()} local devices"
  return (f"process {jax.process_index()}/{jax.process_count()} via {plan.source}, "
          f"coordinator {plan.coordinator_address or 'auto'}, "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices")


def check() -> dict[str, Any]:
  """Smoke test of a fresh job: every device contributes its process index to one global sum.

  Returns:
    {"processes", "devices", "sum", "expected"}; `sum == expected` when every process and
    device took part in the collective.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

  devices = np.asarray(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("all",))
  local = np.asarray([[d.process_index + 1.0] for d in jax.local_devices()], np.float32)
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("all")), local,
                                             (len(devices), 1))
  total = float(jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(x))
  expected = float(sum(d.process_index + 1 for d in jax.devices()))
  return {"processes": jax.process_count(), "devices": len(devices), "sum": total,
          "expected": expected}


def main(argv: Optional[list[str]] = None) -> int:
  """`python -m baichuan_jax.distributed {plan,check,flags}` (see --help)."""
  import argparse  # pylint: disable=import-outside-toplevel
  import shlex  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(
      prog="python -m baichuan_jax.distributed",
      description="Multi-host helpers for launch scripts. `plan` prints what this process "
      "would do (no initialisation); `check` initialises from the environment and runs one "
      "global all-reduce; `flags PRESET` prints a shell `export` of the XLA overlap flags "
      "(gpu, tpu or cpu) merged with the variable's current value.")
  sub = parser.add_subparsers(dest="cmd", required=True)
  sub.add_parser("plan", help="print the detected process layout")
  sub.add_parser("check", help="initialise and run a global all-reduce (exit 1 on mismatch)")
  flags = sub.add_parser("flags", help="print `export VAR='...'` for an XLA flag preset")
  flags.add_argument("preset", help="gpu, tpu or cpu")
  args = parser.parse_args(argv)
  if args.cmd == "plan":
    print(resolve())
    return 0
  if args.cmd == "flags":
    from baichuan_jax import sharding  # pylint: disable=import-outside-toplevel
    var, _ = sharding.xla_flags(args.preset)
    env = dict(os.environ)
    print(f"export {var}={shlex.quote(sharding.apply_xla_flags(args.preset, env))}")
    return 0
  plan = initialize()
  result = check()
  ok = result["sum"] == result["expected"]
  print(f"[{describe(plan)}] all-reduce over {result['devices']} devices: {result['sum']:g} "
        f"(expected {result['expected']:g}) {'OK' if ok else 'MISMATCH'}", flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  raise SystemExit(main())
