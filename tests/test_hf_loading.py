"""The one model loader: a trained workdir describes itself (config + tokenizer), loads after being
copied elsewhere, from one step folder, in eval/chat/alignment alike; old workdirs say what was
assumed."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest

from baichuan_jax import configs
from baichuan_jax.align import recipes
from baichuan_jax.checkpoint import CheckpointManager, checkpoint_dir
from baichuan_jax.eval import model_fns
from baichuan_jax.infer import loading
from baichuan_jax.train import trainer
from experiments.configs import pretrain
from infer_helpers import train_sp_model

# Fields no weight shape can tell: ALiBi, a plain head, an odd context and eps, fp32 compute.
MODEL = dict(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=2, intermediate_size=128,
             vocab_size=768, max_seq_len=48, dtype="float32", position_embedding="alibi",
             norm_head=False, rms_norm_eps=1e-5, z_loss_weight=0.0)
BATCH, SEQ = 2, 16


class _Source:
  """A DataSource of random batches with a real tokenizer file."""

  def __init__(self, tokenizer_path):
    self.tokenizer_path = tokenizer_path

  def train(self, process_index, process_count):
    return _Iter()

  def validation(self, process_index, process_count):
    return []


class _Iter:
  def __init__(self):
    self.i = 0

  def __iter__(self):
    return self

  def __next__(self):
    r = np.random.RandomState(self.i)
    self.i += 1
    x = r.randint(3, 700, (BATCH, SEQ + 1)).astype(np.int32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:],
            "positions": np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1)),
            "segment_ids": np.ones((BATCH, SEQ), np.int32),
            "loss_mask": np.ones((BATCH, SEQ), np.int32)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step training run: the trainer writes model_config.json and tokenizer.model."""
  root = tmp_path_factory.mktemp("run")
  tok_path = train_sp_model(root / "cache_tok.model")
  c = pretrain.get_config("tiny")
  c.model = configs.get("tiny", **MODEL)
  c.data.vocab_size = 768
  t = c.train
  t.batch_size, t.seq_len, t.total_steps, t.warmup_steps = BATCH, SEQ, 2, 1
  c.num_devices, c.peak_flops, c.tensorboard, c.compilation_cache = 1, 1e11, False, ""
  c.eval_every, c.sample_tokens = 0, 0
  c.checkpoint.async_save = False
  work = root / "work"
  result = trainer.run(c, str(work), progress=False, data=_Source(tok_path))
  return work, c.model, jax.tree.map(np.asarray, result.state.params), tok_path


def _same_config(a, b):
  for k in b.keys():
    assert a[k] == b[k], k


def test_trainer_workdir_describes_itself(trained):
  work, cfg, _, tok_path = trained
  assert json.loads((work / "model_config.json").read_text()) == cfg.to_dict()
  assert (work / "tokenizer.model").read_bytes() == open(tok_path, "rb").read()
  meta = json.loads((work / "checkpoints" / "2" / "meta" / "metadata").read_text())
  assert meta["extra"]["model_config"] == cfg.to_dict()


def test_copied_workdir_loads_everywhere(trained, tmp_path):
  work, cfg, params, _ = trained
  copy = tmp_path / "elsewhere"
  shutil.copytree(work, copy)
  (copy / "summary.json").unlink()  # nothing points back at the cache any more
  model = loading.load_model(checkpoint=str(copy))
  _same_config(model.cfg, cfg)
  assert model.config_source == "model_config.json" and not model.assumed
  assert model.tokenizer.path == str(copy / "tokenizer.model")
  np.testing.assert_array_equal(np.asarray(model.params["lm_head"]), params["lm_head"])
  # eval: `--checkpoint WORKDIR` finds both the config and the tokenizer.
  e_cfg, _ = model_fns.load_model(checkpoint=str(copy))
  _same_config(e_cfg, cfg)
  assert model_fns.load_tokenizer(checkpoint=str(copy)).path == str(copy / "tokenizer.model")
  # alignment: fine-tuning starts from the recorded config, not the preset.
  rc = ml_config(init=str(copy))
  a_cfg, _ = recipes.load_start(rc, vocab_size=700)
  _same_config(a_cfg, cfg)
  # auto-detection: the checkpoints/ folder and one step folder give the same model.
  for p in (copy / "checkpoints", copy / "checkpoints" / "2"):
    m = loading.load_model(path=str(p))
    _same_config(m.cfg, cfg)
    assert m.tokenizer.path == str(copy / "tokenizer.model")


def ml_config(**kw):
  from experiments.configs import sft  # pylint: disable=import-outside-toplevel
  c = sft.get_config()
  for k, v in kw.items():
    c[k] = v
  return c


def test_step_folder_alone_uses_checkpoint_metadata(trained, tmp_path):
  work, cfg, _, _ = trained
  step = tmp_path / "2"
  shutil.copytree(work / "checkpoints" / "2", step)
  m = loading.load_model(path=str(step), tokenizer=str(work / "tokenizer.model"))
  _same_config(m.cfg, cfg)
  assert m.config_source == "checkpoint metadata" and not m.assumed


def test_quantize_on_load_for_a_workdir(trained):
  work, _, params, _ = trained
  m = loading.load_model(checkpoint=str(work), quantize="int8", device_put=False)
  from baichuan_jax.infer import quant  # pylint: disable=import-outside-toplevel
  w = m.params["layers"]["mlp"]["up_proj"]["kernel"]
  assert quant.is_quantized(w) and np.asarray(w.q).dtype == np.int8
  assert np.asarray(m.params["embed_tokens"]).dtype == params["embed_tokens"].dtype


def test_old_workdir_loads_and_says_what_was_assumed(tmp_path, caplog):
  cfg = configs.get("tiny", num_layers=2, dtype="float32")
  from baichuan_jax.model import init_params  # pylint: disable=import-outside-toplevel
  params = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))
  mgr = CheckpointManager(checkpoint_dir(str(tmp_path)), async_save=False)
  mgr.save(1, {"params": params, "step": np.int32(1)})
  mgr.close()
  (tmp_path / "summary.json").write_text(json.dumps({"preset": "tiny"}))
  with caplog.at_level(logging.WARNING, logger="baichuan_jax.infer.loading"):
    m = loading.load_model(checkpoint=str(tmp_path), with_tokenizer=False)
  assert m.cfg.num_layers == 2 and m.config_source == "weight shapes"
  assert "records no model config" in m.assumed and "position_embedding=rope" in m.assumed
  assert m.assumed in caplog.text
  with pytest.raises(FileNotFoundError, match="no tokenizer found"):
    loading.load_model(checkpoint=str(tmp_path))
  with pytest.raises(ValueError, match="no tokenizer"):
    model_fns.load_tokenizer(checkpoint=str(tmp_path))
  # A recorded config that does not match the weights is an error naming the parameter.
  loading.describe_workdir(tmp_path, configs.get("tiny", num_layers=3))
  with pytest.raises(ValueError, match="checkpoint shape"):
    loading.load_model(checkpoint=str(tmp_path), with_tokenizer=False)
  (tmp_path / "model_config.json").write_text(json.dumps({"hidden_size": 8, "num_layers": 1,
                                                          "colour": "red"}))
  with pytest.raises(ValueError, match=r"model_config.json: unknown model config fields \['colour'\]"):
    loading.load_model(checkpoint=str(tmp_path), with_tokenizer=False)


def test_eval_cli_on_a_copied_workdir(trained, tmp_path):
  """`python -m baichuan_jax.eval --task ppl --checkpoint WORKDIR` (it used to stop with "no
  tokenizer: pass --tokenizer PATH") on a workdir copied away from the tokenizer cache."""
  from baichuan_jax.eval import __main__ as eval_main  # pylint: disable=import-outside-toplevel
  work, _, _, _ = trained
  copy = tmp_path / "w"
  shutil.copytree(work, copy)
  texts = tmp_path / "val.jsonl"
  texts.write_text("\n".join(json.dumps({"text": t}) for t in
                             ["The function returns a list.", "Values are sorted."]) + "\n")
  eval_main.main(["--task", "ppl", "--checkpoint", str(copy), "--data-dir", str(texts),
                  "--out", str(tmp_path / "out"), "--no-progress", "--max-len", "16"])
  res = json.loads((tmp_path / "out" / "ppl_results.json").read_text())
  assert res["model"] == str(copy) and np.isfinite(res["perplexity"]) and res["perplexity"] > 1


def test_hf_dir_turn_markers_from_generation_config(tmp_path):
  from baichuan_jax import hf  # pylint: disable=import-outside-toplevel
  from baichuan_jax.model import init_params  # pylint: disable=import-outside-toplevel
  cfg = configs.get("tiny", num_layers=1, dtype="float32")
  hf.save(cfg, jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0))), tmp_path)
  gen = json.loads((tmp_path / "generation_config.json").read_text())
  (tmp_path / "generation_config.json").write_text(json.dumps(dict(gen, user_token_id=7,
                                                                   assistant_token_id=8)))
  m = loading.load_model(path=str(tmp_path), with_tokenizer=False)
  assert (m.cfg.user_token_id, m.cfg.assistant_token_id) == (7, 8) and m.config_source == "config.json"
