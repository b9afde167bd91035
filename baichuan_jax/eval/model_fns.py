"""The model side of evaluation: jitted scoring functions, and loading a model and tokenizer.

`score_fns(cfg, params)` returns the two functions the harness needs:
  score_fn(batch) -> [batch, vocab] next-token logits at `batch.last_index` (the output head is
    applied at that one position only: a [batch, seq, 125696] fp32 logit tensor is never built);
  nll_fn(batch, targets) -> [batch, seq] token negative log-likelihoods in nats.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from baichuan_jax import configs
from baichuan_jax.model import BaichuanLM, head_logits

log = logging.getLogger(__name__)


def score_fns(cfg, params):
  """Builds (score_fn, nll_fn) for a `BaichuanLM(cfg)` with `params` (see module docstring)."""
  model = BaichuanLM(cfg)
  params = jax.device_put(params)  # once, not on every call

  @jax.jit
  def _next_logits(p, tokens, positions, segment_ids, last_index):
    hidden = model.apply({"params": p}, tokens, positions=positions, segment_ids=segment_ids,
                         return_hidden=True)  # [batch, seq, embed]
    h_last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]  # [batch, embed]
    return head_logits(h_last, p["lm_head"], cfg.norm_head)  # [batch, vocab] fp32

  @jax.jit
  def _nll(p, tokens, positions, segment_ids, targets):
    logits = model.apply({"params": p}, tokens, positions=positions, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [batch, seq, vocab]
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

  def score_fn(batch):
    return np.asarray(_next_logits(params, batch.tokens, batch.positions, batch.segment_ids,
                                   batch.last_index))

  def nll_fn(batch, targets):
    return np.asarray(_nll(params, batch.tokens, batch.positions, batch.segment_ids,
                           np.asarray(targets, np.int32)))

  return score_fn, nll_fn


def _optional(module: str, what: str):
  try:
    return importlib.import_module(module)
  except ImportError as e:
    if e.name and module.startswith(e.name.split(".")[0]) and e.name.startswith("baichuan_jax"):
      raise RuntimeError(f"{what} is not available in this installation ({module} is missing)") from e
    raise


def quantize_transform(kind: Optional[str]):
  """The per-tensor transform that quantizes weights while they load (None for full precision)."""
  if kind is None:
    return None
  if kind not in ("int8", "int4"):
    raise ValueError(f"quantize={kind!r} is invalid: allowed int8, int4")
  quant = _optional("baichuan_jax.infer.quant", f"--quantize {kind}")
  return quant.tensor_transform(kind)


def _read_workdir_config(workdir: Path):
  """A config stored beside a training checkpoint (config.json / config.yaml style), or None."""
  for name in ("config.json", "model_config.json"):
    p = workdir / name
    if p.is_file():
      raw = json.loads(p.read_text())
      raw = raw.get("model", raw)
      name = raw.pop("preset", None) or raw.pop("name", None) or "tiny"
      known = set(configs.get(name).keys())
      return configs.get(name, **{k: v for k, v in raw.items() if k in known})
  return None


def load_model(hf: Optional[str] = None, checkpoint: Optional[str] = None,
               config: Optional[str] = None, step: Optional[int] = None,
               quantize: Optional[str] = None, dtype: Optional[str] = None,
               position_embedding: str = "auto"):
  """Loads (cfg, params) from a Hugging Face Baichuan folder or a training checkpoint.

  Args:
    hf: folder with config.json and *.safetensors / pytorch_model*.bin.
    checkpoint: training workdir (`baichuan_jax.checkpoint.load_params`).
    config: preset name for a checkpoint whose workdir stores no config (e.g. "tiny").
    step: checkpoint step (default: latest).
    quantize: None, "int8" or "int4" weight-only quantization.
    dtype: compute dtype override (e.g. "float32" on CPU).
    position_embedding: "auto", "rope" or "alibi" for HF imports.
  Returns:
    (cfg, params).
  """
  if (hf is None) == (checkpoint is None):
    raise ValueError("give exactly one of hf=... or checkpoint=...")
  transform = quantize_transform(quantize)  # raises a clear error when quantization is missing
  if hf is not None:
    hf_lib = _optional("baichuan_jax.hf", "--hf loading")
    cfg, params = hf_lib.load(hf, position_embedding=position_embedding,
                              tensor_transform=transform,
                              overrides={"dtype": dtype} if dtype else None)
    return cfg, params
  ckpt = _optional("baichuan_jax.checkpoint", "--checkpoint loading")
  workdir = Path(os.path.expanduser(checkpoint))
  cfg = configs.get(config) if config else _read_workdir_config(workdir)
  if cfg is None:
    raise ValueError(f"{workdir} stores no model config: pass --config PRESET (one of "
                     f"{', '.join(configs.names())})")
  if dtype:
    cfg = _with(cfg, dtype=dtype)
  if transform is not None:
    raise RuntimeError("--quantize is applied while importing HF weights; export the checkpoint "
                       "with baichuan_jax.hf.save and evaluate it with --hf")
  return cfg, ckpt.load_params(str(workdir), step=step)


def _with(cfg, **overrides):
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    for k, v in overrides.items():
      cfg[k] = v
  configs.validate(cfg)
  return cfg


def load_tokenizer(path: Optional[str] = None, hf: Optional[str] = None,
                   checkpoint: Optional[str] = None):
  """The project tokenizer from `path`, else the `tokenizer.model` beside the model."""
  tok_lib = _optional("baichuan_jax.tokenizer", "the tokenizer")
  if path is None:
    for folder in (hf, checkpoint):
      if folder and (Path(folder) / "tokenizer.model").is_file():
        path = str(Path(folder) / "tokenizer.model")
        break
  if path is None:
    raise ValueError("no tokenizer: pass --tokenizer PATH (a SentencePiece tokenizer.model); none "
                     "was found beside the model")
  return tok_lib.Tokenizer(path)
