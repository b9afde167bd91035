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
