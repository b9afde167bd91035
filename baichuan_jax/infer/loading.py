"""The one model loader: a training workdir, one checkpoint step or a Hugging Face directory
-> (config, parameters, tokenizer).

Every command line and library entry point that needs a model calls this module: `chat`,
`generate`, `serve` (`add_model_flags` / `from_args`), `python -m baichuan_jax.eval`
(`eval.model_fns.load_model`), the alignment recipes (`align.recipes.load_start`) and the notebook.

Sources (`load_model(path=...)` tells them apart; `checkpoint=` / `hf_dir=` name one explicitly):

* a training workdir (`WORKDIR`, holding `checkpoints/`), or its `checkpoints/` folder: the
  newest checkpoint that verifies (`baichuan_jax.checkpoint.load_params`), or `step=N`;
* one checkpoint step (`WORKDIR/checkpoints/N`): that step;
* a Hugging Face Baichuan directory (`config.json` + weights): `baichuan_jax.hf.load`, with each
  tensor quantized while it is read when `quantize` is set.

A workdir describes itself: the trainer and the alignment stages write `model_config.json` (the
full model config dict) and copy the run's `tokenizer.model` beside the checkpoints
(`describe_workdir`), and every trainer checkpoint also records the config in its metadata. The
model config of a checkpoint source is, in order: `config=` (a preset name, a JSON file or a
ConfigDict); `model_config.json` in the workdir; the `model_config` in the step's metadata; a model
config in a legacy `config.json` / `cfg.json`; `default_config=`. Only an old workdir that records
none of these is recovered from its weight shapes (vocab, width, depth, heads, FFN) on top of the
preset named in its `summary.json`, and a warning says exactly what was assumed.

The tokenizer is `tokenizer=PATH` if given, else `tokenizer.model` in the workdir (or HF
directory), else the `tokenizer_path` an old workdir recorded in `summary.json`, else any
`*.model` there, else an error naming where it looked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Union

import jax
import ml_collections
import numpy as np

from baichuan_jax import configs
from baichuan_jax.infer import quant

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.model"
_LEGACY_CONFIG_FILES = ("config.json", "cfg.json")
_TOKENIZER_KEYS = ("tokenizer_path", "tokenizer")

ConfigArg = Union[None, str, os.PathLike, ml_collections.ConfigDict]


@dataclasses.dataclass
class LoadedModel:
  """A model ready for `infer.generate`: config, parameters (on device) and tokenizer."""
  cfg: ml_collections.ConfigDict
  params: Any
  tokenizer: Any
  source: str
  config_source: str = ""  # where the config came from ("model_config.json", "config.json", ...)
  assumed: str = ""  # what had to be assumed for an old workdir ("" when nothing was)


@dataclasses.dataclass
class _Source:
  """Where the weights are: kind "hf" or "checkpoint", the workdir and the chosen step."""
  kind: str
  root: Path  # HF directory or workdir
  ckpt: Optional[Path] = None  # folder of step subfolders
  step: Optional[int] = None


# ----------------------------------------------------------------------------------------------
# Self-describing workdirs.


def describe_workdir(workdir: Union[str, os.PathLike], model_cfg: ml_collections.ConfigDict,
                     tokenizer_path: Optional[Union[str, os.PathLike]] = None) -> None:
  """Writes `model_config.json` (the model config dict) and a copy of the tokenizer in `workdir`,
  so the folder loads anywhere without the cache it was trained from.

  Args:
    workdir: the run folder (created if missing).
    model_cfg: the model config of the checkpoints saved there.
    tokenizer_path: the run's SentencePiece model (None: no tokenizer copied).
  """
  root = Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  _write_atomic(root / MODEL_CONFIG_FILE, json.dumps(model_config_dict(model_cfg), indent=2) + "\n")
  if tokenizer_path:
    src, dst = Path(tokenizer_path), root / TOKENIZER_FILE
    if not src.is_file():
      raise FileNotFoundError(f"tokenizer {src} does not exist; cannot copy it into {root}")
    if not (dst.is_file() and dst.read_bytes() == src.read_bytes()):
      tmp = dst.with_name(dst.name + ".tmp")
      shutil.copyfile(src, tmp)
      os.replace(tmp, dst)


def model_config_dict(cfg: ml_collections.ConfigDict) -> dict:
  """The model config as a plain JSON-ready dict (every field, not a preset name)."""
  return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in cfg.to_dict().items()}


def _write_atomic(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Command-line flags.


def add_model_flags(p: argparse.ArgumentParser) -> None:
  """Adds the model-loading flags shared by the inference command lines."""
  g = p.add_argument_group("model")
  src = g.add_mutually_exclusive_group(required=True)
  src.add_argument("--checkpoint", metavar="WORKDIR",
                   help="training workdir (or its checkpoints/ folder, or one checkpoint step "
                        "folder) to load the newest verified checkpoint from")
  src.add_argument("--hf", metavar="DIR", help="Hugging Face Baichuan checkpoint directory")
  g.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  g.add_argument("--config", default=None,
                 help=f"model config: a preset ({', '.join(configs.names())}) or a JSON file "
                      "(default: the one the workdir records)")
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


# ----------------------------------------------------------------------------------------------
# Loading.


def load_model(checkpoint: Optional[str] = None, hf_dir: Optional[str] = None, *,
               path: Optional[str] = None, step: Optional[int] = None, config: ConfigArg = None,
               tokenizer: Optional[str] = None, position_embedding: str = "auto",
               dtype: Optional[str] = None, quantize: Optional[str] = None,
               quantize_embeddings: bool = False, group_size: int = quant.DEFAULT_GROUP_SIZE,
               default_config: Optional[ml_collections.ConfigDict] = None,
               overrides: Optional[dict] = None, with_tokenizer: bool = True,
               device_put: bool = True) -> LoadedModel:
  """Loads config, weights and tokenizer (see the module doc for where each comes from).

  Args:
    checkpoint / hf_dir / path: exactly one: a workdir (or checkpoints/ or step folder), an HF
      directory, or either (told apart by its contents).
    step: checkpoint step (default: the newest that verifies).
    config: overrides the recorded config: a preset name, a JSON file or a ConfigDict.
    tokenizer: SentencePiece model path (default: found beside the model).
    position_embedding: "auto", "rope" or "alibi" (forces the scheme).
    dtype: compute dtype override.
    quantize: None, "int8" or "int4" weight-only quantization (while reading, for HF sources).
    quantize_embeddings, group_size: passed to `infer.quant`.
    default_config: used instead of shape inference when a workdir records no config.
    overrides: extra config fields set on the loaded config (e.g. {"max_seq_len": 512}).
    with_tokenizer: False skips the tokenizer (LoadedModel.tokenizer is None).
    device_put: put the parameters on the default device (False: as loaded).
  Returns:
    LoadedModel.
  Raises:
    ValueError / FileNotFoundError: no source or two, a missing tokenizer or config, a config that
      does not match the weights (the message names the parameter and both shapes).
  """
  if sum(x is not None for x in (checkpoint, hf_dir, path)) != 1:
    raise ValueError("give exactly one of checkpoint=WORKDIR, hf_dir=DIR or path=DIR")
  if quantize is not None and quantize not in quant.KINDS:
    raise ValueError(f"quantize={quantize!r} is invalid: allowed {', '.join(quant.KINDS)} or None")
  src = resolve_source(path if path is not None else checkpoint if checkpoint is not None else hf_dir,
                       kind="auto" if path is not None else "checkpoint" if checkpoint else "hf",
                       step=step)
  quant_kw = dict(quantize=quantize, embeddings=quantize_embeddings, group_size=group_size)
  all_overrides = dict(overrides or {}, **({"dtype": dtype} if dtype else {}))
  if src.kind == "hf":
    cfg, params = _load_hf(src.root, position_embedding, all_overrides, **quant_kw)
    where, assumed, recorded = "config.json", "", {}
  else:
    cfg, params, where, assumed, recorded = _load_checkpoint(
        src, config, position_embedding, all_overrides, default_config, **quant_kw)
  if device_put:
    params = jax.device_put(params)
  tok = find_tokenizer(src.root, tokenizer, recorded) if with_tokenizer else None
  if tok is not None and tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but the model's "
                     f"vocab_size is {cfg.vocab_size}")
  return LoadedModel(cfg, params, tok, str(checkpoint or hf_dir or path), where, assumed)


def resolve_source(path: Union[str, os.PathLike], kind: str = "auto",
                   step: Optional[int] = None) -> _Source:
  """Tells a workdir, a checkpoints/ folder, a step folder and an HF directory apart."""
  p = Path(os.path.expanduser(str(path)))
  if not p.exists():
    raise FileNotFoundError(f"{p}: no such model directory")
  is_step = p.name.isdigit() and (p / "params").is_dir()
  has_steps = p.is_dir() and any(c.name.isdigit() and c.is_dir() for c in p.iterdir())
  if kind == "hf" or (kind == "auto" and (p / "config.json").is_file() and not is_step
                      and not (p / "checkpoints").is_dir() and not has_steps):
    return _Source("hf", p)
  if is_step:
    if step is not None and step != int(p.name):
      raise ValueError(f"step={step} conflicts with the step folder {p}")
    ckpt = p.parent
    root = ckpt.parent if ckpt.name == "checkpoints" else ckpt
    return _Source("checkpoint", root, ckpt, int(p.name))
  if (p / "checkpoints").is_dir() or not has_steps:
    return _Source("checkpoint", p, p / "checkpoints", step)
  return _Source("checkpoint", p.parent if p.name == "checkpoints" else p, p, step)


def _quantizer(quantize, embeddings, group_size):
  if quantize is None:
    return None
  return quant.tensor_transform(quantize, group_size, embedding=embeddings, head=embeddings)


def _load_hf(root: Path, position_embedding: str, overrides: dict, *, quantize, embeddings,
             group_size):
  from baichuan_jax import hf  # pylint: disable=import-outside-toplevel
  cfg, params = hf.load(root, position_embedding=position_embedding, overrides=overrides or None,
                        tensor_transform=_quantizer(quantize, embeddings, group_size))
  # The released chat code reads the turn markers from generation_config.json, not config.json.
  gen = _read_json_dict(root / "generation_config.json")
  for key in ("user_token_id", "assistant_token_id"):
    if isinstance(gen.get(key), int) and not isinstance(gen.get(key), bool):
      cfg[key] = gen[key]
  return cfg, params


def _load_checkpoint(src: _Source, config: ConfigArg, position_embedding: str, overrides: dict,
                     default_config, *, quantize, embeddings, group_size):
  from baichuan_jax import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  folder = src.ckpt if src.ckpt is not None and src.ckpt.is_dir() else src.root
  params = ckpt.load_params(str(folder), step=src.step)
  cfg, where, recorded = recorded_config(src, config)
  assumed = ""
  if cfg is None and default_config is not None:
    cfg, where = default_config.copy_and_resolve_references(), "default_config"
  if cfg is None:
    summary = _read_json_dict(src.root / "summary.json")
    recorded = recorded or summary
    preset = summary.get("preset")
    cfg = config_from_shapes(params, position_embedding, preset=preset)
    where = "weight shapes"
    assumed = (f"{src.root} records no model config ({MODEL_CONFIG_FILE}); assumed one from the "
               f"weight shapes on top of preset {preset if preset in configs.names() else 'of the same shape'}"
               f": position_embedding={cfg.position_embedding}, norm_head={cfg.norm_head}, "
               f"max_seq_len={cfg.max_seq_len}, rope_theta={cfg.rope_theta}. Pass --config to "
               "override, or re-save with baichuan_jax.infer.loading.describe_workdir")
    log.warning("%s", assumed)
  with cfg.unlocked():
    if position_embedding != "auto":
      cfg.position_embedding = position_embedding
    for key, value in overrides.items():
      if key not in cfg:
        raise ValueError(f"overrides: unknown config field {key!r}; allowed: "
                         f"{', '.join(sorted(cfg.keys()))}")
      cfg[key] = value
  configs.validate(cfg)
  _check_shapes(cfg, params)
  if quantize is not None:
    params = quant.quantize_params(params, quantize, group_size, embedding=embeddings,
                                   head=embeddings)
  return cfg, params, where, assumed, recorded


def recorded_config(src: Union[_Source, str, os.PathLike], config: ConfigArg = None):
  """The model config a checkpoint source records, by the order in the module doc.

  Returns:
    (ConfigDict or None, where it came from, the JSON dict it was read from).
  """
  if not isinstance(src, _Source):
    src = resolve_source(src, "checkpoint")
  if isinstance(config, ml_collections.ConfigDict):
    return configs.validate(config.copy_and_resolve_references()), "config argument", {}
  if config is not None:
    if str(config) in configs.names():
      return configs.get(str(config)), f"preset {config}", {}
    cfg, data = _read_model_config(Path(config))
    if cfg is None:
      raise ValueError(f"--config {config}: neither a preset ({', '.join(configs.names())}) nor "
                       "a JSON file with a model config")
    return cfg, str(config), data
  if (src.root / MODEL_CONFIG_FILE).is_file():
    cfg, data = _read_model_config(src.root / MODEL_CONFIG_FILE)
    if cfg is not None:
      return cfg, MODEL_CONFIG_FILE, data
  meta_cfg = _step_meta_config(src)
  if meta_cfg is not None:
    return meta_cfg, "checkpoint metadata", {}
  for name in _LEGACY_CONFIG_FILES:
    for d in (src.root, src.root.parent):
      if (d / name).is_file():
        cfg, data = _read_model_config(d / name)
        if cfg is not None:
          return cfg, str(d / name), data
  return None, "", {}


def _step_meta_config(src: _Source) -> Optional[ml_collections.ConfigDict]:
  """The `model_config` the trainer put in a checkpoint's metadata (the chosen or newest step)."""
  if src.ckpt is None or not src.ckpt.is_dir():
    return None
  steps = sorted(int(c.name) for c in src.ckpt.iterdir() if c.name.isdigit())
  for s in ([src.step] if src.step is not None else reversed(steps)):
    meta = _read_json_dict(src.ckpt / str(s) / "meta" / "metadata")
    model = (meta.get("extra") or {}).get("model_config")
    if isinstance(model, dict):
      return _config_from_dict(model, src.ckpt / str(s) / "meta" / "metadata")
  return None


def _config_from_dict(model: dict, path: Path) -> ml_collections.ConfigDict:
  base = configs.get("tiny")
  unknown = sorted(set(model) - set(base.keys()))
  if unknown:
    raise ValueError(f"{path}: unknown model config fields {unknown}; allowed: "
                     f"{', '.join(sorted(base.keys()))}")
  base.update(model)
  try:
    return configs.validate(base)
  except ValueError as err:
    raise ValueError(f"{path}: {err}") from None


def _read_model_config(path: Path) -> tuple[Optional[ml_collections.ConfigDict], dict]:
  if not path.is_file():
    raise FileNotFoundError(f"{path}: model config file does not exist")
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  model = data.get("model", data) if isinstance(data, dict) else None
  if isinstance(model, dict) and "hidden_size" in model and "num_layers" in model:
    return _config_from_dict(model, path), data
  return None, data if isinstance(data, dict) else {}


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
  fills the rest). Only for old workdirs that record no config.

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


def find_tokenizer(root: Union[str, os.PathLike], path: Optional[str] = None,
                   recorded: Optional[dict] = None):
  """The tokenizer of a model directory (see the module doc for the search order)."""
  from baichuan_jax.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  if path is not None:
    return Tokenizer(path)
  root = Path(root)
  recorded = dict(recorded or {})
  if not recorded:
    recorded = _read_json_dict(root / "summary.json")
  candidates = [root / TOKENIZER_FILE, root.parent / TOKENIZER_FILE]
  for section in (recorded, recorded.get("data", {})):
    for key in _TOKENIZER_KEYS:
      if isinstance(section, dict) and isinstance(section.get(key), str):
        candidates.append(Path(section[key]))
  for d in (root, root / "tokenizer"):
    if d.is_dir():
      candidates.extend(sorted(d.glob("*.model")))
  for c in candidates:
    if c.is_file():
      return Tokenizer(c)
  raise FileNotFoundError(f"no tokenizer found for {root} (looked for {TOKENIZER_FILE} there and "
                          "in its parent, the tokenizer_path of summary.json, and *.model); pass "
                          "--tokenizer PATH")
