"""The model side of evaluation: jitted scoring functions, and loading a model and tokenizer.

`score_fns(cfg, params)` returns the two functions the harness needs:
  score_fn(batch) -> [batch, vocab] next-token logits at `batch.last_index` (the output head is
    applied at that one position only: a [batch, seq, 125696] fp32 logit tensor is never built);
  nll_fn(batch, targets) -> [batch, seq] token negative log-likelihoods in nats.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

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


def load_model(hf: Optional[str] = None, checkpoint: Optional[str] = None,
               config: Optional[str] = None, step: Optional[int] = None,
               quantize: Optional[str] = None, dtype: Optional[str] = None,
               position_embedding: str = "auto"):
  """Loads (cfg, params) from a Hugging Face Baichuan folder or a training checkpoint, with the
  project's one loader (`baichuan_jax.infer.loading`).

  Args:
    hf: folder with config.json and *.safetensors / pytorch_model*.bin.
    checkpoint: training workdir, its checkpoints/ folder or one step folder; its recorded
      model config is used (old workdirs without one: recovered from the weight shapes, with a
      warning saying what was assumed).
    config: preset name or JSON file overriding the recorded config.
    step: checkpoint step (default: latest).
    quantize: None, "int8" or "int4" weight-only quantization.
    dtype: compute dtype override (e.g. "float32" on CPU).
    position_embedding: "auto", "rope" or "alibi".
  Returns:
    (cfg, params).
  """
  if (hf is None) == (checkpoint is None):
    raise ValueError("give exactly one of hf=... or checkpoint=...")
  quantize_transform(quantize)  # raises a clear error when quantization is missing
  loading = _optional("baichuan_jax.infer.loading", "model loading")
  model = loading.load_model(checkpoint=os.path.expanduser(checkpoint) if checkpoint else None,
                             hf_dir=hf, step=step, config=config, quantize=quantize,
                             dtype=dtype, position_embedding=position_embedding,
                             with_tokenizer=False, device_put=False)
  return model.cfg, model.params


def load_tokenizer(path: Optional[str] = None, hf: Optional[str] = None,
                   checkpoint: Optional[str] = None):
  """The project tokenizer from `path`, else the one recorded with the model (the workdir's
  `tokenizer.model`, the HF folder's, or the tokenizer_path an older workdir recorded)."""
  _optional("baichuan_jax.tokenizer", "the tokenizer")
  loading = _optional("baichuan_jax.infer.loading", "model loading")
  if path is not None:
    return loading.find_tokenizer(".", path)
  folder = hf or checkpoint
  if folder is None:
    raise ValueError("no tokenizer: pass --tokenizer PATH (a SentencePiece tokenizer.model)")
  src = loading.resolve_source(os.path.expanduser(folder), "hf" if hf else "checkpoint")
  try:
    return loading.find_tokenizer(src.root)
  except FileNotFoundError as e:
    raise ValueError(f"no tokenizer: {e}") from None
