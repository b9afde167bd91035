"""Hugging Face Baichuan checkpoints: import (`load`) and export (`save`), tensor by tensor.

A Baichuan-format directory holds `config.json` and the weights as `*.safetensors` or
`pytorch_model*.bin`, either one file or shards listed by `model.safetensors.index.json` /
`pytorch_model.bin.index.json`. Names and layouts are those of the released HF code (torch
`Linear` weights are [out, in]):

  HF tensor                                     HF shape      ours (params tree)           our shape
  model.embed_tokens.weight                     [V, E]        embed_tokens                 [V, E]
  model.layers.{i}.input_layernorm.weight       [E]           layers/input_layernorm/weight  [L, E]
  model.layers.{i}.self_attn.W_pack.weight      [3E, E]       layers/self_attn/W_pack/kernel [L, E, 3, H, D]
  model.layers.{i}.self_attn.o_proj.weight      [E, E]        layers/self_attn/o_proj/kernel [L, H, D, E]
  model.layers.{i}.post_attention_layernorm.weight [E]        layers/post_attention_layernorm/weight [L, E]
  model.layers.{i}.mlp.gate_proj.weight         [F, E]        layers/mlp/gate_proj/kernel  [L, E, F]
  model.layers.{i}.mlp.up_proj.weight           [F, E]        layers/mlp/up_proj/kernel    [L, E, F]
  model.layers.{i}.mlp.down_proj.weight         [E, F]        layers/mlp/down_proj/kernel  [L, F, E]
  model.norm.weight                             [E]           norm/weight                  [E]
  lm_head.weight                                [V, E]        lm_head                      [E, V]

Exporting (`save`, `python -m baichuan_jax.hf convert SRC DST`) writes a complete Hugging Face
directory: the weights (plus Baichuan-7B's persistent `rotary_emb.inv_freq` buffers), config.json
with the family's `architectures` name and `auto_map`, generation_config.json, the tokenizer files
and the project's own remote code (`baichuan_jax/hf_code/`), so transformers' Auto classes load it
with `trust_remote_code=True`; `fmt="llama"` writes a plain LLaMA checkpoint for RoPE models.
docs/hf.md lists the files and the differences from the released code.

Loading streams: each output parameter is allocated once and filled slice by slice (a layer, or
a block of rows of a large matrix) straight from the file, so peak host memory is the loaded
parameters plus a bounded scratch buffer. Safetensors files are read with plain positional reads
(no memory map, whose touched pages would count as resident memory); `.bin` files are memory-mapped
by `torch.load(..., weights_only=True, mmap=True)` and the pages of each tensor are handed back to
the kernel once it is copied.

Position scheme (not a field of the released configs), decided in this order:
  1. the `position_embedding` argument ("rope" | "alibi");
  2. a `position_embedding` field in config.json (written by `save`);
  3. `max_position_embeddings` present -> "rope" (the 7B modelling code sizes its rotary table with
     it; the 13B code never reads it);
  4. only `model_max_length` present -> "alibi" (the 13B code sizes its ALiBi mask with it);
  5. neither: 13B-shaped (hidden_size 5120 and 40 layers) -> "alibi", anything else -> "rope".
NormHead: the `norm_head` argument, else a `norm_head` field in config.json, else Baichuan 2, which
is recognised by its 125,696-token vocabulary or a `z_loss_weight` field (only Baichuan 2 configs
carry one).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import ml_collections
import ml_dtypes
import numpy as np

from baichuan_jax import configs

ARCHITECTURES = ("BaichuanForCausalLM", "BaiChuanForCausalLM")  # Baichuan-7B spells it BaiChuan
BAICHUAN2_VOCAB = 125_696
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Tensors the released code stores but that carry no learned state: RoPE inverse frequencies.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
# Rows of a large matrix copied per read: bounds the scratch buffer of a transposing copy.
_CHUNK_BYTES = 64 << 20

_ST_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")

TensorTransform = Callable[[str, np.ndarray], Any]


# ----------------------------------------------------------------------------------------------
# Name and layout mapping.


@dataclasses.dataclass(frozen=True)
class _Spec:
  """One parameter of our tree and the HF tensor(s) it comes from."""
  path: tuple[str, ...]  # key path in the params tree
  hf: str  # HF tensor name; contains "{i}" for per-layer tensors stacked on a leading axis
  hf_shape: tuple[int, ...]  # shape of one HF tensor
  view: tuple[int, ...]  # the HF tensor reshaped to this ...
  perm: tuple[int, ...]  # ... then transposed by this gives our (per-layer) layout
  layers: int  # 0 for unstacked tensors, else num_layers

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def layer_shape(self) -> tuple[int, ...]:
    return tuple(self.view[p] for p in self.perm)

  @property
  def shape(self) -> tuple[int, ...]:
    return ((self.layers,) if self.layers else ()) + self.layer_shape

  def hf_names(self) -> list[str]:
    return [self.hf.format(i=i) for i in range(self.layers)] if self.layers else [self.hf]


def _specs(cfg: ml_collections.ConfigDict) -> list[_Spec]:
  """The parameter table for `cfg`, in HF file order (embedding, layer tensors, norm, head)."""
  v, e, f, n = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  h = cfg.num_heads
  d = e // h
  if cfg.num_kv_heads != h:
    raise ValueError(f"config.num_kv_heads={cfg.num_kv_heads} is invalid for the Baichuan HF format: "
                     f"W_pack fuses full multi-head q/k/v, so it must equal num_heads={h}")
  lay = "model.layers.{i}."
  t2 = (1, 0)
  return [
      _Spec(("embed_tokens",), "model.embed_tokens.weight", (v, e), (v, e), (0, 1), 0),
      _Spec(("layers", "input_layernorm", "weight"), lay + "input_layernorm.weight", (e,), (e,), (0,), n),
      # [3E, E] rows are (q|k|v, head, head_dim): view [3, H, D, E] -> ours [E, 3, H, D].
      _Spec(("layers", "self_attn", "W_pack", "kernel"), lay + "self_attn.W_pack.weight",
            (3 * e, e), (3, h, d, e), (3, 0, 1, 2), n),
      # [E, H*D]: view [E, H, D] -> ours [H, D, E].
      _Spec(("layers", "self_attn", "o_proj", "kernel"), lay + "self_attn.o_proj.weight",
            (e, e), (e, h, d), (1, 2, 0), n),
      _Spec(("layers", "post_attention_layernorm", "weight"), lay + "post_attention_layernorm.weight",
            (e,), (e,), (0,), n),
      _Spec(("layers", "mlp", "gate_proj", "kernel"), lay + "mlp.gate_proj.weight", (f, e), (f, e), t2, n),
      _Spec(("layers", "mlp", "up_proj", "kernel"), lay + "mlp.up_proj.weight", (f, e), (f, e), t2, n),
      _Spec(("layers", "mlp", "down_proj", "kernel"), lay + "mlp.down_proj.weight", (e, f), (e, f), t2, n),
      _Spec(("norm", "weight"), "model.norm.weight", (e,), (e,), (0,), 0),
      _Spec(("lm_head",), "lm_head.weight", (v, e), (v, e), t2, 0),
  ]


def param_names(cfg: ml_collections.ConfigDict) -> dict[str, list[str]]:
  """Maps each params-tree path ("layers/mlp/up_proj/kernel") to its HF tensor names."""
  return {s.name: s.hf_names() for s in _specs(cfg)}


# ----------------------------------------------------------------------------------------------
# Config mapping.


def _check_architecture(hf: dict, file: Path) -> None:
  archs = hf.get("architectures")
  if archs is None:
    if hf.get("model_type") != "baichuan":
      raise ValueError(f"{file}: neither 'architectures' nor model_type='baichuan' is set "
                       f"(model_type={hf.get('model_type')!r}); allowed architectures: {ARCHITECTURES}")
    return
  if not isinstance(archs, list) or not any(a in ARCHITECTURES for a in archs):
    raise ValueError(f"{file}: architectures={archs!r} is not a Baichuan model; "
                     f"allowed: {list(ARCHITECTURES)}")


def infer_position_embedding(hf: dict) -> str:
  """Position scheme of a Baichuan config.json dict ("rope" | "alibi"), by the rule in the module doc."""
  if hf.get("position_embedding") in configs.POSITION_EMBEDDINGS:
    return hf["position_embedding"]
  if "max_position_embeddings" in hf:
    return "rope"
  if "model_max_length" in hf:
    return "alibi"
  if hf.get("hidden_size") == 5120 and hf.get("num_hidden_layers") == 40:
    return "alibi"
  return "rope"


def infer_norm_head(hf: dict) -> bool:
  """Whether a Baichuan config.json dict is a NormHead (Baichuan 2) model."""
  if isinstance(hf.get("norm_head"), bool):
    return hf["norm_head"]
  return hf.get("vocab_size") == BAICHUAN2_VOCAB or "z_loss_weight" in hf


def config_from_hf(hf: dict, position_embedding: str = "auto", norm_head: Optional[bool] = None,
                   file: Union[str, Path] = "config.json") -> ml_collections.ConfigDict:
  """Builds our validated config from a HF Baichuan config.json dict.

  Args:
    hf: parsed config.json.
    position_embedding: "auto" (infer), "rope" or "alibi".
    norm_head: None (infer) or an explicit bool.
    file: shown in error messages.
  Returns:
    ConfigDict with param_dtype float32 and compute dtype bfloat16 (callers may override).
  """
  file = Path(file)
  _check_architecture(hf, file)
  required = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
              "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
              "vocab_size": "vocab_size"}
  fields: dict[str, Any] = {}
  for key, ours in required.items():
    if key not in hf:
      raise ValueError(f"{file}: required field {key!r} is missing")
    fields[ours] = hf[key]
  fields["num_kv_heads"] = hf.get("num_key_value_heads", hf["num_attention_heads"])
  if position_embedding == "auto":
    position_embedding = infer_position_embedding(hf)
  elif position_embedding not in configs.POSITION_EMBEDDINGS:
    raise ValueError(f"position_embedding={position_embedding!r} is invalid; "
                     f"allowed: 'auto', {', '.join(map(repr, configs.POSITION_EMBEDDINGS))}")
  fields["position_embedding"] = position_embedding
  fields["norm_head"] = infer_norm_head(hf) if norm_head is None else bool(norm_head)
  fields["max_seq_len"] = hf.get("max_position_embeddings", hf.get("model_max_length", 4096))
  for key, ours in (("rms_norm_eps", "rms_norm_eps"), ("rope_theta", "rope_theta"),
                    ("z_loss_weight", "z_loss_weight"), ("initializer_range", "init_std"),
                    ("pad_token_id", "pad_id"), ("bos_token_id", "bos_id"),
                    ("eos_token_id", "eos_id"), ("user_token_id", "user_token_id"),
                    ("assistant_token_id", "assistant_token_id")):
    if hf.get(key) is not None:
      fields[ours] = hf[key]
  fields.setdefault("z_loss_weight", 0.0)
  for key in ("rms_norm_eps", "rope_theta", "z_loss_weight", "init_std"):
    if key in fields:
      fields[key] = float(fields[key])
  if hf.get("tie_word_embeddings"):
    raise ValueError(f"{file}: tie_word_embeddings=true is not a Baichuan layout "
                     "(embedding and head are separate tensors)")
  try:
    return configs.get("baichuan-7b", **fields)
  except ValueError as err:
    raise ValueError(f"{file}: {err}") from None


def architecture(cfg: ml_collections.ConfigDict) -> str:
  """The released class name of the family: `BaiChuanForCausalLM` for Baichuan-7B (RoPE, plain
  head), `BaichuanForCausalLM` for Baichuan-13B and both Baichuan 2 models."""
  return ARCHITECTURES[1] if cfg.position_embedding == "rope" and not cfg.norm_head else ARCHITECTURES[0]


def config_to_hf(cfg: ml_collections.ConfigDict, torch_dtype: str = "float32") -> dict:
  """HF-style config.json dict for `cfg`: what the released Baichuan configs carry (the family's
  `architectures` name, `max_position_embeddings` for RoPE models, `model_max_length` for ALiBi
  and Baichuan 2 models, `z_loss_weight` for Baichuan 2), `auto_map` to the remote code `save`
  writes, plus `position_embedding`, `norm_head` and `rope_theta` so the scheme is explicit."""
  arch = architecture(cfg)
  spelled = "BaiChuan" if arch.startswith("BaiChuan") else "Baichuan"
  hf = {
      "architectures": [arch],
      "auto_map": {"AutoConfig": f"configuration_baichuan.{spelled}Config",
                   "AutoModelForCausalLM": f"modeling_baichuan.{arch}"},
      "model_type": "baichuan",
      "hidden_act": "silu",
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_attention_heads": cfg.num_heads,
      "num_hidden_layers": cfg.num_layers,
      "vocab_size": cfg.vocab_size,
      "rms_norm_eps": cfg.rms_norm_eps,
      "initializer_range": cfg.init_std,
      "pad_token_id": cfg.pad_id,
      "bos_token_id": cfg.bos_id,
      "eos_token_id": cfg.eos_id,
      "user_token_id": cfg.user_token_id,
      "assistant_token_id": cfg.assistant_token_id,
      "tie_word_embeddings": False,
      "torch_dtype": torch_dtype,
      "use_cache": True,
      "position_embedding": cfg.position_embedding,
      "norm_head": bool(cfg.norm_head),
  }
  if cfg.position_embedding == "rope":
    hf["max_position_embeddings"] = cfg.max_seq_len
    hf["rope_theta"] = cfg.rope_theta
  if cfg.position_embedding == "alibi" or cfg.norm_head:
    hf["model_max_length"] = cfg.max_seq_len
  if cfg.norm_head or cfg.z_loss_weight:
    hf["z_loss_weight"] = cfg.z_loss_weight
  return hf


def generation_config(cfg: ml_collections.ConfigDict) -> dict:
  """generation_config.json: the ids the released chat code reads and the published chat
  sampling defaults (repetition_penalty 1.05 for Baichuan 2, 1.1 for Baichuan-13B-Chat)."""
  baichuan1_13b = cfg.position_embedding == "alibi" and not cfg.norm_head
  return {"pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
          "user_token_id": cfg.user_token_id, "assistant_token_id": cfg.assistant_token_id,
          "max_new_tokens": 2048, "temperature": 0.3, "top_k": 5, "top_p": 0.85,
          "repetition_penalty": 1.1 if baichuan1_13b else 1.05, "do_sample": True}


def tokenizer_config(cfg: ml_collections.ConfigDict) -> dict:
  """tokenizer_config.json: no BOS/EOS added (as Baichuan's), `<unk>` pads, the exported
  `tokenization_baichuan.py` (also for `fmt="llama"`: transformers' LlamaTokenizer would add a
  BOS and a dummy-prefix space that Baichuan's tokenizer does not)."""
  out = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "pad_token": "<unk>", "clean_up_tokenization_spaces": False,
         "model_max_length": cfg.max_seq_len, "sp_model_kwargs": {}}
  name = "BaiChuanTokenizer" if architecture(cfg).startswith("BaiChuan") else "BaichuanTokenizer"
  return dict(out, tokenizer_class=name,
              auto_map={"AutoTokenizer": [f"tokenization_baichuan.{name}", None]})


SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                      "pad_token": "<unk>"}


# ----------------------------------------------------------------------------------------------
# Readers: one per weight file. `tensors` maps name -> (dtype, shape); `read` returns rows.


def read_safetensors_header(path: Path) -> tuple[dict, int]:
  """(header JSON object, byte offset of the tensor data) of a safetensors file; reads only the
  header, and a length past the file (or over 100 MiB) or a non-object header is a ValueError
  naming the file."""
  size = path.stat().st_size
  with open(path, "rb") as fh:
    head = fh.read(8)
    if len(head) < 8:
      raise ValueError(f"{path}: corrupt safetensors file ({size} bytes, no header)")
    n = int.from_bytes(head, "little")
    if n > size - 8 or n > 100 << 20:
      raise ValueError(f"{path}: corrupt safetensors file (header length {n} > file size {size})")
    try:
      header = json.loads(fh.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
      raise ValueError(f"{path}: corrupt safetensors header ({err})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
  return header, 8 + n


class _SafetensorsFile:
  """Header-validated safetensors file read with positional reads into fresh buffers."""

  def __init__(self, path: Path):
    self.path = path
    header, self.data_start = read_safetensors_header(path)
    size = path.stat().st_size
    self.tensors: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    self._offsets: dict[str, int] = {}
    header.pop("__metadata__", None)
    for name, info in header.items():
      try:
        dt = _ST_DTYPES[info["dtype"]]
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: tensor {name!r}: corrupt or unsupported header entry {info!r} "
                         f"(dtypes: {sorted(_ST_DTYPES)})") from None
      if end - begin != math.prod(shape) * dt.itemsize or begin < 0:
        raise ValueError(f"{path}: tensor {name!r}: corrupt header, offsets {begin}..{end} do "
                         f"not hold {shape} {info['dtype']}")
      if self.data_start + end > size:
        raise ValueError(f"{path}: tensor {name!r}: file is truncated (needs "
                         f"{self.data_start + end} bytes, has {size})")
      self.tensors[name] = (dt, shape)
      self._offsets[name] = begin
    self._fh = None

  def read(self, name: str, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) along axis 0 of tensor `name`, as a new array in the file's dtype."""
    dt, shape = self.tensors[name]
    row = math.prod(shape[1:]) * dt.itemsize if shape else dt.itemsize
    out = np.empty(((r1 - r0),) + shape[1:] if shape else (), dt)
    if self._fh is None:
      self._fh = open(self.path, "rb")  # pylint: disable=consider-using-with
    self._fh.seek(self.data_start + self._offsets[name] + r0 * row)
    got = self._fh.readinto(out.reshape(-1).view(np.uint8)) if out.nbytes else 0
    if got != out.nbytes:
      raise ValueError(f"{self.path}: tensor {name!r}: short read ({got} of {out.nbytes} bytes); "
                       "the file changed or is truncated")
    return out

  def close(self) -> None:
    if self._fh is not None:
      self._fh.close()
      self._fh = None


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("reading pytorch_model*.bin needs torch: pip install 'baichuan-jax[torch]' "
                      "(or convert the checkpoint to safetensors elsewhere)") from None
  return torch


_LIBC = None


def _release_pages(addr: int, nbytes: int) -> None:
  """Drops the resident pages fully inside [addr, addr + nbytes) of a private file mapping.

  The tensor was already copied and is never read again, so its clean, file-backed pages can go
  back to the kernel; otherwise every page read so far would count towards resident memory.
  """
  global _LIBC
  if not sys.platform.startswith("linux"):
    return
  if _LIBC is None:
    _LIBC = ctypes.CDLL(None, use_errno=True)
  page = os.sysconf("SC_PAGE_SIZE")
  start = -(-addr // page) * page
  end = (addr + nbytes) // page * page
  if end > start:
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


class _TorchBinFile:
  """A `pytorch_model*.bin` file, memory-mapped by torch.load(weights_only=True, mmap=True)."""

  def __init__(self, path: Path):
    self.path = path
    torch = _import_torch()
    self._mmapped = True
    try:
      sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
      if "mmap" not in str(err):
        raise ValueError(f"{path}: cannot read as a torch checkpoint ({err})") from None
      # Legacy (pre-zip) serialisation cannot be memory-mapped.
      self._mmapped = False
      sd = self._load(torch, path, mmap=False)
    except Exception as err:  # pickle/zip errors of a corrupt file come in many types
      raise ValueError(f"{path}: cannot read as a torch checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
      raise ValueError(f"{path}: expected a state dict of tensors, got {type(sd).__name__}")
    self._sd = sd
    storages: dict[int, int] = {}
    for t in sd.values():
      key = t.untyped_storage().data_ptr()
      storages[key] = storages.get(key, 0) + 1
    self._shared = {k for k, c in storages.items() if c > 1}
    self.tensors = {}
    for name, t in sd.items():
      dt = str(t.dtype).removeprefix("torch.")
      self.tensors[name] = (np.dtype(ml_dtypes.bfloat16) if dt == "bfloat16" else
                            np.dtype(dt) if dt in ("float64", "float32", "float16", "int64",
                                                   "int32", "int16", "int8", "uint8", "bool")
                            else np.dtype("V1"), tuple(t.shape))

  @staticmethod
  def _load(torch, path, mmap):
    try:
      return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
      raise ValueError(f"{path}: cannot read as a torch checkpoint ({type(err).__name__}: {err})") from None

  def read(self, name: str, r0: int, r1: int) -> "_TorchRows":
    return _TorchRows(self, name, r0, r1)

  def close(self) -> None:
    self._sd = None


class _TorchRows:
  """Rows of a memory-mapped torch tensor as a numpy view; `done()` releases their pages."""

  def __init__(self, f: _TorchBinFile, name: str, r0: int, r1: int):
    t = f._sd[name]  # pylint: disable=protected-access
    rows = t[r0:r1].contiguous() if t.dim() else t.contiguous()
    self._release = (f._mmapped and rows.data_ptr() == t[r0:r1].data_ptr()  # pylint: disable=protected-access
                     and t.untyped_storage().data_ptr() not in f._shared)  # pylint: disable=protected-access
    if str(rows.dtype) == "torch.bfloat16":
      import torch  # pylint: disable=import-outside-toplevel
      self.array = rows.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
      self.array = rows.numpy()
    self._ptr, self._nbytes = rows.data_ptr(), rows.numel() * rows.element_size()

  def done(self) -> None:
    if self._release:
      _release_pages(self._ptr, self._nbytes)
    self.array = None


# ----------------------------------------------------------------------------------------------
# Loading.


def _read_json(path: Path) -> dict:
  try:
    with open(path, encoding="utf-8") as fh:
      data = json.load(fh)
  except json.JSONDecodeError as err:
    raise ValueError(f"{path}: not valid JSON ({err})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def weight_files(path: Union[str, Path]) -> list[Path]:
  """The weight files of a checkpoint directory: safetensors if present, else pytorch .bin.

  Raises:
    FileNotFoundError: no weights, or a file named by an index json is missing.
  """
  root = Path(path)
  for index_name, pattern in ((SAFETENSORS_INDEX, "*.safetensors"), (BIN_INDEX, "pytorch_model*.bin")):
    index = root / index_name
    if index.exists():
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: missing the 'weight_map' object")
      files = []
      for name in sorted(set(weight_map.values())):
        f = root / name
        if not f.exists():
          tensors = sorted(k for k, v in weight_map.items() if v == name)
          raise FileNotFoundError(f"{f}: listed in {index} (for {tensors[0]!r} and "
                                  f"{len(tensors) - 1} more tensors) but missing")
        files.append(f)
      return files
    files = sorted(root.glob(pattern))
    if files:
      return files
  raise FileNotFoundError(f"{root}: no weights found (looked for {SAFETENSORS_INDEX}, *.safetensors, "
                          f"{BIN_INDEX}, pytorch_model*.bin)")


def _index_map(root: Path) -> Optional[tuple[Path, dict]]:
  for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
    if (root / index_name).exists():
      return root / index_name, _read_json(root / index_name)["weight_map"]
  return None


def _open_files(root: Path, files: list[Path]) -> tuple[dict, list]:
  """Opens every weight file; returns (tensor name -> reader, readers)."""
  readers = []
  where: dict[str, Any] = {}
  try:
    for f in files:
      r = _SafetensorsFile(f) if f.suffix == ".safetensors" else _TorchBinFile(f)
      readers.append(r)
      for name in r.tensors:
        if name in where:
          raise ValueError(f"{f}: tensor {name!r} is also in {where[name].path}")
        where[name] = r
    index = _index_map(root)
    if index is not None:
      index_path, weight_map = index
      for name, fname in weight_map.items():
        if name not in where or where[name].path.name != fname:
          raise ValueError(f"{index_path}: says tensor {name!r} is in {root / fname}, but that file "
                           f"does not hold it")
  except BaseException:
    for r in readers:
      r.close()
    raise
  return where, readers


def _check_tensors(cfg, specs: list[_Spec], where: dict) -> None:
  """Validates names, shapes and dtypes of every tensor before any data is read."""
  expected = {}
  for s in specs:
    for name in s.hf_names():
      expected[name] = s
  missing = [n for n in expected if n not in where]
  if missing:
    files = sorted({str(r.path) for r in where.values()})
    raise ValueError(f"tensor {missing[0]!r} is missing from the checkpoint ({len(missing)} missing "
                     f"in all; files: {files}); the config asks for {cfg.num_layers} layers")
  extra = sorted(n for n in where if n not in expected and not _IGNORED.match(n))
  if extra:
    raise ValueError(f"{where[extra[0]].path}: unexpected tensor {extra[0]!r} ({len(extra)} "
                     f"unexpected in all); not part of a Baichuan model with {cfg.num_layers} layers")
  for name, s in expected.items():
    dt, shape = where[name].tensors[name]
    if shape != s.hf_shape:
      raise ValueError(f"{where[name].path}: tensor {name!r} has shape {list(shape)}, expected "
                       f"{list(s.hf_shape)} from config.json (hidden_size={cfg.hidden_size}, "
                       f"intermediate_size={cfg.intermediate_size}, vocab_size={cfg.vocab_size})")
    if dt.name not in _FLOAT_DTYPES:
      raise ValueError(f"{where[name].path}: tensor {name!r} has dtype {dt}, expected a float type")


def _fill(out: np.ndarray, spec: _Spec, reader, name: str) -> None:
  """Copies HF tensor `name` into `out` (one layer's slice in our layout), in bounded chunks."""
  rows = spec.hf_shape[0]
  if spec.view == spec.hf_shape and spec.perm in ((0,), (0, 1), (1, 0)):
    row_bytes = math.prod(spec.hf_shape[1:]) * reader.tensors[name][0].itemsize
    step = max(1, _CHUNK_BYTES // max(1, row_bytes))
  else:
    step = rows  # a reshaping layout: one layer's matrix at once (at most 3 E^2 values)
  for r0 in range(0, rows, step):
    r1 = min(rows, r0 + step)
    got = reader.read(name, r0, r1)
    arr = got.array if isinstance(got, _TorchRows) else got
    if spec.perm == (1, 0):
      np.copyto(out[:, r0:r1], arr.T, casting="unsafe")
    elif step == rows:
      np.copyto(out, arr.reshape(spec.view).transpose(spec.perm), casting="unsafe")
    else:
      np.copyto(out[r0:r1], arr, casting="unsafe")
    if isinstance(got, _TorchRows):
      got.done()
    del arr, got


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _as_dtype(dtype) -> np.dtype:
  try:
    dt = np.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or dt.name not in _FLOAT_DTYPES:
    raise ValueError(f"dtype={dtype!r} is invalid; allowed: {', '.join(configs.DTYPES)}")
  return dt


def load(path: Union[str, Path], position_embedding: str = "auto", dtype=None,
         tensor_transform: Optional[TensorTransform] = None, *, norm_head: Optional[bool] = None,
         overrides: Optional[dict] = None, progress: Optional[bool] = None):
  """Loads a Hugging Face Baichuan checkpoint directory.

  Args:
    path: directory with config.json and safetensors or pytorch_model*.bin weights (single file
      or sharded with an index json).
    position_embedding: "auto" (see the module doc for the rule), "rope" or "alibi".
    dtype: parameter dtype ("float32", "bfloat16", "float16" or a numpy/jnp dtype). None keeps
      the checkpoint's dtype (that of model.embed_tokens.weight).
    tensor_transform: `fn(name, array) -> array or pytree`, called once per finished parameter
      with its tree path ("layers/mlp/up_proj/kernel") and the stacked numpy array in our layout;
      the result is what is kept (e.g. a quantised weight), so the full-precision array can be
      freed before the next parameter is read.
    norm_head: None infers NormHead (Baichuan 2), True/False forces it.
    overrides: extra config fields to set (e.g. {"dtype": "float32"} for fp32 compute).
    progress: show a progress bar (None: only on a terminal).
  Returns:
    (config, params): the validated ConfigDict (param_dtype = the loaded dtype) and a nested dict
    of host numpy arrays laid out as `init_params` returns them, e.g. layers/self_attn/W_pack/kernel
    [layers, hidden, 3, heads, head_dim]. Put them on devices with `jax.device_put`.
  Raises:
    FileNotFoundError: missing directory, config.json or weights.
    ValueError: unknown architecture, missing/extra tensors, wrong shapes, corrupt files (the
      message names the file and the tensor). Nothing is returned in that case.
  """
  root = Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: checkpoint directory does not exist")
  cfg_file = root / "config.json"
  if not cfg_file.exists():
    raise FileNotFoundError(f"{cfg_file}: missing (a Baichuan checkpoint directory needs config.json)")
  hf_cfg = _read_json(cfg_file)
  from baichuan_jax import hf_config_check  # pylint: disable=import-outside-toplevel
  hf_config_check.check_checkpoint(root, hf_cfg, cfg_file)  # config vs files, before allocating
  cfg = config_from_hf(hf_cfg, position_embedding, norm_head, cfg_file)
  specs = _specs(cfg)
  where, readers = _open_files(root, weight_files(root))
  try:
    _check_tensors(cfg, specs, where)
    out_dtype = _as_dtype(dtype) if dtype is not None else where["model.embed_tokens.weight"].tensors[
        "model.embed_tokens.weight"][0]
    if out_dtype.name not in configs.DTYPES:
      out_dtype = np.dtype(np.float32)
    cfg.param_dtype = out_dtype.name
    for key, value in (overrides or {}).items():
      if key == "param_dtype" and value != cfg.param_dtype:
        raise ValueError(f"overrides: param_dtype={value!r} conflicts with the loaded dtype "
                         f"{cfg.param_dtype!r}; pass dtype={value!r} instead")
      if key not in cfg:
        raise ValueError(f"overrides: unknown config field {key!r}; allowed: {', '.join(sorted(cfg.keys()))}")
      cfg[key] = value
    configs.validate(cfg)
    params: dict = {}
    for spec in _progress(specs, progress, root):
      out = np.empty(spec.shape, out_dtype)
      for i, name in enumerate(spec.hf_names()):
        _fill(out[i] if spec.layers else out, spec, where[name], name)
      value = out if tensor_transform is None else tensor_transform(spec.name, out)
      del out
      _set(params, spec.path, value)
  finally:
    for r in readers:
      r.close()
  return cfg, params


def _progress(items: list, enabled: Optional[bool], root: Path) -> Iterable:
  try:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return items
  disable = None if enabled is None else not enabled
  return tqdm(items, desc=f"loading {root.name}", unit="param", disable=disable)


# ----------------------------------------------------------------------------------------------
# Saving.


def _parse_size(size: Union[int, str]) -> int:
  if isinstance(size, int) and size > 0:
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.I)
  if not m:
    raise ValueError(f"shard_size={size!r} is invalid: use bytes (int) or e.g. '2GB', '500MB'")
  unit = (m.group(2) or "B").upper()
  mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
  return int(float(m.group(1)) * mult)


def _get(tree, path: tuple[str, ...]):
  node = tree
  for key in path:
    if not isinstance(node, dict) or key not in node:
      raise ValueError(f"params: missing {'/'.join(path)!r}")
    node = node[key]
  return node


def _leaf_paths(tree, prefix=()) -> list[tuple[str, ...]]:
  if isinstance(tree, dict):
    return [p for k, v in tree.items() for p in _leaf_paths(v, prefix + (k,))]
  return [prefix]


def _write_safetensors(file: Path, tensors: list[tuple[str, Callable[[], np.ndarray], np.dtype, tuple]]) -> None:
  """Writes one safetensors file, producing each tensor's bytes only when it is written."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, _, dt, shape in tensors:
    nbytes = math.prod(shape) * dt.itemsize
    header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
  tmp = file.with_name(file.name + ".tmp")
  with open(tmp, "wb") as fh:
    fh.write(len(blob).to_bytes(8, "little"))
    fh.write(blob)
    for name, make, dt, shape in tensors:
      arr = np.ascontiguousarray(make(), dtype=dt)
      if sys.byteorder != "little":
        arr = arr.byteswap()
      fh.write(arr.reshape(-1).view(np.uint8).data)
  os.replace(tmp, file)


FORMATS = ("baichuan", "llama")
_Entry = tuple  # (HF tensor name, make() -> array, dtype, HF shape)


def save(config: ml_collections.ConfigDict, params, path: Union[str, Path],
         shard_size: Union[int, str] = "2GB", dtype=None, overwrite: bool = False, *,
         tokenizer: Optional[Union[str, Path]] = None, fmt: str = "baichuan") -> list[Path]:
  """Writes `params` as a complete Hugging Face checkpoint directory (see docs/hf.md).

  `fmt="baichuan"`: the released Baichuan layout (fused `W_pack`; NormHead weights as trained, the
  normalisation stays in the forward pass as in the released Baichuan 2 code; Baichuan-7B's
  `rotary_emb.inv_freq` buffers), `config.json` with `auto_map`, `generation_config.json` and the
  project's own `configuration_/modeling_/tokenization_baichuan.py`, so it loads with
  `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` and in the released classes.
  `fmt="llama"` (RoPE models only): q/k/v split out of `W_pack` and NormHead folded into the head
  (rows normalised: exact at inference), loading in plain `transformers.LlamaForCausalLM`.

  Args:
    config: the model config (validated; num_kv_heads must equal num_heads).
    params: the tree `init_params`/`load` return (numpy or jax arrays; jax arrays are copied to
      the host one tensor at a time).
    path: output directory (created if needed).
    shard_size: largest shard in bytes (int, or "2GB", "500MiB"); more data than this gives
      `model-0000k-of-0000n.safetensors` shards and `model.safetensors.index.json`.
    dtype: cast to this dtype on the way out (e.g. "bfloat16"); None keeps each parameter's dtype.
    overwrite: replace an existing checkpoint in `path` (otherwise an error).
    tokenizer: the SentencePiece `tokenizer.model` to ship (with tokenizer_config.json and
      special_tokens_map.json); None writes no tokenizer files.
    fmt: "baichuan" or "llama".
  Returns:
    The files written.
  """
  configs.validate(config)
  if fmt not in FORMATS:
    raise ValueError(f"fmt={fmt!r} is invalid; allowed: {', '.join(FORMATS)}")
  if fmt == "llama" and config.position_embedding != "rope":
    raise ValueError("fmt='llama' needs a RoPE model (Baichuan-7B, Baichuan2-7B); this config has "
                     f"position_embedding={config.position_embedding!r}, which LLaMA cannot express")
  if tokenizer is not None and not Path(tokenizer).is_file():
    raise FileNotFoundError(f"tokenizer={str(tokenizer)!r}: no such SentencePiece model file")
  if config.position_embedding == "rope" and config.rope_theta != 10000.0 and fmt == "baichuan":
    import warnings  # pylint: disable=import-outside-toplevel
    warnings.warn(f"rope_theta={config.rope_theta} is exported, but the released Baichuan code "
                  "hard-codes RoPE base 10000 and ignores it: there this model gives different "
                  "logits (the remote code written here and fmt='llama' honour it)", stacklevel=2)
  specs = _specs(config)
  out_dt = None if dtype is None else _as_dtype(dtype)
  _check_params(specs, params, out_dt)
  entries = _llama_entries(config, specs, params, out_dt) if fmt == "llama" else \
      _baichuan_entries(config, specs, params, out_dt)
  root = Path(path)
  written = _write_weights(root, entries, _parse_size(shard_size), overwrite)
  torch_dtype = (out_dt or np.dtype(_get(params, ("embed_tokens",)).dtype)).name
  return written + _write_metadata(root, config, torch_dtype, fmt, tokenizer)


def _check_params(specs: list[_Spec], params, out_dt) -> None:
  known = {s.path for s in specs}
  extra = [p for p in _leaf_paths(params) if p not in known]
  if extra:
    raise ValueError(f"params: unexpected entry {'/'.join(extra[0])!r}; a Baichuan checkpoint holds "
                     f"{sorted(s.name for s in specs)}")
  for spec in specs:
    value = _get(params, spec.path)
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
      raise ValueError(f"params: {spec.name!r} is a {type(value).__name__}, not an array "
                       "(quantised or transformed trees cannot be exported)")
    if tuple(value.shape) != spec.shape:
      raise ValueError(f"params: {spec.name!r} has shape {list(value.shape)}, expected "
                       f"{list(spec.shape)} for this config")
    dt = out_dt or np.dtype(value.dtype)
    if dt.name not in _FLOAT_DTYPES:
      raise ValueError(f"params: {spec.name!r} has dtype {dt}, expected a float type")


def _hf_tensors(spec: _Spec, params, out_dt) -> list[_Entry]:
  """One spec's HF tensors (one per layer for stacked parameters), produced lazily."""
  value = _get(params, spec.path)
  dt = out_dt or np.dtype(value.dtype)
  inv = tuple(np.argsort(spec.perm))
  out = []
  for i, name in enumerate(spec.hf_names()):
    def make(value=value, i=i if spec.layers else None, spec=spec, inv=inv):
      x = np.asarray(value if i is None else value[i])
      return x.transpose(inv).reshape(spec.hf_shape)
    out.append((name, make, dt, spec.hf_shape))
  return out


def _rope_inv_freq(cfg) -> np.ndarray:
  d = cfg.hidden_size // cfg.num_heads
  return (1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))).astype(np.float32)


def _baichuan_entries(cfg, specs: list[_Spec], params, out_dt) -> list[_Entry]:
  entries = [e for spec in specs for e in _hf_tensors(spec, params, out_dt)]
  if architecture(cfg) == ARCHITECTURES[1]:  # Baichuan-7B: persistent RoPE buffers, fp32
    inv = _rope_inv_freq(cfg)
    entries += [(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", lambda inv=inv: inv,
                 np.dtype(np.float32), inv.shape) for i in range(cfg.num_layers)]
  return entries


def _llama_entries(cfg, specs: list[_Spec], params, out_dt) -> list[_Entry]:
  """LLaMA names: W_pack rows split into q/k/v; a NormHead folded (rows normalised in fp32)."""
  e = cfg.hidden_size
  entries = []
  for name, make, dt, shape in (x for spec in specs for x in _hf_tensors(spec, params, out_dt)):
    if name.endswith("self_attn.W_pack.weight"):
      pre = name[: -len("W_pack.weight")]
      for k, part in enumerate(("q_proj", "k_proj", "v_proj")):
        entries.append((pre + part + ".weight", lambda make=make, k=k: make()[k * e:(k + 1) * e],
                        dt, (e, e)))
    elif name == "lm_head.weight" and cfg.norm_head:
      def folded(make=make):
        w = np.asarray(make(), np.float32)
        return w / np.linalg.norm(w, axis=1, keepdims=True)
      entries.append((name, folded, dt, shape))
    else:
      entries.append((name, make, dt, shape))
  return entries


def _write_weights(root: Path, entries: list[_Entry], limit: int, overwrite: bool) -> list[Path]:
  """Shards `entries` (a layer's tensors together) into safetensors files under `root`."""
  # Baichuan's files keep a layer's tensors together: order by layer, then the table order.
  layer_of = lambda e: int(e[0].split(".")[2]) if e[0].startswith("model.layers.") else (
      -1 if e[0] == "model.embed_tokens.weight" else 1 << 30)
  entries = sorted(entries, key=layer_of)
  shards: list[list] = [[]]
  size = 0
  for e in entries:
    nbytes = math.prod(e[3]) * e[2].itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += nbytes
  root.mkdir(parents=True, exist_ok=True)
  existing = [p for p in root.iterdir() if p.name.endswith((".safetensors", ".bin"))
              or p.name in (SAFETENSORS_INDEX, BIN_INDEX)]
  if existing:
    if not overwrite:
      raise FileExistsError(f"{root}: already holds a checkpoint ({existing[0].name}); pass "
                            "overwrite=True to replace it")
    for p in existing:
      p.unlink()
  n = len(shards)
  names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
  written = []
  for fname, shard in zip(names, shards):
    _write_safetensors(root / fname, shard)
    written.append(root / fname)
  if n > 1:
    index = {"metadata": {"total_size": sum(math.prod(e[3]) * e[2].itemsize for e in entries)},
             "weight_map": {e[0]: fname for fname, shard in zip(names, shards) for e in shard}}
    (root / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    written.append(root / SAFETENSORS_INDEX)
  return written


def llama_config(cfg: ml_collections.ConfigDict, torch_dtype: str = "float32") -> dict:
  """config.json of a `fmt="llama"` export (plain transformers LlamaForCausalLM)."""
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
          "num_hidden_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
          "head_dim": cfg.hidden_size // cfg.num_heads, "rms_norm_eps": cfg.rms_norm_eps,
          "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
          "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
          "initializer_range": cfg.init_std, "pad_token_id": cfg.pad_id, "bos_token_id": cfg.bos_id,
          "eos_token_id": cfg.eos_id, "torch_dtype": torch_dtype, "use_cache": True}


def _write_json(path: Path, data: dict) -> Path:
  path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  return path


def _write_metadata(root: Path, cfg, torch_dtype: str, fmt: str, tokenizer) -> list[Path]:
  """config.json, generation_config.json, remote code (baichuan format) and tokenizer files."""
  import shutil  # pylint: disable=import-outside-toplevel
  hf_cfg = llama_config(cfg, torch_dtype) if fmt == "llama" else config_to_hf(cfg, torch_dtype)
  written = [_write_json(root / "config.json", hf_cfg),
             _write_json(root / "generation_config.json", generation_config(cfg))]
  from baichuan_jax import hf_code  # pylint: disable=import-outside-toplevel
  code = list(hf_code.FILES) if fmt == "baichuan" else []
  if tokenizer is not None:
    dst = root / "tokenizer.model"
    if Path(tokenizer).resolve() != dst.resolve():
      shutil.copyfile(tokenizer, dst)
    written += [dst, _write_json(root / "tokenizer_config.json", tokenizer_config(cfg)),
                _write_json(root / "special_tokens_map.json", SPECIAL_TOKENS_MAP)]
    code = code or ["tokenization_baichuan.py"]
  for name in code:
    shutil.copyfile(Path(hf_code.__file__).with_name(name), root / name)
    written.append(root / name)
  return written


# ----------------------------------------------------------------------------------------------
# Command line.


def _inspect(args) -> None:
  root = Path(args.path)
  cfg_file = root / "config.json"
  if not cfg_file.exists():
    raise FileNotFoundError(f"{cfg_file}: missing")
  hf = _read_json(cfg_file)
  cfg = config_from_hf(hf, args.position_embedding, args.norm_head, cfg_file)
  files = weight_files(root)
  where, readers = _open_files(root, files)
  try:
    _check_tensors(cfg, _specs(cfg), where)
  finally:
    for r in readers:
      r.close()
  total = sum(f.stat().st_size for f in files)
  n = configs.param_counts(cfg)["total"]
  dts = sorted({str(r.tensors[k][0]) for k, r in where.items()})
  print(f"checkpoint   {root}")
  print(f"files        {len(files)} ({', '.join(f.name for f in files[:3])}{' ...' if len(files) > 3 else ''}),"
        f" {total / 1e9:.2f} GB, dtype {'/'.join(dts)}")
  print(f"parameters   {n:,} (all {len(where)} tensors present, shapes match config.json)")
  print(f"positions    {cfg.position_embedding}" + ("" if args.position_embedding != "auto" else
                                                   " (inferred)"))
  print(f"head         {'NormHead' if cfg.norm_head else 'plain'}")
  for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
              "max_seq_len", "rms_norm_eps", "z_loss_weight"):
    print(f"{key:<12} {cfg[key]}")


def _convert(args) -> None:
  from baichuan_jax.infer import loading  # pylint: disable=import-outside-toplevel
  src = loading.resolve_source(args.src)
  tok = args.tokenizer
  if src.kind == "hf":
    cfg, params = load(args.src, args.position_embedding, args.dtype, norm_head=args.norm_head,
                       progress=True)
    if tok is None and (src.root / "tokenizer.model").is_file():
      tok = src.root / "tokenizer.model"
  else:  # a training workdir or checkpoint step: its recorded config and tokenizer
    model = loading.load_model(path=args.src, tokenizer=tok, device_put=False,
                               position_embedding=args.position_embedding)
    cfg, params, tok = model.cfg, model.params, model.tokenizer.path
    if args.dtype:
      cfg.param_dtype = args.dtype
  files = save(cfg, params, args.dst, shard_size=args.shard_size, dtype=args.dtype,
               overwrite=args.overwrite, tokenizer=tok, fmt=args.format)
  print(f"wrote {len(files)} files to {args.dst}")


def main(argv: Optional[list[str]] = None) -> None:
  """`python -m baichuan_jax.hf {inspect,convert}`."""
  parser = argparse.ArgumentParser(
      prog="python -m baichuan_jax.hf",
      description="Inspect or convert Hugging Face Baichuan checkpoints (safetensors or "
                  "pytorch_model*.bin, single or sharded).")
  sub = parser.add_subparsers(dest="command", required=True)

  def common(p):
    p.add_argument("--position-embedding", default="auto", choices=["auto", "rope", "alibi"],
                   help="override the inferred position scheme (default: auto)")
    p.add_argument("--norm-head", default=None, type=lambda s: s.lower() in ("1", "true", "yes"),
                   help="force NormHead on/off (default: inferred; Baichuan 2 has it)")

  p = sub.add_parser("inspect", help="validate a checkpoint and print its config, without loading it")
  p.add_argument("path", help="checkpoint directory")
  common(p)
  p.set_defaults(fn=_inspect)
  p = sub.add_parser("convert", help="write a complete Hugging Face directory from a checkpoint or "
                                     "a training workdir (e.g. .bin -> safetensors, fp32 -> bf16)")
  p.add_argument("src", help="source: HF checkpoint directory, training workdir or checkpoint step")
  p.add_argument("--format", default="baichuan", choices=list(FORMATS),
                 help="baichuan: the released layout + remote code (default); llama: plain "
                      "LlamaForCausalLM (RoPE models only)")
  p.add_argument("--tokenizer", default=None,
                 help="tokenizer.model to ship (default: the source's)")
  p.add_argument("dst", help="output directory")
  p.add_argument("--dtype", default=None, choices=list(configs.DTYPES),
                 help="output dtype (default: keep the source's)")
  p.add_argument("--shard-size", default="2GB", help="largest shard, e.g. 2GB or 500MB (default 2GB)")
  p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in dst")
  common(p)
  p.set_defaults(fn=_convert)
  args = parser.parse_args(argv)
  try:
    args.fn(args)
  except (ValueError, FileNotFoundError, FileExistsError) as err:
    parser.exit(1, f"error: {err}\n")


if __name__ == "__main__":
  main()
