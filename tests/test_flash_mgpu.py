"""The Mosaic GPU flash attention (kernels_pallas.flash_mgpu): forward and the three gradients
against the fp32 reference in Mosaic GPU's interpret mode, and the CUDA lowering of all three
kernels (TMA, wgmma, the pipeline) on a machine without a GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import attention_reference
from kernels_pallas import flash_mgpu as fm


def _inputs(b, s, h, hkv, d, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (b, s, h, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, s, hkv, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, s, hkv, d), jnp.float32)
  ct = jax.random.normal(keys[3], (b, s, h, d), jnp.float32)
  return q, k, v, ct


def _out_and_grads(fn, q, k, v, ct):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out,) + vjp(ct.astype(out.dtype))


def _rel_l2(got, want):
  got = np.asarray(got.astype(jnp.float32), np.float64)
  want = np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("causal,h,hkv,d,blocks", [
    (True, 2, 2, 64, None),
    (False, 2, 2, 64, None),
    # GQA 4:2, head_dim 128, 128-row blocks, 3-stage prefetch in every kernel
    (True, 4, 2, 128, {"fwd": (64, 128, 3), "dq": (128, 64, 2), "dkdv": (128, 64, 1)}),
    # two compute warpgroups and a memory one in every kernel (one stream, two row blocks),
    # causal and not, GQA
    (True, 2, 1, 64, {"fwd": (64, 64, 2, 2), "dq": (64, 64, 2, 2), "dkdv": (64, 64, 2, 2)}),
    (False, 2, 2, 64, {"fwd": (64, 128, 2, 2), "dq": (64, 64, 3, 2), "dkdv": (128, 64, 2, 2)}),
    # the fused backward (dQ by reduce-adds in the dK/dV kernel): GQA 4:2 at head_dim 128 with
    # 3 stages; two compute warpgroups adding into the same query rows, causal, after the
    # ping-pong forward (the interpreter runs the warpgroups' turns on their shared barrier: a
    # turn missed or extra deadlocks it)
    (False, 4, 2, 128, {"dkdv": (64, 64, 3, 1, "fused")}),
    (True, 2, 1, 64, {"fwd": (64, 64, 2, 2, "pingpong"), "dkdv": (64, 64, 2, 2, "fused")}),
    # the ping-pong forward, non-causal, 128-key tiles, 3 stages, head_dim 128
    (False, 2, 2, 128, {"fwd": (64, 128, 3, 2, "pingpong")}),
])
def test_matches_the_reference_in_interpret_mode(causal, h, hkv, d, blocks):
  q, k, v, ct = _inputs(1, 256, h, hkv, d, seed=h + d + causal)
  ours = functools.partial(fm.flash_attention_mgpu, causal=causal, blocks=blocks,
                           interpret=True)
  ref = functools.partial(attention_reference, causal=causal)
  with jax.default_matmul_precision("highest"):
    want = _out_and_grads(ref, q, k, v, ct)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  got = _out_and_grads(ours, bf16(q), bf16(k), bf16(v), ct)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.dtype == jnp.bfloat16 and g.shape == w.shape, name
    # bf16 inputs and outputs: the reference on the same bf16-rounded inputs is ~2e-3 away
    assert _rel_l2(g, w) < 1.5e-2, (name, _rel_l2(g, w))
  # the kernels' causal mask: the output of query 0 is exactly its (only) value row
  if causal:
    np.testing.assert_allclose(np.asarray(got[0][:, 0], np.float32),
                               np.asarray(bf16(v)[:, 0].repeat(h // hkv, axis=1), np.float32),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_segments_match_the_reference_in_interpret_mode(causal):
  """Three documents per row, cut at different places in each row (one cut inside a 64-row
  block, so a block holds two documents, and rows whose first key blocks are all masked)."""
  b, s, h, d = 2, 256, 2, 64
  q, k, v, ct = _inputs(b, s, h, h, d, seed=11 + causal)
  cuts = jnp.array([[40, 150], [64, 200]])
  seg = (jnp.sum(jnp.arange(s)[None, :, None] >= cuts[:, None, :], -1) + 1).astype(jnp.int32)
  ours = functools.partial(fm.flash_attention_mgpu, causal=causal, segment_ids=seg,
                           interpret=True)
  ref = functools.partial(attention_reference, causal=causal, segment_ids=seg)
  with jax.default_matmul_precision("highest"):
    want = _out_and_grads(ref, q, k, v, ct)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  got = _out_and_grads(ours, bf16(q), bf16(k), bf16(v), ct)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    assert _rel_l2(g, w) < 1.5e-2, (name, _rel_l2(g, w))
  if causal:  # the first query of each document sees only itself
    for row, starts in enumerate(([0, 40, 150], [0, 64, 200])):
      for t in starts:
        np.testing.assert_allclose(np.asarray(got[0][row, t], np.float32),
                                   np.asarray(bf16(v)[row, t], np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_with_packed_positions_matches_the_reference(causal):
  """ALiBi (the slopes of 2 heads: 1/16 and 1/256) with the model's packed batches: positions
  restart at each document, and the distance is by position, not by index; GQA 2:1."""
  from baichuan_jax.model.positions import alibi_slopes
  b, s, h, hkv, d = 2, 256, 2, 1, 64
  q, k, v, ct = _inputs(b, s, h, hkv, d, seed=5 + causal)
  cuts = jnp.array([[100, 180], [30, 129]])
  seg = (jnp.sum(jnp.arange(s)[None, :, None] >= cuts[:, None, :], -1) + 1).astype(jnp.int32)
  starts = jnp.where(seg == 1, 0, jnp.where(seg == 2, cuts[:, :1], cuts[:, 1:]))
  pos = (jnp.arange(s)[None] - starts).astype(jnp.int32)
  slopes = jnp.asarray(alibi_slopes(h))
  kw = dict(causal=causal, alibi_slopes=slopes, segment_ids=seg, positions=pos)
  ours = functools.partial(fm.flash_attention_mgpu, interpret=True, **kw)
  ref = functools.partial(attention_reference, **kw)
  with jax.default_matmul_precision("highest"):
    want = _out_and_grads(ref, q, k, v, ct)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  got = _out_and_grads(ours, bf16(q), bf16(k), bf16(v), ct)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert _rel_l2(g, w) < 1.5e-2, (name, _rel_l2(g, w))
  # and the bias is really there: without it the output is far from the ALiBi reference
  plain = fm.flash_attention_mgpu(bf16(q), bf16(k), bf16(v), causal=causal, segment_ids=seg,
                                  interpret=True)
  assert _rel_l2(plain, want[0]) > 0.1


def test_the_fused_backward_matches_the_split_one_on_packed_alibi_batches():
  """The one-kernel backward against the three-kernel one and the reference on the model's
  packed ALiBi batches (documents cut inside blocks, positions restarting), two compute
  warpgroups: dQ, added into fp32 by every key block's programs, agrees with the dQ kernel's to
  well within the bf16 rounding of either."""
  from baichuan_jax.model.positions import alibi_slopes
  b, s, h, hkv, d = 2, 256, 2, 1, 64
  q, k, v, ct = _inputs(b, s, h, hkv, d, seed=23)
  cuts = jnp.array([[70, 190], [128, 150]])
  seg = (jnp.sum(jnp.arange(s)[None, :, None] >= cuts[:, None, :], -1) + 1).astype(jnp.int32)
  starts = jnp.where(seg == 1, 0, jnp.where(seg == 2, cuts[:, :1], cuts[:, 1:]))
  kw = dict(causal=True, alibi_slopes=jnp.asarray(alibi_slopes(h)), segment_ids=seg,
            positions=(jnp.arange(s)[None] - starts).astype(jnp.int32))
  with jax.default_matmul_precision("highest"):
    want = _out_and_grads(functools.partial(attention_reference, **kw), q, k, v, ct)
  bf16 = lambda x: x.astype(jnp.bfloat16)
  fused, split = (
      _out_and_grads(functools.partial(fm.flash_attention_mgpu, interpret=True, blocks=blocks,
                                       **kw), bf16(q), bf16(k), bf16(v), ct)
      for blocks in ({"dkdv": (64, 64, 2, 2, fm.FUSED)}, {"dkdv": (64, 64, 2, 2)}))
  for name, f, sp, w in zip(("out", "dq", "dk", "dv"), fused, split, want):
    assert f.dtype == jnp.bfloat16 and f.shape == w.shape, name
    assert _rel_l2(f, w) < 1.5e-2, (name, _rel_l2(f, w))
    assert _rel_l2(f, sp.astype(jnp.float32)) < 5e-3, (name, _rel_l2(f, sp.astype(jnp.float32)))


def test_the_three_kernels_lower_for_cuda():
  """The GPU lowering (Mosaic GPU's MLIR: TMA descriptors, wgmma layouts, the pipeline's
  barriers) runs on the CPU: the gradient of a causal call lowers to three Mosaic GPU custom
  calls, at head_dim 128 and 64, with segment ids, with ALiBi too, and in the two-warpgroup
  form (warp-specialised pipeline)."""
  seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
  slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32)
  two = {"fwd": (64, 128, 2, 2), "dq": (64, 64, 2, 2), "dkdv": (64, 64, 2, 2)}
  for d, with_seg, alibi, blocks in ((128, False, False, None), (64, False, False, None),
                                     (128, True, False, None), (128, True, True, None),
                                     (128, False, False, two), (128, True, True, two)):
    x = jax.ShapeDtypeStruct((2, 1024, 4, d), jnp.bfloat16)

    def loss(q, k, v, seg):
      out = fm.flash_attention_mgpu(q, k, v, segment_ids=seg if with_seg else None,
                                    alibi_slopes=slopes if alibi else None,
                                    positions=seg if alibi else None, blocks=blocks)
      return jnp.sum(out.astype(jnp.float32))
    text = (jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x, seg)
            .lower(lowering_platforms=("cuda",)).as_text())
    assert text.count("stablehlo.custom_call @mosaic_gpu") == 3, (d, with_seg, alibi, blocks)
  # the fused backward: the forward and one backward kernel (its dQ tile's fp32 TMA reduce-add
  # and the transposed dS operand lower too), one warpgroup and two, after the split or the
  # ping-pong forward; the ping-pong forward (the warpgroups' shared barrier) with the split
  # backward: three
  x = jax.ShapeDtypeStruct((2, 1024, 4, 128), jnp.bfloat16)
  for blocks, kernels in (({"dkdv": (64, 64, 2, 1, fm.FUSED)}, 2),
                          ({"fwd": (64, 64, 2, 2), "dkdv": (64, 64, 2, 2, fm.FUSED)}, 2),
                          ({"fwd": (64, 64, 2, 2, fm.PINGPONG), "dkdv": (64, 64, 2, 2, fm.FUSED)},
                           2),
                          ({"fwd": (64, 128, 2, 2, fm.PINGPONG)}, 3)):
    def loss(q, k, v, seg, blocks=blocks):
      out = fm.flash_attention_mgpu(q, k, v, segment_ids=seg, alibi_slopes=slopes,
                                    positions=seg, blocks=blocks)
      return jnp.sum(out.astype(jnp.float32))
    text = (jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x, seg)
            .lower(lowering_platforms=("cuda",)).as_text())
    assert text.count("stablehlo.custom_call @mosaic_gpu") == kernels, blocks


def test_the_fused_backward_with_128_row_query_tiles_is_refused_for_its_shared_memory():
  """At head_dim 128 the fused dK/dV kernel with 128-row query tiles needs 247,840 bytes of
  shared memory (2 stages of Q and dO tiles, K, V, dS and the fp32 dQ tile), over an SM's
  232,448: the CUDA lowering refuses it by name rather than building a kernel that cannot
  launch."""
  x = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(fm.flash_attention_mgpu(
      q, k, v, blocks={"dkdv": (128, 64, 2, 1, fm.FUSED)}).astype(jnp.float32))
  with pytest.raises(Exception, match=r"exceeds available shared memory: smem_bytes=247840 > "
                                      r"max_smem_bytes=232448"):
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(
        lowering_platforms=("cuda",))


def _fused_backward_mosaic_kernels():
  """How many Mosaic GPU kernels the CUDA lowering of the fused backward's gradient has (two
  warpgroups; 2: the forward and the one backward kernel)."""
  x = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(fm.flash_attention_mgpu(
      q, k, v, blocks={"dkdv": (64, 64, 2, 2, fm.FUSED)}).astype(jnp.float32))
  text = (jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x)
          .lower(lowering_platforms=("cuda",)).as_text())
  return text.count("stablehlo.custom_call @mosaic_gpu")


def test_the_fused_backward_lowers_without_core_map(monkeypatch):
  """`pl.core_map` is deprecated after jax 0.11.0; without it the fused backward's stateful
  kernel is `pl.kernel` on the closed-over refs, and lowers for CUDA the same: the forward and
  one backward kernel."""
  from jax.experimental import pallas as pl
  if "core_map" in vars(pl):
    monkeypatch.delattr(pl, "core_map")
  else:  # jax 0.11.2: only a deprecation shim, in the module's __getattr__
    shim = vars(pl)["__getattr__"]

    def without_core_map(name):
      if name == "core_map":
        raise AttributeError(name)
      return shim(name)
    monkeypatch.setattr(pl, "__getattr__", without_core_map)
  assert not hasattr(pl, "core_map")
  assert _fused_backward_mosaic_kernels() == 2


def test_the_stateful_kernel_takes_pl_kernel_from_jax_0_11(monkeypatch):
  """The fused backward's stateful kernel goes through `pl.kernel` where that aliases the refs
  it writes (jax >= 0.11.0, where `pl.core_map` is a deprecated shim that warns on every
  lookup), and through `pl.core_map` under jax 0.10, whose `pl.kernel` does not alias them."""
  from jax.experimental import pallas as pl
  used, new_jax = [], jax.__version_info__ >= (0, 11)
  for name in ("kernel",) if new_jax else ("kernel", "core_map"):  # the shim: not even looked up
    def recorded(*a, _name=name, _real=getattr(pl, name), **kw):
      used.append(_name)
      return _real(*a, **kw)
    monkeypatch.setattr(pl, name, recorded)
  assert _fused_backward_mosaic_kernels() == 2
  assert used == (["kernel"] if new_jax else ["core_map"]), used


def test_the_wgmmas_close_over_no_constant_index(monkeypatch):
  """Every input that a wgmma group's `pl.run_state` closes over reaches its lowering as an MLIR
  value, never as a Python int. jax 0.11's lowering hands such an input back as it came and
  refuses a Python int there ("Shaped arrays must be represented by ir.Values"): the
  one-warpgroup backward (the default blocks) did not lower under jax 0.11.2, the device's jax,
  while it did here, because its tiles were `smem.at[0]` for warpgroup 0. The rule is watched
  under this machine's jax; each kernel form's run_state inputs are checked."""
  from jax._src.pallas.mosaic_gpu import lowering
  from jax._src.state import discharge
  literals, calls = [], []
  for rules in lowering.mosaic_lowering_rules.values():
    if discharge.run_state_p in rules:
      def watched(ctx, *args, _rule=rules[discharge.run_state_p], **params):
        calls.append(len(args))
        literals.extend(type(a).__name__ for a in args if isinstance(a, int))
        return _rule(ctx, *args, **params)
      monkeypatch.setitem(rules, discharge.run_state_p, watched)
  x = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
  for blocks in (None, {"dkdv": (64, 64, 2, 1, fm.FUSED)},
                 {"fwd": (64, 64, 2, 2, fm.PINGPONG), "dkdv": (64, 64, 2, 2, fm.FUSED)}):
    loss = lambda q, k, v, blocks=blocks: jnp.sum(
        fm.flash_attention_mgpu(q, k, v, blocks=blocks).astype(jnp.float32))
    jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x).lower(
        lowering_platforms=("cuda",))
    assert calls and not literals, (blocks, literals)
    calls.clear()


@pytest.mark.parametrize("kwargs,shape,match", [
    ({}, (1, 256, 2, 96), "head_dim=96 is not 64 or 128"),
    ({}, (1, 200, 2, 64), "seq=200 is not a multiple of the fwd blocks"),
    ({"blocks": {"dq": (32, 64, 2)}}, (1, 256, 2, 64), r"dq blocks \(32, 64\) must be 64 or 128"),
    ({"blocks": {"bwd": (64, 64, 2)}}, (1, 256, 2, 64), "unknown phases"),
    ({"blocks": {"fwd": (64, 64)}}, (1, 256, 2, 64), r"must be \(block_q, block_k, stages\)"),
    ({"blocks": {"dkdv": (64, 64, 2, 3)}}, (1, 256, 2, 64), "warpgroups=3 must be 1 or 2"),
    # two warpgroups own 2 x 128 rows: 384 is a multiple of the blocks but not of that
    ({"blocks": {"fwd": (128, 64, 2, 2)}}, (1, 384, 2, 64), "x 2 warpgroups"),
    # "fused" belongs to the dK/dV kernel only, after its warpgroups; "pingpong" to the
    # forward, with two warpgroups
    ({"blocks": {"fwd": (64, 64, 2, 1, "fused")}}, (1, 256, 2, 64),
     r"blocks\['fwd'\].*ints; fwd's may end in 'pingpong'"),
    ({"blocks": {"dq": (64, 64, 2, 1, "fused")}}, (1, 256, 2, 64), r"blocks\['dq'\].*ints$"),
    ({"blocks": {"fwd": (64, 64, 2, 1, "pingpong")}}, (1, 256, 2, 64),
     "'pingpong' needs 2 compute warpgroups"),
    ({"blocks": {"dkdv": (64, 64, 2, "fused")}}, (1, 256, 2, 64), "comes fifth"),
    ({"blocks": {"dkdv": (64, 64, 2, 1, "fuse")}}, (1, 256, 2, 64), "may end in 'fused'"),
])
def test_bad_shapes_and_blocks_are_refused_by_name(kwargs, shape, match):
  x = jnp.zeros(shape, jnp.bfloat16)
  with pytest.raises(ValueError, match=match):
    fm.flash_attention_mgpu(x, x, x, interpret=True, **kwargs)


def test_float32_is_refused():
  x = jnp.zeros((1, 256, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match="dtype float32 is not bfloat16 or float16"):
    fm.flash_attention_mgpu(x, x, x, interpret=True)


def test_an_interpreted_kernel_with_ordered_effects_runs_inside_a_layer_scan():
  """jax >= 0.11's Mosaic GPU interpreter threads ordered IO callbacks through each kernel, and
  flax's layer `nn.scan` then refuses the body ("broadcasted variable has a data dependency on
  the scan body"): a FLASH_MOSAIC training step failed on the CPU. `_effect_free` runs such a
  call through a `pure_callback`; one without effects (jax 0.10's interpreter) is inlined. The
  ordered callback below stands in for 0.11's. Under jax 0.10.2 / flax 0.12.8 the scan lets an
  effectful body through, so there the assertion on the program's effects is what fails without
  `_effect_free`; under jax 0.11.2 / flax 0.12.12 the scan itself raises."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from jax.experimental import io_callback  # pylint: disable=import-outside-toplevel

  def effectful(x, w):  # a "kernel" whose interpretation is ordered IO, as in jax 0.11
    y = io_callback(lambda a: np.tanh(a), jax.ShapeDtypeStruct(x.shape, x.dtype), x @ w,
                    ordered=True)
    return y, y.sum()

  def pure(x, w):
    return jnp.tanh(x @ w), jnp.tanh(x @ w).sum()

  class Layer(nn.Module):
    kernel: object

    @nn.compact
    def __call__(self, x, bias):
      w = self.param("w", nn.initializers.normal(0.5), (4, 4))
      y, total = fm._effect_free(self.kernel, x, w)  # pylint: disable=protected-access
      return y + bias, total

  def run(kernel):
    stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=nn.broadcast, length=3)(kernel)
    x, bias = jnp.ones((2, 4)), jnp.full((2, 4), 0.1)
    params = stack.init(jax.random.PRNGKey(0), x, bias)
    return jax.jit(stack.apply)(params, x, bias), params

  (y, totals), params = run(effectful)
  (want_y, want_totals), _ = run(pure)
  np.testing.assert_allclose(y, want_y, rtol=1e-6)
  np.testing.assert_allclose(totals, want_totals, rtol=1e-6)
  w = params["params"]["w"]  # the same numbers by hand: three tanh layers, bias added after each
  x = np.ones((2, 4))
  for i in range(3):
    x = np.tanh(x @ np.asarray(w[i], np.float64)) + 0.1
  np.testing.assert_allclose(y, x, rtol=1e-5)
  # without effects the call is inlined: no callback in the program
  x1, w1 = jnp.ones((2, 4)), jnp.eye(4)
  assert "pure_callback" not in str(jax.make_jaxpr(
      lambda a, b: fm._effect_free(pure, a, b))(x1, w1))  # pylint: disable=protected-access
  wrapped = jax.make_jaxpr(lambda a, b: fm._effect_free(effectful, a, b))(x1, w1)  # pylint: disable=protected-access
  assert jax.make_jaxpr(effectful)(x1, w1).effects and not wrapped.effects
  assert "pure_callback" in str(wrapped)


def test_the_kernels_are_named_by_phase_in_the_cuda_lowering():
  """Each Mosaic GPU kernel carries its phase's name (the mesh's `kernel_name`): its PTX entry,
  a device profile's kernel line (the suite's "flash attention (Pallas)" bucket matches
  `baichuan_flash`) and ptxas's report (`benchmarks/gpu_aot.py`) say which kernel it is, where
  they said `kernel_mosaic_gpu_kernel` / `body_mosaic_gpu_kernel` for all three before."""
  import re
  x = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
  names = []
  for blocks in ({}, {"blocks": {"dkdv": (64, 64, 2, 2, fm.FUSED)}}):
    loss = lambda q, k, v, blocks=blocks: jnp.sum(fm.flash_attention_mgpu(
        q, k, v, **blocks).astype(jnp.float32))
    text = (jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(x, x, x)
            .lower(lowering_platforms=("cuda",)).as_text())
    names.append(sorted(set(re.findall(r"baichuan_flash_mgpu_[a-z_]+?_mosaic_gpu", text))))
  assert names == [
      ["baichuan_flash_mgpu_dkdv_mosaic_gpu", "baichuan_flash_mgpu_dq_mosaic_gpu",
       "baichuan_flash_mgpu_fwd_mosaic_gpu"],
      ["baichuan_flash_mgpu_bwd_fused_mosaic_gpu", "baichuan_flash_mgpu_fwd_mosaic_gpu"]]
