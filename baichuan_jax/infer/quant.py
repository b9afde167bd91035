"""Weight-only int8 / int4 quantization of the linear layers (optionally the embedding and head).

A quantized weight is a `QuantizedTensor` pytree stored in the params tree in place of the
full-precision array, so the rest of the tree (and the checkpoint / sharding code that walks it)
keeps its shape. Every matrix is viewed as [..., in, out] (leading layer axis kept, the contracted
input axes flattened to `in`, the output axes flattened to `out`):

* int8: one fp32 scale per output channel, `absmax(W[:, o]) / 127` (the per-row absmax of the
  torch [out, in] weight, as Baichuan's released int8 models); q = round(W / scale) in [-127, 127].
* int4: one fp16 scale per group of `group_size` consecutive input rows and output channel,
  `absmax / 7`; q in [-7, 7] is stored two per byte (uint8; input row 2i in the low nibble,
  2i+1 in the high nibble), so the stored matrix is [..., in / 2, out].

Dequantization happens at the point of use, inside the jitted forward pass: `BaichuanLM`'s dense
layers call `QuantizedTensor.contract`, which converts the integer weight to the compute dtype
right before the matmul (int8 applies its per-channel scale to the matmul output instead, since a
per-column scale commutes with the contraction). A scanned layer stack slices the pytree per layer,
so at most one layer's weights exist in the compute dtype at a time.

`tensor_transform(kind)` plugs into `baichuan_jax.hf.load(..., tensor_transform=...)` and
quantizes each stacked tensor as soon as it is read (layer by layer, in numpy), so a 13B model
never holds its bf16 copy in memory. `quantize_params` does the same for a params tree in memory
and works under `jax.eval_shape` (the memory table in docs/inference.md is computed that way).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 128

# Number of contracted (input) axes of each dense kernel, after the leading layer axis.
_IN_AXES = {"W_pack": 1, "q_proj": 1, "kv_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
            "down_proj": 1}


@flax.struct.dataclass
class QuantizedTensor:
  """An integer weight [..., in, out] (int8, or int4 packed two per byte) with its scales."""
  q: Any  # int8 [..., in, out] or uint8 [..., in // 2, out]
  scale: Any  # fp32 [..., 1, out] (int8) or fp16 [..., in // group_size, out] (int4)
  bits: int = flax.struct.field(pytree_node=False)
  in_shape: tuple = flax.struct.field(pytree_node=False)  # unflattened input axes
  out_shape: tuple = flax.struct.field(pytree_node=False)  # unflattened output axes
  group_size: int = flax.struct.field(pytree_node=False, default=0)
  # True for the embedding: the stored matrix is the transpose [E, V] of the [V, E] table, so
  # that "output channel" means one vocabulary row and its scale applies to the whole row.
  transposed: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def nbytes(self) -> int:
    """Stored bytes (integer weights plus scales)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in (self.q, self.scale))

  def int_values(self) -> jax.Array:
    """The signed integer weights [..., in, out] as int8 (unpacks int4)."""
    if self.bits == 8:
      return jnp.asarray(self.q)
    return unpack_int4(jnp.asarray(self.q))

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The weight in its original layout (e.g. [layers, E, 3, H, D]) and `dtype`."""
    w = _dequantize_2d(self, dtype)
    lead = w.shape[:-2]
    w = w.reshape(*lead, *self.in_shape, *self.out_shape)
    return jnp.swapaxes(w, -1, -2) if self.transposed else w

  def contract(self, x: jax.Array, num_axes: int, dtype, out_dtype=None) -> jax.Array:
    """`x @ W` over the last `num_axes` axes of x, as `nn.DenseGeneral` would compute it.

    Args:
      x: [..., *in_shape] activations.
      num_axes: how many trailing axes of x are contracted (must equal len(in_shape)).
      dtype: compute dtype of the matmul.
      out_dtype: result dtype (default `dtype`); the matmul accumulates in fp32.
    Returns:
      [..., *out_shape] in `out_dtype`.
    """
    if num_axes != len(self.in_shape) or tuple(x.shape[-num_axes:]) != tuple(self.in_shape):
      raise ValueError(f"quantized kernel expects inputs [..., {self.in_shape}], got {x.shape} "
                       f"contracting {num_axes} axes")
    if self.q.ndim != 2:
      raise ValueError(f"quantized kernel must be 2-d inside the layer, got q {self.q.shape}")
    batch = x.shape[:-num_axes]
    x2 = x.reshape(*batch, math.prod(self.in_shape)).astype(dtype)
    if self.bits == 8:
      # [..., in] x [in, out] -> [..., out]; the per-output-channel scale commutes with the sum.
      y = jnp.einsum("...i,io->...o", x2, self.q.astype(dtype), preferred_element_type=jnp.float32)
      y = y * self.scale[0].astype(jnp.float32)
    else:
      # [..., in] x [in, out] -> [..., out] with the group-wise dequantized weight.
      y = jnp.einsum("...i,io->...o", x2, _dequantize_2d(self, dtype),
                     preferred_element_type=jnp.float32)
    return y.astype(out_dtype or dtype).reshape(*batch, *self.out_shape)


def is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedTensor)


def _dequantize_2d(t: QuantizedTensor, dtype) -> jax.Array:
  """[..., in, out] weight in `dtype` (the flattened 2-d view)."""
  vals = t.int_values()
  if t.bits == 8:
    return (vals.astype(jnp.float32) * t.scale.astype(jnp.float32)).astype(dtype)
  *lead, n_in, n_out = vals.shape
  groups = vals.reshape(*lead, n_in // t.group_size, t.group_size, n_out).astype(jnp.float32)
  w = groups * t.scale.astype(jnp.float32)[..., :, None, :]
  return w.reshape(*lead, n_in, n_out).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Pure quantization math, written once for numpy (host, while loading) and jax.numpy (in memory,
# under eval_shape): `xp` is the array module.


def quantize_int8(w, xp=jnp):
  """Per-output-channel absmax int8.

  Args:
    w: [..., in, out] float weight.
    xp: numpy or jax.numpy.
  Returns:
    (q int8 [..., in, out], scale fp32 [..., 1, out]) with w ~= q * scale.
  """
  w = w.astype(xp.float32)
  amax = xp.max(xp.abs(w), axis=-2, keepdims=True)
  scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
  q = xp.clip(xp.round(w / scale), -127, 127).astype(xp.int8)
  return q, scale


def quantize_int4(w, group_size: int = DEFAULT_GROUP_SIZE, xp=jnp):
  """Group-wise absmax int4, packed two values per byte along the input axis.

  Args:
    w: [..., in, out] float weight; `in` must be a multiple of group_size (and even).
    group_size: input rows sharing one scale.
  Returns:
    (packed uint8 [..., in // 2, out], scale fp16 [..., in // group_size, out]).
  """
  *lead, n_in, n_out = w.shape
  groups = w.astype(xp.float32).reshape(*lead, n_in // group_size, group_size, n_out)
  amax = xp.max(xp.abs(groups), axis=-2, keepdims=True)
  # fp16 scales: 11 mantissa bits keep the scale error far below the int4 rounding error.
  scale = xp.where(amax > 0, amax / 7.0, 1.0).astype(xp.float16)
  q = xp.clip(xp.round(groups / scale.astype(xp.float32)), -7, 7).astype(xp.int8)
  q = q.reshape(*lead, n_in, n_out)
  return pack_int4(q, xp), scale[..., 0, :]


def pack_int4(q, xp=jnp):
  """int8 values in [-8, 7], [..., in, out] (in even) -> uint8 [..., in // 2, out]."""
  lo = q[..., 0::2, :].astype(xp.uint8) & 0xF
  hi = q[..., 1::2, :].astype(xp.uint8) & 0xF
  return (lo | (hi << 4)).astype(xp.uint8)


def unpack_int4(packed, xp=jnp):
  """uint8 [..., in // 2, out] -> signed int8 [..., in, out] (inverse of `pack_int4`)."""
  nib = xp.stack([packed & 0xF, packed >> 4], axis=-2).astype(xp.int8)  # [..., in/2, 2, out]
  nib = xp.where(nib >= 8, nib - 16, nib).astype(xp.int8)  # two's complement of 4 bits
  *lead, half, _, n_out = nib.shape
  return nib.reshape(*lead, half * 2, n_out)


# ----------------------------------------------------------------------------------------------
# Which tensors are quantized and how they are viewed as [..., in, out].


def _layout(name: str, shape: tuple) -> Optional[tuple[int, int, bool]]:
  """(leading axes, input axes, transposed) for a quantizable tensor name, else None."""
  parts = name.split("/")
  if name == "embed_tokens":
    return 0, 1, True
  if name == "lm_head":
    return 0, 1, False
  if parts[-1] == "kernel" and len(parts) >= 2 and parts[-2] in _IN_AXES:
    lead = 1 if parts[0] == "layers" else 0
    return lead, _IN_AXES[parts[-2]], False
  return None


def _wants(name: str, embedding: bool, head: bool) -> bool:
  if name == "embed_tokens":
    return embedding
  if name == "lm_head":
    return head
  return True


def quantize_tensor(name: str, w, kind: str, group_size: int = DEFAULT_GROUP_SIZE,
                    xp=jnp) -> QuantizedTensor:
  """Quantizes one parameter of the params tree.

  Args:
    name: its tree path, e.g. "layers/mlp/up_proj/kernel", "lm_head", "embed_tokens".
    w: the array in our layout (layer params carry the leading [layers] axis).
    kind: "int8" or "int4".
    group_size: int4 group size along the input axis (clamped to the input width).
    xp: numpy (host, layer by layer) or jax.numpy.
  Raises:
    ValueError: unknown kind, a name that is not a linear weight, or widths that do not split
      into groups.
  """
  if kind not in KINDS:
    raise ValueError(f"quantization kind {kind!r} is invalid: allowed {', '.join(KINDS)}")
  layout = _layout(name, tuple(w.shape))
  if layout is None:
    raise ValueError(f"{name}: not a quantizable weight (linear kernels, lm_head, embed_tokens)")
  lead, n_in_axes, transposed = layout
  if transposed:
    w = xp.swapaxes(w, -1, -2)
  shape = tuple(w.shape)
  in_shape, out_shape = shape[lead:lead + n_in_axes], shape[lead + n_in_axes:]
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  w2 = w.reshape(*shape[:lead], n_in, n_out)
  if kind == "int8":
    q, scale = _per_layer(lambda a: quantize_int8(a, xp), w2, lead, xp)
    return QuantizedTensor(q, scale, 8, in_shape, out_shape, 0, transposed)
  group = min(group_size, n_in)
  if n_in % group or group % 2:
    raise ValueError(f"{name}: input width {n_in} is not a multiple of the int4 group size "
                     f"{group} (an even divisor of {n_in} is needed; pass group_size=...)")
  q, scale = _per_layer(lambda a: quantize_int4(a, group, xp), w2, lead, xp)
  return QuantizedTensor(q, scale, 4, in_shape, out_shape, group, transposed)


def _per_layer(fn: Callable, w, lead: int, xp):
  # On the host, quantize one layer at a time so the fp32 temporaries stay one layer large.
  if xp is np and lead == 1:
    outs = [fn(w[i]) for i in range(w.shape[0])]
    return tuple(np.stack([o[j] for o in outs]) for j in range(2))
  return fn(w)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def quantize_params(params, kind: str, group_size: int = DEFAULT_GROUP_SIZE,
                    embedding: bool = False, head: bool = False, dtype=None):
  """Quantizes every linear kernel of a params tree (optionally the embedding and head).

  Args:
    params: tree as `init_params` returns (arrays or ShapeDtypeStructs under eval_shape).
    kind: "int8" or "int4".
    group_size: int4 group size.
    embedding, head: also quantize `embed_tokens` / `lm_head`.
    dtype: cast the tensors that stay unquantized (norms, ...) to this dtype (None keeps them).
  Returns:
    The same tree with `QuantizedTensor` leaves in place of the quantized arrays.
  """
  def one(path, x):
    name = _path_name(path)
    if _layout(name, tuple(x.shape)) is not None and _wants(name, embedding, head):
      return quantize_tensor(name, x, kind, group_size)
    return x if dtype is None else x.astype(dtype)
  return jax.tree_util.tree_map_with_path(one, params)


def tensor_transform(kind: str, group_size: int = DEFAULT_GROUP_SIZE, embedding: bool = False,
                     head: bool = False, dtype=None):
  """A `hf.load(..., tensor_transform=...)` hook that quantizes each tensor as it is read.

  Returns:
    fn(name, np.ndarray) -> QuantizedTensor (numpy leaves) or the array (cast to dtype if given).
  """
  if kind not in KINDS:
    raise ValueError(f"quantization kind {kind!r} is invalid: allowed {', '.join(KINDS)}")

  def transform(name: str, array: np.ndarray):
    if _layout(name, tuple(array.shape)) is not None and _wants(name, embedding, head):
      return quantize_tensor(name, np.asarray(array), kind, group_size, xp=np)
    return array if dtype is None else array.astype(dtype)
  return transform


def tree_nbytes(params) -> int:
  """Bytes stored by a (possibly quantized) params tree of arrays or ShapeDtypeStructs."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def memory_table(preset_names=("baichuan-13b", "baichuan2-13b"), group_size=DEFAULT_GROUP_SIZE):
  """Parameter bytes of presets in bf16 / int8 / int4 (linear layers quantized; embedding and head
  bf16, and with them quantized too), computed from abstract shapes (no weights allocated).

  Returns:
    list of dicts {preset, bf16, int8, int4, int8_all, int4_all} in bytes.
  """
  from baichuan_jax import configs  # pylint: disable=import-outside-toplevel
  from baichuan_jax.model import init_params  # pylint: disable=import-outside-toplevel
  rows = []
  for name in preset_names:
    cfg = configs.get(name)
    shapes = jax.eval_shape(lambda c=cfg: init_params(c, jax.random.PRNGKey(0)))
    row = {"preset": name}
    row["bf16"] = tree_nbytes(jax.eval_shape(
        lambda p: jax.tree.map(lambda x: x.astype(jnp.bfloat16), p), shapes))
    for kind in KINDS:
      for suffix, extra in (("", False), ("_all", True)):
        q = jax.eval_shape(lambda p, k=kind, e=extra: quantize_params(
            p, k, group_size, embedding=e, head=e, dtype=jnp.bfloat16), shapes)
        row[kind + suffix] = tree_nbytes(q)
    rows.append(row)
  return rows


def head_matmul(hidden: jax.Array, head, norm_head: bool) -> jax.Array:
  """fp32 logits [..., vocab] from final-norm hidden [..., E] and a plain or quantized head.

  NormHead with a quantized head normalises the dequantized columns at the point of use.
  """
  from baichuan_jax.model import head_logits  # pylint: disable=import-outside-toplevel
  if not is_quantized(head):
    return head_logits(hidden, head, norm_head)
  if norm_head:
    return head_logits(hidden, head.dequantize(hidden.dtype), True)
  return head.contract(hidden, 1, hidden.dtype, out_dtype=jnp.float32)


def embedding_table(embed, dtype) -> jax.Array:
  """The [V, E] embedding as an array (dequantized inside jit when it is quantized)."""
  return embed.dequantize(dtype) if is_quantized(embed) else embed
