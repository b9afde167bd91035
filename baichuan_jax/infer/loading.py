"""Loading a model for inference: a training workdir or a Hugging Face directory, plus its tokenizer.

Shared by the `chat`, `generate` and `serve` command lines:

* `--checkpoint WORKDIR`: weights from `baichuan_jax.checkpoint.load_params(WORKDIR)`. The model
  config is read from the workdir (the first of `model_config.json`, `config.json`, `cfg.json`
  that holds a model config, either at the top level or under a "model" key) or given with
  `--config` (a preset name or a JSON file). Otherwise it is recovered from the weight shapes
  (vocab, width, depth, heads from the fused `W_pack`) on top of the preset that the trainer
  recorded in `WORKDIR/summary.json` (else the preset of the same shape), with the position scheme
  from that preset or `--position-embedding`.
* `--hf DIR`: `baichuan_jax.hf.load(DIR)`; with `--quantize` each tensor is quantized while it is
  read, so the full-precision model is never in memory at once.

The tokenizer is `--tokenizer PATH` if given, else `tokenizer.model` in the workdir, else the
`tokenizer_path` recorded in its summary.json / config JSON, else any `*.model` there, else an
error that says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from baichuan_jax import configs
from baichuan_jax.infer import quant

_CONFIG_FILES = ("model_config.json", "config.json", "cfg.json")
_TOKENIZER_KEYS = ("tokenizer_path", "tokenizer")


@dataclasses.dataclass
class LoadedModel:
  """A model ready for `infer.generate`: config, parameters (on device) and tokenizer."""
  cfg: ml_collections.ConfigDict
  params: Any
  tokenizer: Any
  source: str


def add_model_flags(p: argparse.ArgumentParser) -> None:
  """Adds the model-loading flags shared by the inference command lines."""
  g = p.add_argument_group("model")
  src = g.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", metavar="WORKDIR",
                   help="training workdir (or its checkpoints/ folder) to load the newest verified "
                        "checkpoint from")
  src.add_argument("--hf", metavar="DIR", help="Hugging Face Baichuan checkpoint directory")
  g.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  g.add_argument("--config", default=None,
                 help=f"model config: a preset ({', '.join(configs.names())}) or a JSON file "
                      "(default: read from the workdir, else recovered from the weight shapes)")
  g.add_argument("--tokenizer", default=None,
                 help="SentencePiece tokenizer.model (default: the one in the workdir / HF dir)")
  g.add_argument("--position-embedding", choices=("auto", "rope", "alibi"), default="auto",
                 help="position scheme when it cannot be read from a config (default: auto)")
  g.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                 help="compute dtype (default: the config's, bfloat16 for presets)")
  g.add_argument("--quantize", choices=("none",) + quant.KINDS, default="none",
                 help="weight-only quantization of the linear layers (default: none)")
  g.add_argument("--quantize-embeddings", action="store_true",
                 help="also quantize the embedding table and output head")
  g.add_argument("--group-size", type=int, default=quant.DEFAULT_GROUP_SIZE,
                 help="int4 group size along the input dimension (default: %(default)s)")


def from_args(args: argparse.Namespace) -> LoadedModel:
  """Loads the model described by `add_model_flags` flags."""
  kind = None if args.quantize == "none" else args.quantize
  return load_model(checkpoint=args.checkpoint, hf_dir=args.hf, step=args.step, config=args.config,
                    tokenizer=args.tokenizer, position_embedding=args.position_embedding,
                    dtype=args.dtype, quantize=kind, quantize_embeddings=args.quantize_embeddings,
                    group_size=args.group_size)


def load_model(checkpoint: Optional[str] = None, hf_dir: Optional[str] = None, *,
               step: Optional[int] = None, config: Optional[str] = None,
               tokenizer: Optional[str] = None, position_embedding: str = "auto",
               dtype: Optional[str] = None, quantize: Optional[str] = None,
               quantize_embeddings: bool = False,
               group_size: int = quant.DEFAULT_GROUP_SIZE) -> LoadedModel:
  """Loads weights, config and tokenizer (see the module doc for where each comes from).

  Raises:
    ValueError / FileNotFoundError: no source or two sources, missing tokenizer, a config that
      does not match the weights (the message names the parameter and both shapes).
  """
  if (checkpoint is None) == (hf_dir is None):
    raise ValueError("give exactly one of checkpoint=WORKDIR or hf_dir=DIR")
  if quantize is not None and quantize not in quant.KINDS:
    raise ValueError(f"quantize={quantize!r} is invalid: allowed {', '.join(quant.KINDS)} or None")
  if hf_dir is not None:
    from baichuan_jax import hf  # pylint: disable=import-outside-toplevel
    transform = None
    if quantize is not None:
      transform = quant.tensor_transform(quantize, group_size, embedding=quantize_embeddings,
                                         head=quantize_embeddings)
    overrides = {"dtype": dtype} if dtype else None
    cfg, params = hf.load(hf_dir, position_embedding=position_embedding, tensor_transform=transform,
                          overrides=overrides)
    root, recorded = Path(hf_dir), None
  else:
    from baichuan_jax import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
    params = ckpt.load_params(checkpoint, step=step)
    root = Path(checkpoint)
    cfg, recorded = _workdir_config(root, config, params, position_embedding)
    if dtype:
      cfg.dtype = dtype
    _check_shapes(cfg, params)
    if quantize is not None:
      params = quant.quantize_params(params, quantize, group_size, embedding=quantize_embeddings,
                                     head=quantize_embeddings)
  params = jax.device_put(params)
  tok = _tokenizer(tokenizer, root, recorded)
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's "
                     f"vocab_size is {cfg.vocab_size}")
  return LoadedModel(cfg, params, tok, str(checkpoint or hf_dir))


def _read_model_config(path: Path) -> tuple[Optional[ml_collections.ConfigDict], dict]:
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  model = data.get("model", data) if isinstance(data, dict) else None
  if isinstance(model, dict) and "hidden_size" in model and "num_layers" in model:
    base = configs.get("tiny")
    unknown = sorted(set(model) - set(base.keys()))
    if unknown:
      raise ValueError(f"{path}: unknown model config fields {unknown}")
    base.update(model)
    return base, data
  return None, data if isinstance(data, dict) else {}


def _workdir_config(root: Path, config: Optional[str], params, position_embedding: str):
  recorded: dict = {}
  if config is not None:
    if config in configs.names():
      cfg = configs.get(config)
    else:
      cfg, recorded = _read_model_config(Path(config))
      if cfg is None:
        raise ValueError(f"--config {config}: neither a preset ({', '.join(configs.names())}) nor "
                         "a JSON file with a model config")
  else:
    cfg = None
    for name in _CONFIG_FILES:
      for d in (root, root.parent):
        if (d / name).is_file():
          cfg, recorded = _read_model_config(d / name)
          if cfg is not None:
            break
      if cfg is not None:
        break
    if cfg is None:
      # `baichuan_jax.train.trainer` records the preset and tokenizer in summary.json.
      summary = _read_json_dict(root / "summary.json") or _read_json_dict(root.parent / "summary.json")
      recorded = recorded or summary
      cfg = config_from_shapes(params, position_embedding, preset=summary.get("preset"))
  if position_embedding != "auto":
    cfg.position_embedding = position_embedding
  configs.validate(cfg)
  return cfg, recorded


def _read_json_dict(path: Path) -> dict:
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {}
  return data if isinstance(data, dict) else {}


def config_from_shapes(params, position_embedding: str = "auto",
                       preset: Optional[str] = None) -> ml_collections.ConfigDict:
  """A model config recovered from parameter shapes (`preset`, or the preset of the same shape,
  fills the rest).

  Returns:
    ConfigDict; position_embedding/norm_head come from a preset with the same widths (else RoPE and
    NormHead, the tiny/small defaults) unless `position_embedding` is given.
  """
  layers = params["layers"]
  attn = layers["self_attn"]
  v, e = np.shape(params["embed_tokens"])
  n_layers = np.shape(layers["input_layernorm"]["weight"])[0]
  if "W_pack" in attn:
    _, _, _, heads, head_dim = np.shape(attn["W_pack"]["kernel"])
    kv_heads = heads
  else:
    heads, head_dim = np.shape(attn["q_proj"]["kernel"])[-2:]
    kv_heads = np.shape(attn["kv_proj"]["kernel"])[-2]
  ffn = np.shape(layers["mlp"]["gate_proj"]["kernel"])[-1]
  shape = dict(vocab_size=v, hidden_size=e, num_layers=n_layers, num_heads=heads,
               num_kv_heads=kv_heads, intermediate_size=ffn)
  base = configs.get(preset) if preset in configs.names() else configs.get("tiny")
  if preset not in configs.names():
    for name in configs.names():
      c = configs.get(name)
      if all(c[k] == val for k, val in shape.items()):
        base = c
        break
  base.update({k: int(val) for k, val in shape.items()})
  if position_embedding != "auto":
    base.position_embedding = position_embedding
  return base


def _check_shapes(cfg, params) -> None:
  from baichuan_jax.model import init_params  # pylint: disable=import-outside-toplevel
  want = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  flat_got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)
  for path, w in flat_want.items():
    g = flat_got.get(path)
    if g is None:
      raise ValueError(f"checkpoint has no parameter {name(path)} that the config needs")
    if tuple(np.shape(g)) != tuple(w.shape):
      raise ValueError(f"parameter {name(path)}: checkpoint shape {tuple(np.shape(g))} does not "
                       f"match the config's {tuple(w.shape)}")


def _tokenizer(path: Optional[str], root: Path, recorded: dict):
  from baichuan_jax.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  if path is not None:
    return Tokenizer(path)
  candidates = [root / "tokenizer.model", root.parent / "tokenizer.model"]
  for section in (recorded, recorded.get("data", {}) if isinstance(recorded, dict) else {}):
    for key in _TOKENIZER_KEYS:
      if isinstance(section, dict) and isinstance(section.get(key), str):
        candidates.append(Path(section[key]))
  for d in (root, root / "tokenizer"):
    if d.is_dir():
      candidates.extend(sorted(d.glob("*.model")))
  for c in candidates:
    if c.is_file():
      return Tokenizer(c)
  raise FileNotFoundError(f"no tokenizer found for {root} (looked for tokenizer.model and *.model "
                          "there); pass --tokenizer PATH")

