"""Checks a Hugging Face checkpoint's config.json against its files before anything is allocated.

`baichuan_jax.hf.load` trusts config.json for every size it allocates. A 1 KB config with
`num_hidden_layers=10**7` used to spend minutes and gigabytes building tensor lists before failing,
and `max_position_embeddings=10**15` loaded fine and made the first generation request allocate a
KV cache for 10^15 positions. `check_checkpoint(root, hf)` runs first and reads only small things:
the index json, the safetensors headers (8 bytes + a JSON header per file) and the file sizes.

What it checks, each failure naming the file and the field:

* Types: every size field is an integer (not a bool or a string: `"hidden_size": "256"`), every
  float field a finite number.
* Bounds: sizes positive; `max_position_embeddings` / `model_max_length` at most `MAX_CONTEXT`
  positions (Baichuan: 4096; 1M positions covers every long-context variant released so far).
* Index paths: every file named by `*.index.json` is a relative path inside the checkpoint folder
  (no absolute paths, no `..`, no symlink leading out), so an index cannot make the loader open
  `/etc/...` or another model's files.
* Against the tensors: `num_hidden_layers` may not exceed the distinct layers present
  (`model.layers.<i>.` in the safetensors headers or the index; extra or missing single tensors
  are named by the loader's own check after this one); `model.embed_tokens.weight` must be
  `[vocab_size, hidden_size]` and layer 0's `mlp.gate_proj.weight` `[intermediate_size,
  hidden_size]`.
* Against the bytes (also for unindexed pytorch .bin files, whose names need unpickling): the
  parameters the config implies, at 1 byte each (the smallest dtype a Baichuan release uses is 2),
  cannot exceed the total size of the weight files.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

MAX_CONTEXT = 1 << 20
INT_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
              "vocab_size", "num_key_value_heads", "max_position_embeddings", "model_max_length")
ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "user_token_id",
             "assistant_token_id")
FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "z_loss_weight", "initializer_range")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _fail(file: Path, field: str, value: Any, allowed: str) -> None:
  raise ValueError(f"{file}: {field}={value!r} is invalid: {allowed}")


def check_fields(hf: dict, file: Union[str, Path] = "config.json") -> None:
  """Types and bounds of the numeric fields of a config.json dict (see the module docstring)."""
  file = Path(file)
  if not isinstance(hf, dict):
    raise ValueError(f"{file}: expected a JSON object, got {type(hf).__name__}")
  for field in INT_FIELDS:
    if hf.get(field) is None:
      continue
    v = hf[field]
    if isinstance(v, bool) or not isinstance(v, int):
      _fail(file, field, v, "must be an integer")
    if v <= 0:
      _fail(file, field, v, "must be a positive integer")
  for field in ID_FIELDS:
    v = hf.get(field)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
      _fail(file, field, v, "must be an integer >= 0 (or null)")
  for field in FLOAT_FIELDS:
    v = hf.get(field)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                          or not math.isfinite(v)):
      _fail(file, field, v, "must be a finite number")
  for field in ("max_position_embeddings", "model_max_length"):
    v = hf.get(field)
    if v is not None and v > MAX_CONTEXT:
      _fail(file, field, v, f"a context of more than {MAX_CONTEXT:,} positions is not supported "
            "(Baichuan models use 4096); the KV cache and position tables are sized from it")


def confined_index(root: Union[str, Path]) -> Optional[tuple[Path, dict]]:
  """(index file, weight_map) of the checkpoint's index json, every path checked to stay inside
  `root`; None if there is no index.

  Raises:
    ValueError: malformed index, or a shard path outside the checkpoint folder.
  """
  root = Path(root)
  real_root = os.path.realpath(root)
  for name in INDEX_FILES:
    index = root / name
    if not index.exists():
      continue
    try:
      weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
      raise ValueError(f"{index}: not a valid index json ({e})") from None
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: missing the 'weight_map' object")
    for tensor, shard in weight_map.items():
      if not isinstance(shard, str) or not shard:
        raise ValueError(f"{index}: weight_map[{tensor!r}]={shard!r} is not a file name")
      target = os.path.realpath(os.path.join(real_root, shard))
      if (os.path.isabs(shard) or ".." in Path(shard).parts
          or os.path.commonpath([real_root, target]) != real_root):
        raise ValueError(f"{index}: weight_map[{tensor!r}]={shard!r} points outside the "
                         f"checkpoint folder {root}; shard paths must be files inside it")
    return index, weight_map
  return None


def _safetensors_shapes(path: Path) -> dict[str, tuple]:
  """{tensor name: shape} from a safetensors header (reads only the header)."""
  from baichuan_jax.hf import read_safetensors_header  # pylint: disable=import-outside-toplevel
  header, _ = read_safetensors_header(path)
  header.pop("__metadata__", None)
  return {k: tuple(v.get("shape", ())) for k, v in header.items() if isinstance(v, dict)}


def _weight_files(root: Path, index: Optional[tuple[Path, dict]]) -> list[Path]:
  if index is not None:
    return sorted({root / f for f in index[1].values() if (root / f).exists()})
  files = sorted(root.glob("*.safetensors"))
  return files or sorted(root.glob("pytorch_model*.bin"))


def _implied_params(hf: dict) -> int:
  """Parameters a Baichuan config.json implies (embedding, layers, head)."""
  h, inter = hf["hidden_size"], hf["intermediate_size"]
  heads = hf["num_attention_heads"]
  kv = hf.get("num_key_value_heads") or heads
  head_dim = h // heads if heads else 0
  per_layer = h * (heads + 2 * kv) * head_dim + heads * head_dim * h + 3 * h * inter + 2 * h
  return 2 * hf["vocab_size"] * h + hf["num_hidden_layers"] * per_layer + h


def check_checkpoint(root: Union[str, Path], hf: dict,
                     file: Union[str, Path, None] = None) -> None:
  """Every check of the module docstring, for checkpoint folder `root` and its config dict `hf`.

  Cost: the index json, one header per safetensors file, file sizes; no tensor data, nothing
  proportional to the sizes config.json claims.

  Raises:
    ValueError: naming the file, the field and what the files actually hold.
  """
  root = Path(root)
  file = Path(file) if file is not None else root / "config.json"
  check_fields(hf, file)
  index = confined_index(root)
  needed = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
            "vocab_size")
  if any(hf.get(k) is None for k in needed):
    return  # the config reader reports the missing field
  files = _weight_files(root, index)
  shapes: dict[str, tuple] = {}
  for f in files:
    if f.suffix == ".safetensors":
      shapes.update(_safetensors_shapes(f))
  names = set(shapes) | (set(index[1]) if index is not None else set())
  layers = hf["num_hidden_layers"]
  if names:
    present = sorted({int(m.group(1)) for m in map(_LAYER.match, names) if m})
    # More layers claimed than present is what allocates from the claim; fewer claimed (extra
    # tensors) or a gap is reported by the loader's own tensor check, naming the tensor.
    if layers > len(present):
      have = (f"layers {present[0]}..{present[-1]} ({len(present)} distinct)" if present
              else "no layer tensors")
      _fail(file, "num_hidden_layers", layers,
            f"the checkpoint's tensors hold {have}; expected model.layers.0 .. "
            f"model.layers.{layers - 1}")
  h, vocab, inter = hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"]
  for tensor, want, fields in (
      ("model.embed_tokens.weight", (vocab, h), "vocab_size, hidden_size"),
      ("model.layers.0.mlp.gate_proj.weight", (inter, h), "intermediate_size, hidden_size")):
    if tensor in shapes and shapes[tensor] != want:
      raise ValueError(f"{file}: ({fields}) = {want} but {tensor} has shape "
                       f"{list(shapes[tensor])} in the weight files")
  total = sum(f.stat().st_size for f in files)
  implied = _implied_params(hf)
  if files and implied > total:
    raise ValueError(f"{file}: the config implies {implied:,} parameters, more than the "
                     f"{total:,} bytes of weight files hold even at 1 byte each "
                     f"(num_hidden_layers={layers}, hidden_size={h}, "
                     f"intermediate_size={inter}, vocab_size={vocab})")
