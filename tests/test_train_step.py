"""The train step: mesh/ZeRO equivalence, optimizer-state sharding, NaN skipping, accumulation,
the optimizer's decay mask and schedule, eval step and AOT dry run (8 fake CPU devices)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from baichuan_jax import configs, losses, sharding, train
from baichuan_jax.model import BaichuanLM, init_params

MODEL = configs.get("tiny", num_layers=2, dtype="float32")
BATCH, SEQ = 8, 32


def _train_cfg(data=1, model=1, zero=0, **kw):
  tc = train.default_train_config()
  tc.batch_size, tc.seq_len = BATCH, SEQ
  tc.warmup_steps, tc.total_steps, tc.peak_lr = 2, 20, 1e-3
  tc.zero_stage, tc.loss_chunk_size = zero, 16
  tc.mesh.data, tc.mesh.model = data, model
  for k, v in kw.items():
    tc[k] = v
  return tc


def _batch(seed, batch=BATCH, seq=SEQ, ragged=False):
  """A loader-contract batch; `ragged` packs two documents per row and pads a tail."""
  r = np.random.RandomState(seed)
  x = r.randint(3, MODEL.vocab_size, (batch, seq + 1)).astype(np.int32)
  seg = np.ones((batch, seq), np.int32)
  pos = np.tile(np.arange(seq, dtype=np.int32), (batch, 1))
  if ragged:
    for i in range(batch):
      cut, end = r.randint(4, seq // 2), r.randint(seq // 2 + 2, seq + 1)
      seg[i, cut:] = 2
      seg[i, end:] = 0
      pos[i, cut:] -= cut
      pos[i, end:] = 0
  return {"inputs": x[:, :-1], "targets": x[:, 1:], "positions": pos, "segment_ids": seg,
          "loss_mask": (seg > 0).astype(np.int32)}


def _mesh(tc, n):
  return sharding.make_mesh(tc.mesh, jax.devices()[:n])


def _to_np(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@pytest.fixture(scope="module")
def init_state():
  """The step-0 TrainState on the host (one init compile shared by the tests below)."""
  tc = _train_cfg()
  return _to_np(train.create_train_state(MODEL, tc, _mesh(tc, 1)))


def _placed(init, tc, mesh, model_cfg=MODEL):
  """`init` copied onto `mesh` in the train config's shardings (no compile)."""
  return jax.device_put(init, train.state_shardings(model_cfg, tc, mesh))


def _run(tc, n_devices, state=None, steps=5):
  """Five steps on the same ragged batches; `state=None` initialises sharded at birth."""
  mesh = _mesh(tc, n_devices)
  state = (train.create_train_state(MODEL, tc, mesh) if state is None
           else _placed(state, tc, mesh))
  step = train.make_train_step(MODEL, tc, mesh)
  out = []
  for i in range(steps):
    state, m = step(state, _batch(i, ragged=True))
    out.append(float(m["loss"]))
  return out, state


@pytest.fixture(scope="module")
def single_device_run(init_state):
  return _run(_train_cfg(), 1, init_state)


@pytest.fixture(scope="module")
def zero3_run():
  return _run(_train_cfg(data=2, model=4, zero=3), 8)


def test_zero3_on_2x4_mesh_matches_one_device(single_device_run, zero3_run):
  ref_losses, ref_state = single_device_run
  losses_8, state_8 = zero3_run
  np.testing.assert_allclose(losses_8, ref_losses, rtol=0, atol=1e-5)
  # The loss moved: five AdamW steps at lr ~1e-3 change it, so equality is not trivial.
  assert abs(ref_losses[-1] - ref_losses[0]) > 1e-3
  # Adam divides by sqrt(v): for rarely-seen embedding rows fp32 reduction-order noise in tiny
  # gradients becomes visible, so parameters get a looser bound than losses.
  for a, b in zip(jax.tree.leaves(_to_np(state_8.params)), jax.tree.leaves(_to_np(ref_state.params))):
    np.testing.assert_allclose(a, b, atol=2e-4)
  # ZeRO-3 on data x Megatron on model: W_pack by heads, o_proj/down by their input,
  # embedding and head over the vocab, the hidden dim over the data axes.
  specs = jax.tree.map(lambda x: x.sharding.spec, state_8.params)
  assert specs["layers"]["self_attn"]["W_pack"]["kernel"] == jax.sharding.PartitionSpec(
      None, ("data", "fsdp"), None, "model", None)
  assert specs["layers"]["self_attn"]["o_proj"]["kernel"] == jax.sharding.PartitionSpec(
      None, "model", None, ("data", "fsdp"))
  for name in ("gate_proj", "up_proj"):
    assert specs["layers"]["mlp"][name]["kernel"] == jax.sharding.PartitionSpec(
        None, ("data", "fsdp"), "model")
  assert specs["layers"]["mlp"]["down_proj"]["kernel"] == jax.sharding.PartitionSpec(
      None, "model", ("data", "fsdp"))
  assert specs["embed_tokens"] == jax.sharding.PartitionSpec("model", ("data", "fsdp"))
  assert specs["lm_head"] == jax.sharding.PartitionSpec(("data", "fsdp"), "model")


def _bytes_on_device0(tree):
  total = 0
  for x in jax.tree.leaves(tree):
    if x.ndim == 0:
      continue
    shard = [s for s in x.addressable_shards if s.device == jax.devices()[0]][0]
    total += shard.data.nbytes
  return total


def test_zero3_optimizer_state_and_params_are_one_eighth_per_device(zero3_run):
  state = zero3_run[1]
  n = configs.param_counts(MODEL)["total"]
  # Adam keeps two fp32 moments per parameter; every device holds exactly 1/8 of them.
  assert _bytes_on_device0(state.opt_state) * 8 == 2 * 4 * n
  assert _bytes_on_device0(state.params) * 8 == 4 * n


def _shard_shape(x):
  return x.addressable_shards[0].data.shape


def test_zero1_zero2_with_grad_accumulation_match_one_big_batch(init_state, single_device_run):
  """ZeRO-1 and -2 on the 2 x 4 mesh, each batch accumulated over 2 micro-batches, equal one
  device on the whole batch; tensor-parallel params, 1/8 optimizer state, and (stage 2)
  sharded gradients."""
  ref_losses, ref_state = single_device_run
  b0 = _batch(0, ragged=True)["loss_mask"]
  assert b0[0::2].sum() != b0[1::2].sum()  # the micro-batches' token counts differ
  counts = configs.param_counts(MODEL)
  n, L, E, F, V = (counts["total"], MODEL.num_layers, MODEL.hidden_size,
                   MODEL.intermediate_size, MODEL.vocab_size)
  H, D = MODEL.num_heads, MODEL.hidden_size // MODEL.num_heads
  temp = {}
  for zero in (1, 2):
    tc = _train_cfg(data=2, model=4, zero=zero, microbatches=2)
    mesh = _mesh(tc, 8)
    state = _placed(init_state, tc, mesh)
    compiled = train.make_train_step(MODEL, tc, mesh).lower(state, _batch(0)).compile()
    temp[zero] = compiled.memory_analysis().temp_size_in_bytes
    losses_8 = []
    for i in range(5):
      state, m = compiled(state, _batch(i, ragged=True))
      losses_8.append(float(m["loss"]))
    # Micro-batches are rows (0, 2, 4, 6) and (1, 3, 5, 7) of ragged batches: unequal token
    # counts, so only token-weighted accumulation equals the big batch.
    np.testing.assert_allclose(losses_8, ref_losses, rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(_to_np(state.params)), jax.tree.leaves(_to_np(ref_state.params))):
      np.testing.assert_allclose(a, b, atol=2e-4)  # see the ZeRO-3 test for the looser bound
    # Megatron layout on the actual arrays: column-parallel W_pack (heads) / gate / up,
    # row-parallel o_proj / down, vocab-parallel embedding and head; 4 ways, not over data.
    p = state.params
    layer = p["layers"]
    assert _shard_shape(layer["self_attn"]["W_pack"]["kernel"]) == (L, E, 3, H // 4, D)
    assert _shard_shape(layer["self_attn"]["o_proj"]["kernel"]) == (L, H // 4, D, E)
    assert _shard_shape(layer["mlp"]["gate_proj"]["kernel"]) == (L, E, F // 4)
    assert _shard_shape(layer["mlp"]["up_proj"]["kernel"]) == (L, E, F // 4)
    assert _shard_shape(layer["mlp"]["down_proj"]["kernel"]) == (L, F // 4, E)
    assert _shard_shape(p["embed_tokens"]) == (V // 4, E)
    assert _shard_shape(p["lm_head"]) == (E, V // 4)
    # Stages 1 and 2 keep params only tensor-parallel (norm scales replicated); the optimizer
    # state is split over all 8 devices.
    assert _bytes_on_device0(p) == 4 * (n - counts["norms"]) // 4 + 4 * counts["norms"]
    assert _bytes_on_device0(state.opt_state) * 8 == 2 * 4 * n
  # Stage 2 keeps the accumulated gradients sharded over data as well: half the gradient bytes
  # per device, and a smaller compiled step. (XLA:CPU lowers the reduce-scatter as all-reduce +
  # slice, which needs a transient full-size buffer, so the step's temporaries shrink by less than
  # the gradient difference; the HLO op names would not show it, the buffer sizes do.)
  abstract = jax.eval_shape(lambda: init_params(MODEL, jax.random.PRNGKey(0)))
  mesh = _mesh(_train_cfg(data=2, model=4), 8)
  g1 = sharding.per_device_bytes(abstract, sharding.param_shardings(MODEL, mesh, 1, "grads"))
  g2 = sharding.per_device_bytes(abstract, sharding.param_shardings(MODEL, mesh, 2, "grads"))
  assert g2 * 2 < g1 * 1.01
  assert temp[2] < temp[1], (temp, g1, g2)


def _nan_loss_fn(model_cfg, tc):
  """LM loss plus two traps: `nan_loss` (a NaN loss) and `nan_grad` (finite loss, NaN grad)."""
  base = train.lm_loss_fn(model_cfg, tc)

  def loss_fn(params, batch, rng):
    loss, m = base(params, batch, rng)
    w = params["norm"]["weight"][0]  # initialised to exactly 1
    off = 1.0 - jnp.mean(batch["nan_grad"])
    # Value 0 either way; with nan_grad = 1, d sqrt(|w - 1|)/dw at w = 1 is inf * sign(0) = NaN.
    trap = jnp.sqrt(jnp.abs(w - 1.0) + off) - jnp.sqrt(off)
    loss = loss + jnp.mean(batch["nan_loss"]) + trap
    return loss, dict(m, loss=loss)

  return loss_fn


def test_nonfinite_loss_or_grad_skips_update_bit_identically(init_state):
  # bf16 compute with remat, on fp32 master weights, ZeRO-3 over a 2 x 2 mesh.
  model_bf16 = configs.get("tiny", num_layers=2, remat_policy="save_dots")
  tc = _train_cfg(data=2, model=2, zero=3)
  mesh = _mesh(tc, 4)
  state = _placed(init_state, tc, mesh, model_bf16)  # fp32 master weights either way
  step = train.make_train_step(model_bf16, tc, mesh, loss_fn=_nan_loss_fn(model_bf16, tc))

  def batch(seed, nan_loss=0.0, nan_grad=0.0):
    b = _batch(seed)
    b["nan_loss"] = np.full((BATCH,), nan_loss, np.float32)
    b["nan_grad"] = np.full((BATCH,), nan_grad, np.float32)
    return b

  before = _to_np((state.params, state.opt_state))
  state, m = step(state, batch(0, nan_loss=np.nan))
  assert np.isnan(float(m["loss"])) and float(m["skipped"]) == 1.0
  state, m = step(state, batch(1, nan_grad=1.0))
  assert np.isfinite(float(m["loss"])) and not np.isfinite(float(m["grad_norm"]))
  assert float(m["skipped"]) == 1.0 and int(state.consecutive_bad) == 2
  after = _to_np((state.params, state.opt_state))
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
  assert int(state.step) == 2 and int(state.skipped) == 2
  # A good step updates, resets the consecutive counter and keeps the total.
  state, m = step(state, batch(2))
  assert float(m["skipped"]) == 0.0 and float(m["lr"]) == 0.0  # first applied update: warm-up 0
  assert int(state.consecutive_bad) == 0 and int(state.skipped) == 2
  assert abs(float(m["loss"]) - math.log(MODEL.vocab_size)) < 0.5  # untrained: ~uniform
  state, m = step(state, batch(3))
  assert float(m["lr"]) == pytest.approx(0.5e-3)  # second applied update: half of warm-up
  changed = jax.tree.leaves(_to_np(state.params))
  assert any(not np.array_equal(a, b) for a, b in zip(changed, jax.tree.leaves(before[0])))
  # fp32 master weights and fp32 Adam moments under bf16 compute.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim)


def test_eval_step_equals_full_logits_loss(zero3_run):
  state = zero3_run[1]
  tc = _train_cfg(data=2, model=4, zero=3)
  b = _batch(5, ragged=True)
  got = train.make_eval_step(MODEL, tc, _mesh(tc, 8))(state.params, b)
  params = _to_np(state.params)
  logits = jax.jit(BaichuanLM(MODEL).apply)({"params": params}, b["inputs"], b["positions"],
                                            b["segment_ids"])
  want = losses.lm_loss(logits, b["targets"], b["loss_mask"], MODEL.z_loss_weight)
  for k in ("loss", "ce", "z_loss", "tokens"):
    np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-5)
  assert float(got["tokens"]) == b["loss_mask"].sum()


def test_dry_run_reports_sharded_bytes():
  tc = _train_cfg(data=2, model=4, zero=3)
  report = train.dry_run(MODEL, tc, _mesh(tc, 8))
  n = configs.param_counts(MODEL)["total"]
  assert report["params_bytes"] * 8 == 4 * n
  # Two fp32 moments (1/8 each) plus the replicated scalar step counters (Adam's, schedule's).
  counters = sum(x.dtype.itemsize for x in jax.tree.leaves(train.abstract_train_state(
      MODEL, tc, _mesh(tc, 8)).opt_state) if x.ndim == 0)
  assert counters == 8
  assert report["opt_state_bytes"] == 2 * 4 * n // 8 + counters
  assert report["batch_bytes"] == 5 * 4 * BATCH * SEQ // 2
  assert report["temp_bytes"] > 0 and report["peak_bytes"] >= report["temp_bytes"]
  assert "optimizer state" in train.format_dry_run(report)


# ----------------------------------------------------------------------------------------------
# Optimizer.


def test_no_weight_decay_on_norms():
  params = jax.eval_shape(lambda: init_params(MODEL, jax.random.PRNGKey(0)))
  mask = train.decay_mask(params)
  assert mask["norm"]["weight"] is False
  assert mask["layers"]["input_layernorm"]["weight"] is False
  assert mask["layers"]["post_attention_layernorm"]["weight"] is False
  assert mask["layers"]["self_attn"]["W_pack"]["kernel"] is True
  assert mask["embed_tokens"] is True and mask["lm_head"] is True
  # Behaviour: with zero gradients AdamW only decays: p <- p - lr * wd * p, norms untouched.
  tc = _train_cfg(warmup_steps=0, weight_decay=0.1, peak_lr=1e-2, total_steps=10)
  opt = train.make_optimizer(tc)
  p = {"norm": {"weight": jnp.full((4,), 2.0)}, "w": {"kernel": jnp.full((2, 3), 2.0)}}
  upd, _ = opt.update(jax.tree.map(jnp.zeros_like, p), opt.init(p), p)
  new = optax.apply_updates(p, upd)
  np.testing.assert_allclose(new["norm"]["weight"], 2.0)
  np.testing.assert_allclose(new["w"]["kernel"], 2.0 - 1e-2 * 0.1 * 2.0, rtol=1e-6)


def test_lr_schedule_values_by_hand():
  tc = _train_cfg(peak_lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
  lr = train.lr_schedule(tc)
  floor = 1e-4
  expected = {0: 0.0, 5: 5e-4, 10: 1e-3, 60: floor + 0.9e-3 * 0.5,
              35: floor + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)), 110: floor, 500: floor}
  for step, want in expected.items():
    assert float(lr(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), step


def test_adamw_hyperparameters_and_clip():
  tc = _train_cfg(warmup_steps=0, total_steps=10, peak_lr=1e-3, min_lr_ratio=1.0,
                  weight_decay=0.0)
  opt = train.make_optimizer(tc)
  p = {"w": {"kernel": jnp.zeros((4,))}}
  g = {"w": {"kernel": jnp.asarray([3.0, 4.0, 0.0, 0.0])}}  # norm 5 -> clipped to 0.5
  state = opt.init(p)
  upd, state = opt.update(g, state, p)
  gc = np.array([0.3, 0.4, 0.0, 0.0])  # g * 0.5 / 5
  m = 0.1 * gc
  v = 0.05 * gc ** 2
  want = -1e-3 * (m / 0.1) / (np.sqrt(v / 0.05) + 1e-8)
  np.testing.assert_allclose(upd["w"]["kernel"], want, rtol=1e-5, atol=1e-12)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state) if x.ndim)
