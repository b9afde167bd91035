"""Presets, validation and model arithmetic."""

import jax
import jax.numpy as jnp
import pytest

from baichuan_jax import configs, summary
from baichuan_jax.model import BaichuanLM

# Exact parameter counts of the released checkpoints.
PUBLISHED = {
    "baichuan-7b": 7_000_559_616,
    "baichuan-13b": 13_264_901_120,
    "baichuan2-7b": 7_505_973_248,
    "baichuan2-13b": 13_896_668_160,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_eval_shape_param_count_matches_spec(name):
  cfg = configs.get(name)
  abstract = jax.eval_shape(
      lambda: BaichuanLM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
  n = sum(x.size for x in jax.tree.leaves(abstract))
  assert n == PUBLISHED[name]
  assert configs.param_counts(cfg)["total"] == PUBLISHED[name]


def test_small_presets_sizes():
  assert 1e6 <= configs.param_counts(configs.get("tiny"))["total"] <= 9e6
  assert 20e6 <= configs.param_counts(configs.get("small"))["total"] <= 50e6


def test_names_and_fields():
  assert set(PUBLISHED) <= set(configs.names())
  assert {"tiny", "small"} <= set(configs.names())
  cfg = configs.get("baichuan2-13b")
  assert (cfg.position_embedding, cfg.norm_head, cfg.vocab_size) == ("alibi", True, 125_696)
  assert configs.get("baichuan-7b").position_embedding == "rope"


def test_ffn_width_rule():
  assert configs.ffn_width(4096) == 11008
  assert configs.ffn_width(5120) == 13696


def test_split_counts_by_hand():
  c = configs.param_counts(configs.get("baichuan-7b"))
  assert c["embedding"] == c["head"] == 64_000 * 4096
  assert c["attention"] == 32 * 4 * 4096 * 4096
  assert c["mlp"] == 32 * 3 * 4096 * 11008
  assert c["norms"] == 65 * 4096


def test_flops_per_token_by_hand():
  cfg = configs.get("tiny")
  f = configs.flops_per_token(cfg, seq_len=100)
  n_matmul = 4 * 4 * 256 * 256 + 4 * 3 * 256 * 768 + 4096 * 256
  assert f["dense"] == 6 * n_matmul
  assert f["attention"] == 12 * 4 * 256 * 100
  b = configs.param_bytes(cfg)
  assert b["bf16"] * 2 == b["fp32"] == 4 * configs.param_counts(cfg)["total"]


@pytest.mark.parametrize("override, field", [
    (dict(num_heads=7), "num_heads"),
    (dict(position_embedding="sinusoidal"), "position_embedding"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_layers=-1), "num_layers"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(attention_impl="cuda"), "attention_impl"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(dtype="int8"), "dtype"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps"),
])
def test_validation_names_field(override, field):
  with pytest.raises(ValueError, match=f"config.{field}="):
    configs.get("tiny", **override)


def test_unknown_preset_and_field():
  with pytest.raises(ValueError, match="unknown preset 'llama'.*allowed: baichuan-7b"):
    configs.get("llama")
  with pytest.raises(ValueError, match="unknown config field 'hiden_size'"):
    configs.get("tiny", hiden_size=3)


def test_summary_cli_prints_exact_counts(capsys):
  assert summary.main(["baichuan2-13b"]) == 0
  out = capsys.readouterr().out
  assert "13,896,668,160" in out and "NormHead" in out
