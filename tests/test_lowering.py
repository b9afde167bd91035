"""What programs lower and compile to, checked in their text.

- Flash attention forward + backward for CUDA (Triton) and TPU (Mosaic), exported on this CPU
  machine: exactly one forward, one dq and one dk/dv kernel, and no array that holds a [seq, seq]
  score matrix (the point of the kernels: memory linear in the sequence). The plain-jnp backend is
  lowered the same way to show that the check sees one.
- The tensor-parallel eval step compiled for 4 (fake CPU) devices: the Megatron collectives and no
  others, which fails if a logical-axis rule or an activation constraint stops matching the
  weights' layout (XLA then gathers weights or reshuffles activations).
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from baichuan_jax import configs, sharding, train
from baichuan_jax.model.positions import alibi_slopes
from kernels_pallas import flash_attention

B, S, H, HKV, D = 2, 1000, 40, 8, 128  # GQA (5 query heads per kv head), S not a power of two
TRITON, MOSAIC = "__gpu$xla.gpu.triton", "tpu_custom_call"
pytestmark = pytest.mark.usefixtures("lower_triton_for_an_h200")  # tests/conftest.py


def _module(platform, backend):
  """StableHLO text of grad(sum(flash_attention)) w.r.t. q, k, v with ALiBi and segments."""
  q = jax.ShapeDtypeStruct((B, S, H, D), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((B, S, HKV, D), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((B, S), jnp.int32)
  slopes = jnp.asarray(alibi_slopes(H))

  def f(q, k, v, seg):
    def loss(q, k, v):
      out = flash_attention(q, k, v, alibi_slopes=slopes, segment_ids=seg, positions=seg,
                            backend=backend)
      return jnp.sum(out.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  checks = [export.DisabledSafetyCheck.custom_call(TRITON),
            export.DisabledSafetyCheck.custom_call(MOSAIC)]
  return export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(
      q, kv, kv, seg).mlir_module()


def _seq_by_seq_arrays(module):
  """Tensor types in the module with two dimensions of at least the sequence length."""
  shapes = {tuple(int(n) for n in m.split("x")[:-1])
            for m in re.findall(r"tensor<((?:\d+x)+)[a-z]+\d*>", module)}
  return sorted(s for s in shapes if sum(n >= S for n in s) >= 2)


def _kernel_calls(module, target):
  return [line for line in module.splitlines() if f"stablehlo.custom_call @{target}(" in line]


@pytest.mark.parametrize("platform,backend,target", [("cuda", "gpu", TRITON),
                                                     ("tpu", "tpu", MOSAIC)])
def test_kernels_lower_to_three_calls_and_no_score_matrix(platform, backend, target):
  module = _module(platform, backend)
  calls = _kernel_calls(module, target)
  assert len(calls) == 3, [c[:200] for c in calls]  # forward, dq, dk/dv; nothing recomputed twice
  if target == MOSAIC:
    names = [re.search(r'kernel_name = "(\w+)"', c).group(1) for c in calls]
    assert names == ["baichuan_flash_fwd_tpu", "baichuan_flash_dq_tpu", "baichuan_flash_dkdv_tpu"]
  assert _seq_by_seq_arrays(module) == []


def test_the_check_sees_the_reference_score_matrix():
  # The jnp path materialises [batch, kv_heads, groups, q, k] scores (fp32) forward and backward.
  module = _module("cuda", "xla")
  assert not _kernel_calls(module, TRITON)
  assert (B, HKV, H // HKV, S, S) in _seq_by_seq_arrays(module)


def test_tensor_parallel_eval_step_has_only_the_megatron_collectives():
  model = configs.get("tiny", num_layers=2, dtype="float32")
  tc = train.default_train_config()
  tc.batch_size, tc.seq_len, tc.loss_chunk_size = 8, 32, 16
  tc.mesh.data, tc.mesh.model = 1, 4
  mesh = sharding.make_mesh(tc.mesh, jax.devices()[:4])
  params = train.abstract_train_state(model, tc, mesh).params
  hlo = train.make_eval_step(model, tc, mesh).lower(params, train.abstract_batch(tc, mesh)) \
      .compile().as_text()
  ops = re.findall(r"= (\S+) ([a-z-]+?)(?:-start)?\(", hlo)
  kinds = {k for _, k in ops}
  assert not kinds & {"all-gather", "reduce-scatter", "all-to-all", "collective-permute"}
  reduces = [shape.split("{")[0] for shape, k in ops if k == "all-reduce"]
  # [batch, seq, hidden] sums: the vocab-parallel embedding lookup, then o_proj and down_proj
  # (row-parallel) in the layer loop's body, which the text holds once for all layers.
  act = "f32[8,32,256]"
  assert reduces.count(act) == 3, reduces
  # The rest belong to the vocab-parallel loss: per [batch, chunk] position a max, then the
  # sum of exponentials and the target's logit (one all-reduce or two).
  rest = [r for r in reduces if r != act]
  assert rest and all(set(re.findall(r"f32\[[\d,]+\]", r)) == {"f32[8,16]"} for r in rest), rest


def _launch(module):
  """{kernel name: (num_warps, num_stages, grid)} of the Triton calls in a module's text."""
  out = {}
  for call in _kernel_calls(module, TRITON):
    get = lambda key: int(re.search(rf"{key} = (\d+) : i32", call).group(1))
    name = re.search(r'name = "(\w+)"', call).group(1)
    out[name] = (get("num_warps"), get("num_stages"), (get("grid_x"), get("grid_y"), get("grid_z")))
  return out


def test_default_tuning_reaches_the_kernels_unless_a_call_gives_its_own():
  import kernels_pallas
  x = jax.ShapeDtypeStruct((1, 512, 4, 128), jnp.bfloat16)

  def module(tuning=None):
    f = lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum(flash_attention(
        q, k, v, backend="gpu", tuning=tuning).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
    return export.export(jax.jit(f), platforms=["cuda"],
                         disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)])(
        x, x, x).mlir_module()

  base = _launch(module())
  # defaults: 64 x 64 backward tiles, 4 warps, 2 stages; grid (batch x heads, ..., 512 / 64)
  assert base["baichuan_flash_dkdv"][:2] == (4, 2) and base["baichuan_flash_dq"][:2] == (4, 2)
  tuned = {"blocks": {"dq": (128, 32)}, "launch": {"dkdv": {"num_warps": 8, "num_stages": 3}}}
  with kernels_pallas.default_tuning(tuned):
    got = _launch(module())
    explicit = _launch(module(tuning={"launch": {"bwd": {"num_warps": 2}}}))
  assert got["baichuan_flash_dkdv"][:2] == (8, 3)
  assert got["baichuan_flash_dq"][:2] == (4, 2)
  assert 512 // 128 in got["baichuan_flash_dq"][2] and 512 // 64 in base["baichuan_flash_dq"][2]
  assert got["baichuan_flash_fwd"] == base["baichuan_flash_fwd"]  # the forward was not tuned
  assert explicit["baichuan_flash_dkdv"][:2] == (2, 2)  # a call's own tuning wins
  assert _launch(module()) == base  # restored on exit
  with pytest.raises(ValueError, match="tuning keys \\['block'\\] are invalid"):
    with kernels_pallas.default_tuning({"block": {}}):
      pass
