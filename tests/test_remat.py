"""Every rematerialisation policy: the same loss and gradients as no remat, and (from the lowered
program) exactly the matmuls the policy is meant to recompute in the backward pass."""

import functools

import jax
import numpy as np
import pytest

from baichuan_jax import configs, losses
from baichuan_jax.model import BaichuanLM, init_params

POLICIES = configs.REMAT_POLICIES  # a new policy is tested without editing this file


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  # Full fp32 dots on any backend (a GPU's default fp32 precision rounds inputs to TF32).
  with jax.default_matmul_precision("highest"):
    yield


def _cfg(policy, pos="rope", kv_heads=2):
  return configs.get("tiny", vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                     dtype="float32", position_embedding=pos, num_kv_heads=kv_heads,
                     remat_policy=policy)


def _abstract_params(cfg):
  return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


@functools.lru_cache(maxsize=None)
def _params(pos):
  """Random weights in the model's tree (numpy draws: an eager init costs seconds); the policy
  does not change the tree, so one set per position scheme."""
  rng = np.random.default_rng(0)

  def draw(path, x):
    base = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
    return (base + 0.05 * rng.standard_normal(x.shape)).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(draw, _abstract_params(_cfg("none", pos)))


def _loss_and_grad(policy, pos="rope", kv_heads=2):
  """The jitted value_and_grad of the LM loss on two fixed rows of 16 tokens."""
  model = BaichuanLM(_cfg(policy, pos, kv_heads))
  toks = jax.random.randint(jax.random.PRNGKey(2), (2, 17), 0, model.config.vocab_size)

  def loss(p):
    return losses.lm_loss(model.apply({"params": p}, toks[:, :-1]), toks[:, 1:],
                          z_loss_weight=2e-4)["loss"]
  return jax.jit(jax.value_and_grad(loss))


# ALiBi with none / full / save_dots is also in test_model.py; here the two policies it lacks.
@pytest.mark.parametrize("pos,policies", [("rope", POLICIES[1:]),
                                          ("alibi", ("save_dots_no_batch", "save_attn_out"))])
def test_every_policy_equals_no_remat(pos, policies):
  params = _params(pos)
  want_loss, want_grads = _loss_and_grad("none", pos)(params)
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(want_grads)) > 0.1
  for policy in policies:
    loss, grads = _loss_and_grad(policy, pos)(params)
    # fp32; recomputation changes only XLA's fusion of the same ops (seen: <= 5e-7).
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=0, atol=2e-6, err_msg=policy)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                            jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(g, w, rtol=0, atol=2e-6,
                                 err_msg=f"{policy} {jax.tree_util.keystr(path)}")


# Matmuls of one decoder block, forward. MHA: W_pack, QK^T, PV, o_proj, gate, up, down (7); GQA
# splits W_pack into q_proj and kv_proj (8). The head adds one. Without remat the program holds
# each forward matmul once and two in the backward (d input, d weight): 3 * (7 + 1) = 24 for MHA,
# 3 * (8 + 1) = 27 for GQA. A policy adds the forward matmuls it recomputes in the backward:
# - full: every one whose output the backward reads, i.e. all but down_proj (its output only
#   enters the residual sum): 6 (MHA) / 7 (GQA);
# - save_dots: none; save_dots_no_batch: the two attention einsums (they have batch dimensions);
# - save_attn_out: as full, less o_proj, whose output is the saved `attn_out`: 5 / 6.
RECOMPUTED = {"none": (0, 0), "full": (6, 7), "save_dots": (0, 0), "save_dots_no_batch": (2, 2),
              "save_attn_out": (5, 6)}


@pytest.mark.parametrize("kv_heads,col,base", [(4, 0, 24), (2, 1, 27)], ids=["mha", "gqa"])
def test_each_policy_recomputes_the_matmuls_it_names(kv_heads, col, base):
  assert set(RECOMPUTED) == set(POLICIES)
  got, want = {}, {}
  for policy in POLICIES:
    params = _abstract_params(_cfg(policy, kv_heads=kv_heads))
    # The lowered (pre-XLA, not compiled) module: one scan body per direction, any layer count.
    lowered = _loss_and_grad(policy, kv_heads=kv_heads).lower(params)
    got[policy] = lowered.as_text().count("stablehlo.dot_general")
    want[policy] = base + RECOMPUTED[policy][col]
  assert got == want
