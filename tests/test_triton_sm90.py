"""benchmarks/triton_sm90.py: the Pallas GPU kernels compiled for sm_90a on this CPU machine.

Shared memory follows from the tiles by hand: a kernel keeps its resident tiles and `num_stages`
copies of the tiles it streams, all bf16 at head_dim 128. The forward holds q [block_q, 128] and
streams K and V [block_k, 128]; dQ holds q and dO [block_q, 128] and streams K and V. And every
backward tiling that gpu_suite.py times besides the default (plain and with RoPE inside the
kernels) must fit and not spill.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import attention as attn_bench  # noqa: E402  (benchmarks/attention.py)
import gpu_suite  # noqa: E402
import triton_sm90  # noqa: E402

import kernels_pallas  # noqa: E402
from kernels_pallas import flash_attention  # noqa: E402

KIB = 1024


def _kernels(tuning=None, rope=False, shape=(1, 1024, 4, 128), segments=False):
  """The kernels of flash fwd+bwd; `rope`: as the training step runs them (RoPE inside, with
  positions and segment ids), `segments`: plain with segment ids (the training step with RoPE
  applied first), through the suite's own benchmark function."""
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  attn_bench.BACKEND = "gpu"
  fn = attn_bench.make_fn("ours", causal=True, alibi=False, s=shape[1], h=shape[2], d=shape[3],
                          dtype=jnp.bfloat16, tuning=tuning, rope=rope,
                          segments=segments and not rope)
  f = lambda q, k, v: jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                               argnums=(0, 1, 2))(q, k, v)
  with kernels_pallas.lowering_platform("cuda"):
    return triton_sm90.triton_kernels(jax.jit(f), (x, x, x))


def test_shared_memory_is_the_tiles_times_the_stages():
  over = {"blocks": {"dq": (128, 128)}, "launch": {"dq": {"num_warps": 8, "num_stages": 3}}}
  rows = triton_sm90.compile_all(_kernels() + _kernels(over)[1:2])
  assert all("error" not in r for r in rows), rows
  tile = lambda rows: rows * 128 * 2  # bytes of a [rows, 128] bf16 tile
  fwd = [r for r in rows if r["name"] == "baichuan_flash_fwd"][0]
  assert (fwd["num_warps"], fwd["num_stages"]) == (8, 3)
  assert fwd["shared_bytes"] == tile(128) + 3 * 2 * tile(128) == 224 * KIB
  dq = [r for r in rows if r["name"] == "baichuan_flash_dq"]
  default, big = sorted(dq, key=lambda r: r["shared_bytes"])
  assert default["shared_bytes"] == 2 * tile(64) + 2 * 2 * tile(64) == 96 * KIB
  # 128 x 128 dQ tiles with 3 stages need 256 KiB: more than an sm_90 block may have.
  assert big["shared_bytes"] == 2 * tile(128) + 3 * 2 * tile(128) == 256 * KIB
  assert big["fits"] is False and default["fits"] is True and fwd["fits"] is True
  assert all(0 < r["registers"] <= 255 for r in rows)


@pytest.mark.parametrize("rope, segments", [(False, False), (False, True), (True, True)],
                         ids=["plain", "plain with segment ids", "in-kernel rope"])
def test_the_suites_backward_tilings_fit_and_do_not_spill(rope, segments):
  # at the shapes the suite times them (register allocation differs with them: dQ 128 x 64
  # with 2 stages and RoPE spills 8 bytes at seq 4096 x 32 heads, none at 1024 x 4); the plain
  # ones also with segment ids, as the rope-first train arm runs the plain winner
  t = gpu_suite.FULL["tiles"]
  shape = (t["tokens"] // t["seq"], t["seq"], t["heads"], t["head_dim"])
  kernels = []
  variants = gpu_suite.tile_variants(rope)
  for name, tuning in variants[1:]:
    kernels += [dict(k, variant=name) for k in _kernels(tuning, rope, shape, segments)
                if k["name"] in ("baichuan_flash_dq", "baichuan_flash_dkdv",
                                 "baichuan_flash_bwd_fused")]
  rows = triton_sm90.compile_all(kernels)
  # two backward kernels per variant (dQ, dK/dV), one for the fused backward's
  fused = sum(bool((t or {}).get("fused_backward")) for _, t in variants[1:])
  assert len(rows) == 2 * (len(variants) - 1) - fused
  assert fused == (0 if rope else 4)
  bad = [(r["variant"], r["name"], r.get("shared_bytes"), r.get("spill_store_bytes"),
          r.get("error")) for r in rows if "error" in r or not r["fits"] or r["spills"]]
  assert bad == []


def test_in_kernel_rope_defaults_fit_and_do_not_spill():
  # The model's pallas training path (RoPE inside the kernels, packed segments): its defaults
  # (`default_blocks` / `default_launch` with rope) fit sm_90 and spill nothing; the plain
  # forward's 128 x 128 x 3-stage tiles would not fit once cos/sin tiles come with the keys.
  x = jax.ShapeDtypeStruct((1, 1024, 4, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, 1024), jnp.int32)

  def kernels(tuning=None):
    f = lambda q, k, v, pos, seg: jax.grad(lambda q, k, v: jnp.sum(flash_attention(
        q, k, v, segment_ids=seg, positions=pos, rope_theta=1e4, backend="gpu",
        tuning=tuning).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
    with kernels_pallas.lowering_platform("cuda"):
      return triton_sm90.triton_kernels(jax.jit(f), (x, x, x, ids, ids))

  rows = triton_sm90.compile_all(kernels() + kernels({"blocks": {"fwd": (128, 128)}})[:1])
  assert [r["name"] for r in rows] == ["baichuan_flash_fwd", "baichuan_flash_dq",
                                       "baichuan_flash_dkdv", "baichuan_flash_fwd"]
  assert [(r["num_warps"], r["num_stages"]) for r in rows[:3]] == [(8, 3), (8, 2), (8, 2)]
  assert all(r["fits"] and not r["spills"] for r in rows[:3]), rows[:3]
  assert rows[3]["fits"] is False and rows[3]["shared_bytes"] > triton_sm90.SMEM_LIMIT


def test_the_fused_backward_adds_dq_with_vector_atomics():
  # 64 x 128 dK/dV tiles, 8 warps: each program's [64, 128] fp32 dQ share is 8,192 adds, 32 per
  # thread of 256, issued 4-wide: 8 atomic instructions in the loop body (acq_rel: the order
  # Pallas's Triton lowering gives every atomic). The split kernels have none.
  fused = {"fused_backward": True, "blocks": {"dkdv": (64, 128)},
           "launch": {"dkdv": {"num_warps": 8, "num_stages": 2}}}
  rows = triton_sm90.compile_all([k for k in _kernels(fused) + _kernels()
                                  if k["name"] != "baichuan_flash_fwd"])
  by = {r["name"]: r for r in rows}
  assert set(by) == {"baichuan_flash_bwd_fused", "baichuan_flash_dq", "baichuan_flash_dkdv"}
  assert by["baichuan_flash_bwd_fused"]["atomics"] == {"atom.global.gpu.acq_rel.add.v4.f32": 8}
  assert "atomics" not in by["baichuan_flash_dq"] and "atomics" not in by["baichuan_flash_dkdv"]
  assert by["baichuan_flash_bwd_fused"]["spills"] is False
