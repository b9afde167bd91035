"""Device meshes, the logical-axis rules and XLA flag presets.

The one table mapping logical axis names to mesh axes lives here, and so does every mesh and
PartitionSpec the trainers use: `train/step.py` and `align/engine.py` ask for them by logical
name (`logical_spec`, `unsharded_axes`, `model_parallel_size`, the shardings below). Outside it,
`infer/generation.py` still writes its KV-cache PartitionSpecs (of logical names) itself, and
`distributed.py` builds a one-axis mesh for its start-up all-reduce check.

The mesh has three named axes:

* `data`  - data parallelism; ZeRO stage 1/2/3 shards optimizer state / gradients / parameters
            over it. Spans hosts or slices (the slow network) in a hybrid mesh.
* `fsdp`  - data parallelism that always shards parameters, gradients and optimizer state
            (ZeRO-3 inside a slice, e.g. HSDP with `data` across slices at stage 1).
* `model` - Megatron tensor parallelism: W_pack / gate / up split by output (heads, mlp),
            o_proj / down by input, embedding and head over the vocabulary. Keep it inside a
            host or slice (NVLink / ICI), as Baichuan did.

The model names only logical axes (`vocab`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`, `norm`,
`layers`, `activation_*`); `logical_axis_rules(zero_stage, view)` maps them to mesh axes. The
same rules table yields three views of the state: `params`, `grads` and `opt_state`, which
differ only in whether the `data` axis shards them (that is what the ZeRO stage chooses).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from baichuan_jax.model import init_params, param_logical_axes

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
VIEWS = ("params", "grads", "opt_state")

# ----------------------------------------------------------------------------------------------
# XLA flag presets. Data, not code: launch scripts apply them with `apply_xla_flags(name)` before
# jax initialises its backend (the flags are read once, at backend start).
XLA_FLAG_PRESETS: dict[str, dict[str, Any]] = {
    # NVIDIA GPUs: overlap collectives with compute (latency-hiding scheduler), pipeline the
    # FSDP all-gathers / reduce-scatters across the layer scan, and combine small collectives
    # into large ones so NCCL runs near bandwidth.
    "gpu": {
        "env": "XLA_FLAGS",
        "flags": [
            "--xla_gpu_enable_latency_hiding_scheduler=true",
            "--xla_gpu_enable_highest_priority_async_stream=true",
            "--xla_gpu_enable_pipelined_all_gather=true",
            "--xla_gpu_enable_pipelined_reduce_scatter=true",
            "--xla_gpu_enable_pipelined_all_reduce=true",
            "--xla_gpu_enable_while_loop_double_buffering=true",
            "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
            "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
            "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
        ],
    },
    # TPUs: libtpu reads LIBTPU_INIT_ARGS. Async collective fusion lets all-gathers and
    # reduce-scatters of the next/previous layer run under this layer's matmuls.
    "tpu": {
        "env": "LIBTPU_INIT_ARGS",
        "flags": [
            "--xla_tpu_enable_async_collective_fusion=true",
            "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
            "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
            "--xla_tpu_overlap_compute_collective_tc=true",
            "--xla_enable_async_all_gather=true",
            "--xla_enable_async_reduce_scatter=true",
        ],
    },
    # CPU: nothing to overlap; the preset exists so every platform name is valid.
    "cpu": {"env": "XLA_FLAGS", "flags": []},
}


def xla_flags(preset: str) -> tuple[str, str]:
  """Returns (environment variable, space-joined flags) of an XLA flag preset."""
  if preset not in XLA_FLAG_PRESETS:
    raise ValueError(f"unknown XLA flag preset {preset!r}; allowed: {sorted(XLA_FLAG_PRESETS)}")
  p = XLA_FLAG_PRESETS[preset]
  return p["env"], " ".join(p["flags"])


def apply_xla_flags(preset: str, environ: Optional[dict] = None) -> str:
  """Appends a preset's flags to its environment variable (call before jax uses a device).

  Flags already present (by name) are left as the user set them. Returns the new value.
  """
  environ = os.environ if environ is None else environ
  var, _ = xla_flags(preset)
  current = environ.get(var, "").split()
  names = {f.split("=")[0] for f in current}
  extra = [f for f in XLA_FLAG_PRESETS[preset]["flags"] if f.split("=")[0] not in names]
  environ[var] = " ".join(current + extra)
  return environ[var]


# ----------------------------------------------------------------------------------------------
# Mesh.


def resolve_mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int) -> dict[str, int]:
  """Resolves `-1` in the mesh config and checks that the axes multiply to `num_devices`.

  Args:
    mesh_cfg: mapping with `data`, `model` and optionally `fsdp` (default 1).
    num_devices: devices the mesh must cover.
  Returns:
    {"data": d, "fsdp": f, "model": m} with d * f * m == num_devices.
  Raises:
    ValueError: naming the axis and why (non-positive, two -1s, does not divide, product wrong).
  """
  sizes = {a: mesh_cfg.get(a, 1) if a == "fsdp" else mesh_cfg.get(a, -1 if a == "data" else 1)
           for a in AXES}
  for a, v in sizes.items():
    if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and v != -1):
      raise ValueError(f"mesh.{a}={v!r} is invalid: must be a positive integer or -1 (the rest)")
  free = [a for a, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh axes {free} are all -1; at most one axis may take 'the rest'")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if free:
    if num_devices % fixed:
      given = " x ".join(f"{a}={v}" for a, v in sizes.items() if v != -1)
      raise ValueError(f"mesh {given} (product {fixed}) does not divide the {num_devices} devices, "
                       f"so mesh.{free[0]}=-1 cannot take the rest")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    given = " x ".join(f"{a}={v}" for a, v in sizes.items())
    raise ValueError(f"mesh {given} needs {fixed} devices but {num_devices} are available; "
                     "set one axis to -1 or make the product equal the device count")
  return sizes


def _host_hybrid_mesh(devices: Sequence[Any], ici: tuple[int, int, int], dcn: int) -> np.ndarray:
  """[dcn * ici_data, fsdp, model] device array with each host's devices in one ici block.

  A host is a group of consecutive process ranks (one process per node, or one per GPU with
  the ranks of a node adjacent, as SLURM's block distribution and torchrun-style launchers
  assign them), so the model and fsdp axes never cross the slow network.
  """
  procs = sorted({d.process_index for d in devices})
  if len(procs) % dcn:
    raise ValueError(f"mesh.dcn_data={dcn} but the devices form {len(procs)} processes; "
                     "dcn_data must equal the number of hosts and divide the process count")
  per_host = len(procs) // dcn
  blocks = []
  for h in range(dcn):
    mine = set(procs[h * per_host:(h + 1) * per_host])
    host = sorted((d for d in devices if d.process_index in mine),
                  key=lambda d: (d.process_index, d.id))
    if len(host) != math.prod(ici):
      raise ValueError(f"host {h} (processes {sorted(mine)}) has {len(host)} devices but a "
                       f"slice of the mesh needs data/dcn_data x fsdp x model = {ici}")
    blocks.append(np.asarray(host, dtype=object).reshape(ici))
  return np.concatenate(blocks, axis=0)


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'model') mesh from config.

  With `mesh.dcn_data > 1` the data axis is split into `dcn_data` slices (TPU slices, or hosts on
  GPU/CPU: groups of consecutive process ranks) connected by DCN, and the fsdp and model axes
  stay inside a slice on fast links (`create_hybrid_device_mesh` for TPU multislice). Otherwise `create_device_mesh` picks a topology-aware order (ICI rings on
  TPU, NVLink domains on GPU).

  Args:
    mesh_cfg: ConfigDict/mapping with data, fsdp (optional), model, dcn_data (optional).
    devices: devices to use (default all `jax.devices()`).
  Returns:
    `jax.sharding.Mesh` with axis names ('data', 'fsdp', 'model').
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  dcn = mesh_cfg.get("dcn_data", 1)
  if isinstance(dcn, bool) or not isinstance(dcn, int) or dcn < 1:
    raise ValueError(f"mesh.dcn_data={dcn!r} is invalid: must be a positive integer")
  if dcn > 1:
    if sizes["data"] % dcn:
      raise ValueError(f"mesh.dcn_data={dcn} does not divide mesh.data={sizes['data']}: each "
                       "slice must hold the same number of data-parallel replicas")
    ici = (sizes["data"] // dcn, sizes["fsdp"], sizes["model"])
    # TPU multislice devices carry distinct slice indices; elsewhere (GPU hosts, CPU processes)
    # every device reports slice 0 and hosts are groups of processes.
    if len({getattr(d, "slice_index", 0) for d in devices}) > 1:
      n_slices = len({d.slice_index for d in devices})
      if n_slices != dcn:
        raise ValueError(f"mesh.dcn_data={dcn} but the devices form {n_slices} slices; "
                         "dcn_data must equal the number of TPU slices")
      arr = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices,
                                                 allow_split_physical_axes=True)
    else:
      arr = _host_hybrid_mesh(devices, ici, dcn)
  elif devices[0].platform == "cpu":
    arr = np.asarray(devices, dtype=object).reshape(shape)
  else:
    arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(arr, AXES)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
  """{axis name: size} of a mesh."""
  return dict(zip(mesh.axis_names, mesh.devices.shape))


def model_parallel_size(mesh: Mesh) -> int:
  """Devices along the tensor-parallel `model` axis (the vocabulary shards of the split loss)."""
  return mesh_shape(mesh)["model"]


def logical_spec(*names: Optional[str]) -> PartitionSpec:
  """A PartitionSpec of logical axis names (None: unsharded dimension), for
  `logical_to_sharding` / `logical_axis_rules` to map to mesh axes."""
  return PartitionSpec(*names)


def unsharded_axes(tree: Any) -> Any:
  """A logical spec with no axis name for every leaf of `tree` (small trees stay replicated)."""
  return jax.tree.map(lambda x: PartitionSpec(*([None] * len(x.shape))), tree)


# ----------------------------------------------------------------------------------------------
# Logical axis rules.


def _zero_axes(zero_stage: int, view: str) -> tuple[str, ...]:
  """Mesh axes that shard the `view` of the state under `zero_stage`."""
  if view not in VIEWS:
    raise ValueError(f"unknown sharding view {view!r}; allowed: {VIEWS}")
  if zero_stage not in (0, 1, 2, 3):
    raise ValueError(f"zero_stage={zero_stage!r} is invalid: allowed 0, 1, 2, 3")
  first_stage = {"opt_state": 1, "grads": 2, "params": 3}[view]
  return ("data", "fsdp") if zero_stage >= first_stage else ("fsdp",)


def logical_axis_rules(zero_stage: int = 1, view: str = "params") -> list[tuple[str, Any]]:
  """The one table from logical axis names to mesh axes.

  Args:
    zero_stage: 0-3; chooses whether `data` shards this view (1: opt_state, 2: +grads,
      3: +params). `fsdp` always shards every view; `model` is Megatron tensor parallelism.
    view: "params", "grads" or "opt_state".
  Returns:
    Flax rules `[(logical_name, mesh_axes)]` (earlier rules win when two names want one axis).
  """
  zero = _zero_axes(zero_stage, view)
  # Norm scales are not tensor-parallel; when ZeRO shards them over data it also uses the model
  # axis so that every device holds exactly 1/N of the state.
  norm = zero + ("model",) if "data" in zero else zero
  return [
      # Megatron tensor parallelism.
      ("vocab", "model"),
      ("heads", "model"),
      ("kv_heads", "model"),
      ("mlp", "model"),
      # ZeRO / FSDP shards the hidden (embed) dimension of every matrix.
      ("embed", zero),
      ("norm", norm),
      ("layers", None),
      ("kv", None),
      # Activations: batch over the data-parallel axes, TP dims over model.
      ("activation_batch", BATCH_AXES),
      ("activation_length", None),
      ("activation_embed", None),
      ("activation_heads", "model"),
      ("activation_kv_heads", "model"),
      ("activation_mlp", "model"),
      ("activation_vocab", "model"),
  ]


def logical_to_sharding(logical_tree: Any, mesh: Mesh, rules: Sequence) -> Any:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh` under `rules`."""
  return jax.tree.map(
      lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(spec, rules)),
      logical_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_shardings(model_cfg: ml_collections.ConfigDict, mesh: Mesh, zero_stage: int,
                    view: str = "params") -> Any:
  """NamedSharding for every parameter (tree like `init_params`) in the given view."""
  return logical_to_sharding(param_logical_axes(model_cfg), mesh,
                             logical_axis_rules(zero_stage, view))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a [batch, seq] loader array: batch over the data-parallel axes."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def host_batch_rows(mesh: Mesh, batch_size: int) -> slice:
  """Rows of the global [batch_size, ...] batch that this process's devices hold.

  In a multi-host job each process loads only these rows (the loader's per-process shard) and
  `global_batch` assembles them into one global array without any cross-host copy.

  Args:
    mesh: the training mesh.
    batch_size: global batch in sequences.
  Returns:
    A contiguous `slice` (the whole batch in a single-process run).
  Raises:
    ValueError: if this process's rows are not one contiguous block (a mesh whose data axes
      interleave processes), which a per-process loader cannot serve.
  """
  spec = batch_sharding(mesh)
  rows = set()
  for device, index in spec.addressable_devices_indices_map((batch_size,)).items():
    del device
    rows.update(range(*index[0].indices(batch_size)))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows "
                     f"{sorted(rows)}; order the mesh so each host's devices are adjacent on "
                     "the data axes")
  return slice(lo, hi)


def _data_shards(mesh: Mesh) -> tuple[int, int]:
  """(data-parallel shards of the batch in the mesh, how many of them this process holds)."""
  shape = mesh_shape(mesh)
  local = {(int(i), int(j)) for i, j, _ in zip(*np.nonzero(np.vectorize(
      lambda d: d.process_index == jax.process_index())(mesh.devices)))}
  return shape["data"] * shape["fsdp"], len(local)


def global_batch(local: Mapping[str, Any], mesh: Mesh,
                 batch_size: Optional[int] = None) -> dict[str, jax.Array]:
  """Assembles each process's rows (`host_batch_rows`) into global data-sharded arrays.

  Args:
    local: dict of host arrays [rows this process holds, ...].
    mesh: the training mesh.
    batch_size: global batch in sequences (default: inferred from the local rows and the
      share of data-parallel shards this process holds).
  Returns:
    dict of `jax.Array` [batch_size, ...] sharded like `batch_sharding(mesh)`.
  Raises:
    ValueError: if a local array does not have the number of rows this process owns.
  """
  if batch_size is None:
    total, mine = _data_shards(mesh)
    batch_size = len(np.asarray(next(iter(local.values())))) * total // mine
  rows = host_batch_rows(mesh, batch_size)
  want = rows.stop - rows.start
  out = {}
  for key, value in local.items():
    value = np.asarray(value)
    if value.shape[0] != want:
      raise ValueError(f"batch[{key!r}] has {value.shape[0]} rows on process "
                       f"{jax.process_index()}, expected {want} (rows {rows.start}:{rows.stop} of "
                       f"the global batch of {batch_size})")
    out[key] = jax.make_array_from_process_local_data(
        batch_sharding(mesh), value, (batch_size,) + value.shape[1:])
  return out


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [microbatches, batch / microbatches, seq] arrays inside the step."""
  return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding (scalars, RNG keys, counters)."""
  return NamedSharding(mesh, PartitionSpec())


def per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) under `shardings`."""
  leaves = jax.tree.leaves(tree)
  shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  total = 0
  for x, s in zip(leaves, shards):
    total += math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
  return total


def check_divisibility(model_cfg: ml_collections.ConfigDict, train_cfg: ml_collections.ConfigDict,
                       mesh: Mesh) -> None:
  """Fails fast (before any compile) when the model or batch does not split over the mesh.

  Raises:
    ValueError: naming the config field, its value, the mesh axis and its size.
  """
  m = mesh_shape(mesh)
  tp, dp = m["model"], m["data"] * m["fsdp"]
  for field in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
    if model_cfg[field] % tp:
      raise ValueError(f"model {field}={model_cfg[field]} is not divisible by mesh.model={tp} "
                       f"(tensor parallelism splits {field} over the model axis)")
  micro = train_cfg.batch_size // max(train_cfg.microbatches, 1)
  if train_cfg.batch_size % train_cfg.microbatches or micro % dp:
    raise ValueError(
        f"batch_size={train_cfg.batch_size} with microbatches={train_cfg.microbatches} gives "
        f"micro-batches of {train_cfg.batch_size / train_cfg.microbatches:g} sequences, not "
        f"divisible by the data-parallel size mesh.data*mesh.fsdp={m['data']}*{m['fsdp']}={dp}")
  if train_cfg.seq_len > model_cfg.max_seq_len:
    raise ValueError(f"seq_len={train_cfg.seq_len} exceeds the model's "
                     f"max_seq_len={model_cfg.max_seq_len}")
  vocab_local = model_cfg.vocab_size // tp
  if vocab_local % train_cfg.loss_vocab_chunks:
    raise ValueError(f"loss_vocab_chunks={train_cfg.loss_vocab_chunks} does not divide the "
                     f"per-device vocabulary vocab_size/mesh.model={vocab_local}")
  # Every parameter dimension must split evenly in every view of the state.
  logical = param_logical_axes(model_cfg)
  shapes = jax.eval_shape(lambda: init_params(model_cfg, jax.random.PRNGKey(0)))
  for view in VIEWS:
    rules = logical_axis_rules(train_cfg.zero_stage, view)
    flat_specs = jax.tree_util.tree_flatten_with_path(
        logical, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    flat_shapes = jax.tree.leaves(shapes)
    for (path, spec), shape in zip(flat_specs, flat_shapes):
      mesh_axes = nn.logical_to_mesh_axes(spec, rules)
      for dim, (name, axes) in enumerate(zip(spec, mesh_axes)):
        if axes is None:
          continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        ways = math.prod(m[a] for a in axes)
        if shape.shape[dim] % ways:
          pname = "/".join(str(getattr(k, "key", k)) for k in path)
          raise ValueError(
              f"parameter {pname} dim {dim} ({name}={shape.shape[dim]}) is not divisible by "
              f"mesh axes {axes} of size {ways} (zero_stage={train_cfg.zero_stage}, {view}); "
              "change the mesh or the ZeRO stage")
