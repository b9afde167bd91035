"""Mesh construction, the logical-axis rules per ZeRO stage, fail-fast config checks and XLA
flag presets (8 fake CPU devices, no step compiled)."""

import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from baichuan_jax import configs, sharding, train

TINY = configs.get("tiny", num_layers=2, dtype="float32")


def _mesh_cfg(**kw):
  c = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1, "dcn_data": 1})
  c.update(kw)
  return c


@pytest.mark.parametrize("cfg,want", [
    (dict(data=-1, model=1), dict(data=8, fsdp=1, model=1)),
    (dict(data=-1, model=4), dict(data=2, fsdp=1, model=4)),
    (dict(data=2, fsdp=-1, model=2), dict(data=2, fsdp=2, model=2)),
    (dict(data=1, model=-1), dict(data=1, fsdp=1, model=8)),
    (dict(data=2, fsdp=2, model=2), dict(data=2, fsdp=2, model=2)),
])
def test_resolve_mesh_shape(cfg, want):
  assert sharding.resolve_mesh_shape(cfg, 8) == want


@pytest.mark.parametrize("cfg,msg", [
    (dict(data=-1, model=3), r"mesh fsdp=1 x model=3 \(product 3\) does not divide the 8 devices"),
    (dict(data=2, model=2), r"mesh data=2 x fsdp=1 x model=2 needs 4 devices but 8 are available"),
    (dict(data=-1, model=-1), r"mesh axes \['data', 'model'\] are all -1"),
    (dict(data=0, model=8), r"mesh.data=0 is invalid"),
])
def test_bad_mesh_is_explained(cfg, msg):
  with pytest.raises(ValueError, match=msg):
    sharding.resolve_mesh_shape(cfg, 8)


def test_make_mesh_axes_and_device_order():
  mesh = sharding.make_mesh(_mesh_cfg(model=4))
  assert mesh.axis_names == ("data", "fsdp", "model")
  assert mesh.devices.shape == (2, 1, 4)
  # Model-parallel neighbours are consecutive devices (one host's fast links on real hardware).
  ids = np.vectorize(lambda d: d.id)(mesh.devices)
  np.testing.assert_array_equal(ids[0, 0], [0, 1, 2, 3])
  assert sharding.mesh_shape(mesh) == {"data": 2, "fsdp": 1, "model": 4}


def test_hybrid_mesh_needs_matching_slices():
  with pytest.raises(ValueError, match=r"mesh.dcn_data=2 but the devices form 1 processes"):
    sharding.make_mesh(_mesh_cfg(model=2, dcn_data=2))
  with pytest.raises(ValueError, match=r"mesh.dcn_data=3 does not divide mesh.data=4"):
    sharding.make_mesh(_mesh_cfg(model=2, dcn_data=3))


class _FakeGpu:
  """Stands in for a GPU device: only the attributes the host-mesh builder reads."""

  def __init__(self, process_index, id_):
    self.process_index, self.id, self.slice_index, self.platform = process_index, id_, 0, "gpu"

  def __repr__(self):
    return f"gpu{self.id}@p{self.process_index}"


def test_host_hybrid_mesh_keeps_model_axis_inside_a_host():
  # 2 hosts x 2 processes per host (one per GPU pair) x 2 GPUs per process, shuffled order.
  devices = [_FakeGpu(p, 2 * p + i) for p in (3, 1, 0, 2) for i in (1, 0)]
  arr = sharding._host_hybrid_mesh(devices, (1, 1, 4), dcn=2)  # pylint: disable=protected-access
  assert arr.shape == (2, 1, 4)
  procs = np.vectorize(lambda d: d.process_index)(arr)
  ids = np.vectorize(lambda d: d.id)(arr)
  # Host 0 = processes 0, 1; host 1 = processes 2, 3; each host's 4 GPUs form the model axis.
  np.testing.assert_array_equal(procs[:, 0], [[0, 0, 1, 1], [2, 2, 3, 3]])
  np.testing.assert_array_equal(ids[:, 0], [[0, 1, 2, 3], [4, 5, 6, 7]])
  with pytest.raises(ValueError, match=r"mesh.dcn_data=3 but the devices form 4 processes"):
    sharding._host_hybrid_mesh(devices, (1, 1, 4), dcn=3)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"host 0 \(processes \[0, 1\]\) has 4 devices but"):
    sharding._host_hybrid_mesh(devices, (1, 1, 8), dcn=2)  # pylint: disable=protected-access


def _embed_rule(stage, view):
  return dict(sharding.logical_axis_rules(stage, view))["embed"]


def test_zero_stages_choose_what_the_data_axis_shards():
  sharded, local = ("data", "fsdp"), ("fsdp",)
  table = {  # stage: (params, grads, opt_state)
      0: (local, local, local),
      1: (local, local, sharded),
      2: (local, sharded, sharded),
      3: (sharded, sharded, sharded),
  }
  for stage, views in table.items():
    got = tuple(_embed_rule(stage, v) for v in ("params", "grads", "opt_state"))
    assert got == views, stage
  rules = dict(sharding.logical_axis_rules(1))
  # Megatron: heads/mlp/vocab on the model axis; batch over the data-parallel axes.
  assert rules["heads"] == rules["mlp"] == rules["vocab"] == "model"
  assert rules["activation_batch"] == ("data", "fsdp")
  with pytest.raises(ValueError, match="zero_stage=4"):
    sharding.logical_axis_rules(4)


def test_param_shardings_stage1_on_2x4():
  mesh = sharding.make_mesh(_mesh_cfg(model=4))
  params = sharding.param_shardings(TINY, mesh, zero_stage=1, view="params")
  opt = sharding.param_shardings(TINY, mesh, zero_stage=1, view="opt_state")
  assert params["layers"]["mlp"]["gate_proj"]["kernel"].spec == P(None, ("fsdp",), "model")
  assert opt["layers"]["mlp"]["gate_proj"]["kernel"].spec == P(None, ("data", "fsdp"), "model")
  assert params["norm"]["weight"].spec == P(("fsdp",))
  assert opt["norm"]["weight"].spec == P(("data", "fsdp", "model"))
  # Bytes one device holds: the [L, E, F] gate kernel split 4 ways (params) or 8 (opt state).
  shape = jax.ShapeDtypeStruct((2, 256, 768), np.float32)
  assert sharding.per_device_bytes([shape], [params["layers"]["mlp"]["gate_proj"]["kernel"]]) \
      == 2 * 256 * 768 * 4 // 4
  assert sharding.per_device_bytes([shape], [opt["layers"]["mlp"]["gate_proj"]["kernel"]]) \
      == 2 * 256 * 768 * 4 // 8


def _train_cfg(**kw):
  tc = train.default_train_config()
  tc.batch_size, tc.seq_len = 8, 32
  for k, v in kw.items():
    if k.startswith("mesh_"):
      tc.mesh[k[5:]] = v
    else:
      tc[k] = v
  return tc


def _no_compile(monkeypatch):
  def boom(*a, **k):
    raise AssertionError("jax.jit was reached: the config error was not caught before compiling")
  monkeypatch.setattr(jax, "jit", boom)


@pytest.mark.parametrize("model_kw,train_kw,msg", [
    (dict(), dict(mesh_data=1, mesh_model=8),
     r"model num_heads=4 is not divisible by mesh.model=8"),
    (dict(num_heads=4, num_kv_heads=2), dict(mesh_data=2, mesh_model=4),
     r"model num_kv_heads=2 is not divisible by mesh.model=4"),
    (dict(), dict(batch_size=6, mesh_data=4, mesh_model=2),
     r"batch_size=6 with microbatches=1 gives micro-batches of 6 sequences, not divisible by the "
     r"data-parallel size mesh.data\*mesh.fsdp=4\*1=4"),
    (dict(), dict(batch_size=8, microbatches=4, mesh_data=4, mesh_model=2),
     r"micro-batches of 2 sequences, not divisible"),
    (dict(), dict(seq_len=512, mesh_data=8), r"seq_len=512 exceeds the model's max_seq_len=256"),
    (dict(hidden_size=260, position_embedding="alibi"), dict(mesh_data=8, zero_stage=3),
     r"parameter embed_tokens dim 1 \(embed=260\) is not divisible by mesh axes "
     r"\('data', 'fsdp'\) of size 8"),
])
def test_bad_config_fails_before_compiling(monkeypatch, model_kw, train_kw, msg):
  model_cfg = configs.get("tiny", num_layers=2, **model_kw)
  tc = _train_cfg(**train_kw)
  mesh = sharding.make_mesh(tc.mesh)
  _no_compile(monkeypatch)
  with pytest.raises(ValueError, match=msg):
    train.make_train_step(model_cfg, tc, mesh)
  with pytest.raises(ValueError, match=msg):
    train.create_train_state(model_cfg, tc, mesh)


@pytest.mark.parametrize("field,value,msg", [
    ("zero_stage", 5, r"zero_stage=5 is invalid: allowed: \(0, 1, 2, 3\)"),
    ("microbatches", 3, r"microbatches=3 is invalid: must divide batch_size=8"),
    ("betas", (0.9, 1.5), r"betas=\(0.9, 1.5\) is invalid"),
    ("warmup_steps", 10**6, r"warmup_steps=1000000 is invalid: must be <= total_steps"),
])
def test_bad_train_fields_are_named(field, value, msg):
  tc = _train_cfg()
  tc[field] = value
  with pytest.raises(ValueError, match=msg):
    train.validate_train_config(tc)


def test_xla_flag_presets_apply_without_overriding_the_user():
  env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/x"}
  out = sharding.apply_xla_flags("gpu", env)
  flags = out.split()
  assert "--xla_gpu_enable_latency_hiding_scheduler=false" in flags  # the user's value wins
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in flags
  assert "--xla_gpu_enable_pipelined_all_gather=true" in flags and "--xla_dump_to=/tmp/x" in flags
  assert len(flags) == len(set(f.split("=")[0] for f in flags))
  env = {}
  sharding.apply_xla_flags("tpu", env)
  assert "--xla_tpu_enable_async_collective_fusion=true" in env["LIBTPU_INIT_ARGS"].split()
  with pytest.raises(ValueError, match="unknown XLA flag preset 'tpu7'"):
    sharding.xla_flags("tpu7")
