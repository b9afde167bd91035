"""`recipes.run_sft` end to end: chat JSONL with bad lines -> LoRA SFT -> checkpoint + HF export."""

import json

import jax
import numpy as np
import pytest

from baichuan_jax import configs
from baichuan_jax.align import recipes
from baichuan_jax.model import init_params
from baichuan_jax.tokenizer import Tokenizer
from experiments.configs import sft as sft_config
from tests.infer_helpers import train_sp_model

REPLIES = ["The answer is yes.", "No, it is not.", "Use a list.", "It returns None.",
           "A tuple is immutable.", "Call close() when done."]


def _write_chat(path, n_good, bad_lines=()):
  lines = []
  for i in range(n_good):
    lines.append(json.dumps({"messages": [{"role": "user", "content": f"Question {i}: what about it?"},
                                          {"role": "assistant", "content": REPLIES[i % len(REPLIES)]}]}))
  lines += list(bad_lines)
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return n_good


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("sft")
  tok_path = train_sp_model(root / "tok.model")
  tok = Tokenizer(tok_path)
  model_cfg = configs.get("tiny", vocab_size=768, num_layers=2, hidden_size=64, num_heads=4,
                          intermediate_size=128, dtype="float32")
  base = init_params(model_cfg, jax.random.PRNGKey(0))
  recipes.save_params(str(root / "base"), base, 1, model_cfg)
  train = root / "train.jsonl"
  n_good = _write_chat(train, 12, bad_lines=[
      "{not json",
      json.dumps({"messages": [{"role": "user", "content": "left hanging"}]})])
  val = root / "val.jsonl"
  _write_chat(val, 4)
  cfg = sft_config.get_config()
  cfg.init, cfg.tokenizer = str(root / "base"), tok_path
  cfg.data.train, cfg.data.validation = str(train), str(val)
  cfg.steps, cfg.batch_size, cfg.seq_len, cfg.lr, cfg.warmup_steps = 6, 2, 64, 1e-2, 1
  cfg.lora.dropout = 0.0
  cfg.export_hf = str(root / "hf")
  summary = recipes.run_sft(cfg, str(root / "work"))
  return root, tok, model_cfg, base, cfg, summary, n_good, str(train)


def test_bad_lines_reported_and_loss_tokens_counted(sft_run):
  _, tok, _, _, _, summary, n_good, train = sft_run
  assert summary["records_read"] == n_good and summary["malformed_skipped"] == 2
  assert summary["malformed"][0].startswith(f"{train}:13: not valid JSON")
  assert summary["malformed"][1].startswith(f"{train}:14: ")
  assert "assistant" in summary["malformed"][1]
  assert summary["truncated"] == 0
  # Loss on each reply's tokens plus the </s> that ends it, nothing else.
  expected = sum(len(tok.encode(REPLIES[i % len(REPLIES)])) + 1 for i in range(n_good))
  assert summary["loss_tokens"] == expected
  assert summary["steps"] == 6 and summary["lora"] is True


def test_outputs_written_and_only_lora_targets_change(sft_run):
  root, _, _, base, cfg, summary, _, _ = sft_run
  work = root / "work"
  rows = [json.loads(x) for x in (work / "sft_metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, cfg.steps + 1))
  assert (work / "sft.png").stat().st_size > 0
  tuned = recipes.load_params(str(work / "sft"))
  lay0, lay1 = base["layers"], tuned["layers"]
  for name in ("input_layernorm", "post_attention_layernorm"):
    np.testing.assert_array_equal(lay0[name]["weight"], lay1[name]["weight"])
  np.testing.assert_array_equal(base["embed_tokens"], tuned["embed_tokens"])
  np.testing.assert_array_equal(base["lm_head"], tuned["lm_head"])
  for mod, name in (("self_attn", "W_pack"), ("self_attn", "o_proj"), ("mlp", "gate_proj"),
                    ("mlp", "up_proj"), ("mlp", "down_proj")):
    assert not np.array_equal(lay0[mod][name]["kernel"], lay1[mod][name]["kernel"]), name
  # Held-out loss (same replies, new questions) drops after SFT.
  assert summary["validation_after"]["tokens"] == summary["validation_before"]["tokens"] > 0
  assert summary["validation_after"]["loss"] < summary["validation_before"]["loss"]


def test_hf_export_equals_checkpoint(sft_run):
  from baichuan_jax import hf  # pylint: disable=import-outside-toplevel
  root, _, model_cfg, _, cfg, _, _, _ = sft_run
  tuned = recipes.load_params(str(root / "work" / "sft"))
  hf_cfg, hf_params = hf.load(cfg.export_hf, dtype="float32")
  assert (hf_cfg.hidden_size, hf_cfg.num_layers, hf_cfg.vocab_size) == (
      model_cfg.hidden_size, model_cfg.num_layers, model_cfg.vocab_size)
  flat_a = jax.tree_util.tree_leaves_with_path(tuned)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(hf_params))
  assert len(flat_a) == len(flat_b)
  for path, a in flat_a:
    np.testing.assert_allclose(np.asarray(flat_b[path], np.float32), np.asarray(a, np.float32),
                               rtol=0, atol=0, err_msg=jax.tree_util.keystr(path))


def test_config_errors_name_the_field(tmp_path):
  cfg = sft_config.get_config()
  with pytest.raises(ValueError, match="tokenizer"):
    recipes.run_sft(cfg, str(tmp_path))
  cfg.tokenizer = "x.model"
  with pytest.raises(ValueError, match="data.train"):
    recipes.run_sft(cfg, str(tmp_path))
