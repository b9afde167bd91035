"""Verified, atomic, asynchronous checkpoints of the train state (Orbax underneath).

Orbax gives atomic commits (a save writes into `<step>.orbax-checkpoint-tmp-*` and renames it
when complete, so a killed save is never restored), asynchronous writes, and retention. It
verifies nothing on restore: a flipped byte restores wrong values silently and a truncated file
fails with no fallback. This module adds:

* **Checksums.** Each checkpoint stores, for every array, three 32-bit words (96 bits) of a
  position-weighted sum of its raw bits (below), plus its shape and dtype, and a SHA-256 of the
  data-iterator JSON. Restore recomputes them from what was read back; a checkpoint that does
  not match (or does not read at all) is reported and skipped for the previous one.
* **Layout.** One step holds the items `params`, `state` (optimizer state, step, RNG, counters),
  `data` (the loader's JSON state) and `meta` (checksums, format version, wall time). `params`
  is its own item so `load_params` reads only the weights.
* **Retention.** Keep the last `keep_last` checkpoints, plus every step that is a multiple of
  `keep_every` for good (research snapshots, as Baichuan 2 released intermediate checkpoints).

* **Save failures** (`CheckpointSaveError`): a save that cannot start (not enough free space for
  another checkpoint of the last one's size, a write error) or whose background write fails
  (`poll()` after every train step, `wait()`) raises one line naming the step, the path and the
  OS cause ("No space left on device"); the unfinished step stays a tmp folder that is never
  restored, so the previous checkpoint is untouched. The full orbax tracebacks go to
  `error_log` (`WORKDIR/checkpoint_errors.log`), not the console.
* **Non-finite parameters are never saved**: `save` refuses an array holding NaN/inf.
* **Read errors** are summarised in one line naming the checkpoint, the item and the file (a
  truncated or deleted file is found by comparing with the file sizes recorded once the step
  committed, `<step>/file_sizes.json`); the TensorStore detail goes to `error_log`.
* **Start-up clean-up** of `<step>.orbax-checkpoint-tmp*` folders runs only when no other live
  process holds the workdir's lock (`baichuan_jax.workdir_lock`): they are leftovers of dead
  runs, never a live run's save in flight.

Why this checksum and where it runs (the multi-host choice): the checksum of an array is
computed by a jitted reduction on the devices that hold it, over the GLOBAL array, so it is
the same whatever the sharding, mesh or process count that saves or restores (a run saved on
a 2x4 mesh verifies when restored on one device). The words, for the array's raw bits viewed
as unsigned integers `u[i]` (i = row-major position; 8/16-bit types widened, 64-bit split in
two words), all in uint32 wrap-around arithmetic:

    s0 = sum_i u[i],   s1 = sum_i (2i + 1) * u[i],   s2 = sum_i (mix(i) | 1) * u[i]

Integer addition mod 2^32 is associative, so any reduction order (any sharding) gives the
same words. Every weight is odd, hence invertible mod 2^32: any change to a single element,
any number of flipped bits in it included, changes s1 and s2. `mix` (the MurmurHash3
finaliser) makes the third word a pseudo-random weighting, so structured multi-element damage
(swapped blocks, zeroed chunks) goes unnoticed only with probability about 2^-32 per word.
This is a corruption check, not a defence against deliberate tampering. Compared with hashing
host bytes (SHA-256 of each shard) it needs no gather to one host, no per-process files, and
reads each array once at device memory bandwidth; the results come back replicated to every
process, and only process 0 writes the metadata (Orbax's JSON handler writes on the primary
host only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARRAY_ITEMS = ("params", "state")
ITEMS = ARRAY_ITEMS + ("data", "meta")
CHECKPOINT_SUBDIR = "checkpoints"
QUARANTINE_SUBDIR = "rejected"


ERROR_LOG = "checkpoint_errors.log"
FILE_SIZES = "file_sizes.json"
TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """A checkpoint could not be read or failed verification."""


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written (the previous committed one is untouched)."""

  def __init__(self, message: str, step: Optional[int] = None):
    super().__init__(message)
    self.step = step


class NonFiniteError(CheckpointError):
  """The state to save holds NaN or inf."""


# ----------------------------------------------------------------------------------------------
# One-line error summaries (the full detail goes to a log file).


def _chain(e: BaseException) -> list[BaseException]:
  out, seen = [], set()
  while e is not None and id(e) not in seen:
    out.append(e)
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return out


def os_cause(e: BaseException) -> Optional[str]:
  """The operating-system cause inside an exception chain ("No space left on device" ...)."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno:
      return f"{os.strerror(x.errno)} (errno {x.errno})"
    m = re.search(r"os_error_code='?(\d+)", str(x))
    if m:
      return f"{os.strerror(int(m.group(1)))} (errno {m.group(1)})"
  return None


def _first_path(text: str, under: str) -> Optional[str]:
  """The file path inside `under` that an error message names (the failed write's, else the
  first quoted one)."""
  m = re.search(r'Failed (?:writing|reading): "(?:file://)?(/[^"]+)"', text)
  if m and m.group(1).startswith(under):
    return m.group(1)
  for m in re.finditer(r"[\"'](?:file://)?(/[^\"']+)[\"']", text):
    if m.group(1).startswith(under):
      return m.group(1)
  return None


def _last_line(e: BaseException) -> str:
  """The innermost message of the chain, cut at the first line / TensorStore spec dump."""
  text = str(_chain(e)[-1]) or type(e).__name__
  text = text.split(" See full TensorStore details")[0].splitlines()[0]
  return text if len(text) <= 300 else text[:300] + "..."


@contextlib.contextmanager
def _orbax_unraisable_to(error_log: Optional[str]):
  """Routes the "Exception ignored in <coroutine ...>" reports that a failed orbax read leaves
  behind (its sibling reads are garbage-collected mid-flight) to `error_log`, not stderr."""
  old = sys.unraisablehook

  def hook(u):
    tb = "".join(traceback.format_tb(u.exc_traceback)) if u.exc_traceback else ""
    # Tensorstore's completion callbacks of those sibling reads land on the read's event loop
    # after orbax closed it: RuntimeError('Event loop is closed') with only asyncio frames.
    loop_closed = isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)
    if "orbax" not in tb and "orbax" not in repr(u.object) and not loop_closed:
      old(u)
      return
    if error_log and jax.process_index() == 0:
      try:
        with open(error_log, "a", encoding="utf-8") as f:
          f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} ignored in {u.object!r}\n"
                  + "".join(traceback.format_exception(u.exc_type, u.exc_value,
                                                       u.exc_traceback)) + "\n")
      except OSError:
        pass

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = old


def file_sizes(folder: str) -> dict[str, int]:
  """{relative path: bytes} of every file under `folder`."""
  out = {}
  for root, _, names in os.walk(folder):
    for n in names:
      full = os.path.join(root, n)
      try:
        out[os.path.relpath(full, folder)] = os.path.getsize(full)
      except OSError:
        pass
  return out


def damaged_files(step_dir: str, item: Optional[str] = None) -> list[str]:
  """Files of a committed step whose size differs from the recorded one, or that are missing
  (relative paths; [] when nothing was recorded)."""
  try:
    with open(os.path.join(step_dir, FILE_SIZES), encoding="utf-8") as f:
      want = json.load(f)
  except (OSError, ValueError):
    return []
  have = file_sizes(step_dir)
  bad = [p for p, n in sorted(want.items()) if have.get(p) != n]
  return [p for p in bad if item is None or p.split(os.sep)[0] == item]


# ----------------------------------------------------------------------------------------------
# Checksums (pure functions).


def _mix32(x: jax.Array) -> jax.Array:
  """MurmurHash3 fmix32 on uint32: a cheap bijective scrambling of positions."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _as_words(x: jax.Array) -> jax.Array:
  """Raw bits of `x` as uint32 words (same shape, or [..., 2] for 64-bit types)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = np.dtype(x.dtype).itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    narrow = {1: jnp.uint8, 2: jnp.uint16}[size]
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
  raise TypeError(f"cannot checksum dtype {x.dtype}")


def _array_checksum(x: jax.Array) -> jax.Array:
  """uint32 [3] checksum words of one array (see the module docstring)."""
  u = _as_words(x)
  if u.ndim == 0:
    u = u.reshape(1)
  # Row-major position of every element, built from iotas so that no reshape forces a
  # resharding of a sharded array; wraps mod 2^32 for arrays above 4G elements (still odd
  # weights, so single-element detection holds).
  idx = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(u.ndim)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
    stride *= u.shape[d]
  w1 = idx * jnp.uint32(2) + jnp.uint32(1)
  w2 = _mix32(idx) | jnp.uint32(1)
  return jnp.stack([jnp.sum(u, dtype=jnp.uint32), jnp.sum(u * w1, dtype=jnp.uint32),
                    jnp.sum(u * w2, dtype=jnp.uint32)])


@jax.jit
def _tree_checksums(tree):
  return jax.tree.map(_array_checksum, tree)


def _fetch(x: jax.Array) -> np.ndarray:
  """Host copy of a small array that is replicated (or fully addressable) on this process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  # A sharded output of a reduction: gather the shards every process holds.
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def tree_checksums(tree: Any) -> dict[str, dict[str, Any]]:
  """Checksums of every array leaf of `tree` (jax or numpy arrays, any sharding).

  Args:
    tree: pytree of arrays.
  Returns:
    {leaf path: {"sum": 24 hex digits (3 uint32 words), "shape": [...], "dtype": str}}.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  arrays = [x if isinstance(x, jax.Array) else jnp.asarray(x) for _, x in leaves]
  sums = _tree_checksums(arrays)
  out = {}
  for (path, _), x, s in zip(leaves, arrays, sums):
    words = _fetch(s).astype(np.uint32)
    dtype = (str(jax.random.key_data(x).dtype) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
             else str(np.dtype(x.dtype)))
    out[_path_str(path)] = {"sum": "".join(f"{int(w):08x}" for w in words),
                            "shape": list(x.shape), "dtype": dtype}
  return out


def json_sha256(obj: Any) -> str:
  """SHA-256 of the canonical JSON text of `obj` (sorted keys, no spaces)."""
  text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verify_tree(tree: Any, expected: dict[str, dict[str, Any]], item: str) -> None:
  """Raises CheckpointError naming the first leaf whose checksum, shape or dtype differs."""
  got = tree_checksums(tree)
  missing = sorted(set(expected) - set(got))
  extra = sorted(set(got) - set(expected))
  if missing or extra:
    raise CheckpointError(f"{item}: leaves differ from the saved checksums "
                          f"(missing {missing[:3]}, unexpected {extra[:3]})")
  for name, want in expected.items():
    have = got[name]
    for key in ("shape", "dtype", "sum"):
      if have[key] != want[key]:
        raise CheckpointError(f"{item}/{name}: {key} {have[key]} != saved {want[key]}")


# ----------------------------------------------------------------------------------------------
# The manager.


@dataclasses.dataclass
class Restored:
  """A verified checkpoint read back."""
  step: int
  state: Any  # like the restore target (a TrainState)
  data_state: Optional[Any]  # the loader's JSON state, or None if none was saved
  meta: dict  # the checkpoint's metadata (checksums, format, time, extra)
  rejected: list  # [(step, reason)] newer checkpoints that failed verification and were skipped


def _split_state(state: Any) -> tuple[Any, dict, Any]:
  """(params, rest-of-state as a dict, rebuild function) for a dataclass or dict state."""
  if isinstance(state, dict):
    rest = {k: v for k, v in state.items() if k != "params"}
    return state["params"], rest, lambda p, r: {"params": p, **r}
  if dataclasses.is_dataclass(state):
    names = [f.name for f in dataclasses.fields(state)]
    if "params" not in names:
      raise TypeError(f"checkpointed state {type(state).__name__} has no `params` field")
    rest = {n: getattr(state, n) for n in names if n != "params"}
    cls = type(state)
    return state.params, rest, lambda p, r: cls(params=p, **r)
  raise TypeError(f"checkpointed state must be a dataclass (TrainState) or a dict with 'params', "
                  f"got {type(state).__name__}")


def checkpoint_dir(workdir: str) -> str:
  """Where a workdir keeps its checkpoints (`WORKDIR/checkpoints`)."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


class CheckpointManager:
  """Saves and restores verified checkpoints of a train state under `directory`.

  Args:
    directory: folder of step subfolders (`WORKDIR/checkpoints`), created if missing.
    save_every: `should_save(step)` is true every this many steps (the loop also forces saves
      at the end and on SIGTERM).
    keep_last: how many most recent checkpoints to keep (older ones are deleted) ...
    keep_every: ... except steps that are multiples of this, kept for good (0: none).
    async_save: write in a background thread; `save` returns once arrays are on the host.
    error_log: file that receives the full detail of every save / restore error (default
      `checkpoint_errors.log` beside `directory`, i.e. in the workdir).
    free_space_margin: a save needs this many times the last checkpoint's size free on the
      filesystem (0: no check).
  """

  def __init__(self, directory: str, save_every: int = 1000, keep_last: int = 3,
               keep_every: int = 0, async_save: bool = True, error_log: Optional[str] = None,
               free_space_margin: float = 1.1):
    for name, v, low in (("save_every", save_every, 1), ("keep_last", keep_last, 1),
                         ("keep_every", keep_every, 0)):
      if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"checkpoint {name}={v!r} is invalid: must be an integer >= {low}")
    self.directory = os.path.abspath(directory)
    self.save_every, self.keep_last, self.keep_every = save_every, keep_last, keep_every
    self.error_log = error_log or os.path.join(os.path.dirname(self.directory), ERROR_LOG)
    self.free_space_margin = free_space_margin
    self._pending: Optional[int] = None  # step whose (async) save is not known committed yet
    os.makedirs(self.directory, exist_ok=True)
    self._cleanup_tmp()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep_last, keep_period=keep_every or None, create=True,
        enable_async_checkpointing=async_save,
        # Orbax would delete every tmp folder, a live run's in-flight save included: done above,
        # only when no live process holds the workdir lock.
        cleanup_tmp_directories=False)
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())
    self._log_filter = _DivertOrbaxErrors(self)
    logging.getLogger("absl").addFilter(self._log_filter)

  # -- errors -----------------------------------------------------------------------------------

  def log_detail(self, title: str, e: BaseException) -> None:
    """Appends `title` and the full traceback of `e` to `error_log` (process 0)."""
    if jax.process_index() != 0:
      return
    try:
      with open(self.error_log, "a", encoding="utf-8") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {title}\n")
        f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
        f.write("\n")
    except OSError:  # a full disk may refuse the log too; the one-line summary still goes out
      pass

  def _save_error(self, step: int, e: BaseException) -> CheckpointSaveError:
    self.log_detail(f"saving checkpoint step {step}", e)
    path = _first_path("\n".join(str(x) for x in _chain(e)), self.directory) or os.path.join(
        self.directory, str(step))
    cause = os_cause(e) or _last_line(e)
    return CheckpointSaveError(
        f"checkpoint step {step}: writing {path} failed: {cause} (previous checkpoint: "
        f"{self.latest_step()}; full detail in {self.error_log})", step)

  def _cleanup_tmp(self) -> None:
    """Removes `<step>.orbax-checkpoint-tmp*` leftovers unless a live run may own them."""
    from baichuan_jax import workdir_lock  # pylint: disable=import-outside-toplevel
    if jax.process_index() != 0 or any(
        workdir_lock.held_by_other(d) for d in (self.directory, os.path.dirname(self.directory))):
      return
    for name in os.listdir(self.directory):
      if TMP_MARK in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        log.info("removed %s (an unfinished save of a dead run)", name)

  def _remove_tmp(self, step: int) -> None:
    if jax.process_index() == 0:
      for name in os.listdir(self.directory):
        if name.startswith(f"{step}{TMP_MARK}"):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def _check_space(self, step: int) -> None:
    latest = self.latest_step()
    if not self.free_space_margin or latest is None:
      return
    need = int(sum(file_sizes(os.path.join(self.directory, str(latest))).values())
               * self.free_space_margin)
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise CheckpointSaveError(
          f"checkpoint step {step}: not enough free space in {self.directory}: {free:,} bytes "
          f"free, a checkpoint needs about {need:,} ({self.free_space_margin}x step {latest}'s "
          f"size): {os.strerror(errno.ENOSPC)} (previous checkpoint: {latest})", step)

  # -- queries ----------------------------------------------------------------------------------

  def steps(self) -> list[int]:
    """Committed steps, oldest first (tmp folders of unfinished saves are never listed)."""
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.steps()
    return steps[-1] if steps else None

  def should_save(self, step: int) -> bool:
    return step > 0 and step % self.save_every == 0

  # -- save -------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, data_state: Any = None,
           extra_meta: Optional[dict] = None) -> None:
    """Starts saving `state` (and the loader's JSON state) as checkpoint `step`.

    Checksums are computed first, on the devices, from the very arrays being saved. With async
    saves this returns once Orbax holds host copies; `wait()` blocks until the step is committed.
    Every process must call it (the array writes are collective); only process 0 writes the JSON.
    """
    params, rest, _ = _split_state(state)
    bad = nonfinite_leaves({"params": params, "state": rest})
    if bad:
      raise NonFiniteError(f"checkpoint step {step}: refusing to save non-finite values (NaN/inf "
                           f"in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); the last "
                           f"saved checkpoint is {self.latest_step()}")
    meta = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "time": time.time(),
        "process_count": jax.process_count(),
        "checksums": {"params": tree_checksums(params), "state": tree_checksums(rest)},
        "data_sha256": json_sha256(data_state),
        "extra": extra_meta or {},
    }
    if self.latest_step() is not None and step <= self.latest_step():
      raise CheckpointError(f"checkpoint step {step} is not after the latest saved step "
                            f"{self.latest_step()} in {self.directory}")
    self.wait()  # the previous save's outcome first (orbax would wait inside save anyway)
    self._check_space(step)
    self._remove_tmp(step)  # a failed earlier attempt at this very step
    self._pending = step
    try:
      self._mgr.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params), state=ocp.args.StandardSave(rest),
          data=ocp.args.JsonSave({"loader": data_state}), meta=ocp.args.JsonSave(meta)),
          force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._pending = None
      raise self._save_error(step, e) from None

  def wait(self) -> Optional[int]:
    """Blocks until the started save is committed.

    Returns:
      the step that was committed by this call, or None if none was pending.
    Raises:
      CheckpointSaveError: the background save failed (one line: step, path, OS cause).
    """
    step, self._pending = self._pending, None
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(step if step is not None else -1, e) from None
    if step is not None:
      self._record_sizes(step)
    return step

  def poll(self) -> Optional[int]:
    """Non-blocking `wait`: the step committed since the last call, or None (still writing or
    nothing pending). Raises CheckpointSaveError as soon as a background save has failed.

    In a multi-process job the processes could see the save finish at different steps, and
    `wait` synchronises them, so there the check is left to the next `save` / `wait` (which
    every process calls at the same step)."""
    if (self._pending is None or jax.process_count() > 1
        or self._mgr.is_saving_in_progress()):
      return None
    return self.wait()

  def _record_sizes(self, step: int) -> None:
    """Writes `<step>/file_sizes.json` (what a read error is compared with)."""
    folder = os.path.join(self.directory, str(step))
    if jax.process_index() != 0 or not os.path.isdir(folder):
      return
    sizes = file_sizes(folder)
    tmp = os.path.join(folder, f".{FILE_SIZES}.tmp")
    try:
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(sizes, f)
      os.replace(tmp, os.path.join(folder, FILE_SIZES))
    except OSError as e:  # optional: only sharpens read-error messages
      log.warning("could not record the file sizes of checkpoint %d: %s", step, e)

  def close(self) -> None:
    """Waits for a save in flight and closes (a failure already raised is not raised again)."""
    try:
      self.wait()
    except CheckpointSaveError as e:
      log.error("%s", e)
    finally:
      try:
        self._mgr.close()
      except Exception as e:  # pylint: disable=broad-except
        self.log_detail("closing the checkpoint manager", e)
      logging.getLogger("absl").removeFilter(self._log_filter)

  # -- restore ----------------------------------------------------------------------------------

  def _read_meta(self, step: int) -> dict:
    meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
      raise CheckpointError(f"step {step}: metadata missing or of an unknown format")
    return meta

  def restore_step(self, step: int, target: Any) -> Restored:
    """Reads checkpoint `step` into the structure/shardings of `target` and verifies it.

    Args:
      step: a committed step.
      target: the state as arrays or `jax.ShapeDtypeStruct`s with shardings
        (`train.abstract_train_state(...)`); the result has its structure and shardings.
    Raises:
      CheckpointError: unreadable, or a checksum / shape / dtype mismatch (message names it).
    """
    p_target, r_target, rebuild = _split_state(target)
    try:
      with _orbax_unraisable_to(self.error_log):
        meta = self._read_meta(step)
        out = self._mgr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(p_target), state=ocp.args.StandardRestore(r_target),
            data=ocp.args.JsonRestore()))
    except CheckpointError:
      raise
    except Exception as e:  # orbax / tensorstore raise many types for damaged files
      raise self._read_error(step, e) from None
    verify_tree(out["params"], meta["checksums"]["params"], "params")
    verify_tree(out["state"], meta["checksums"]["state"], "state")
    data = (out["data"] or {}).get("loader")
    if json_sha256(data) != meta["data_sha256"]:
      raise CheckpointError(f"step {step}: data iterator state does not match its checksum")
    return Restored(step=step, state=rebuild(out["params"], out["state"]), data_state=data,
                    meta=meta, rejected=[])

  def _read_error(self, step: int, e: BaseException) -> CheckpointError:
    """One line naming the checkpoint, the item and the file; the detail to `error_log`."""
    self.log_detail(f"reading checkpoint step {step}", e)
    return CheckpointError(read_error_summary(os.path.join(self.directory, str(step)), e,
                                              self.error_log))

  def restore(self, target: Any, step: Optional[int] = None,
              quarantine: bool = False) -> Optional[Restored]:
    """Restores the newest checkpoint that verifies (or exactly `step`).

    Checkpoints that fail are logged as warnings, listed in `Restored.rejected` and skipped for
    the previous one. With `quarantine=True` (what the training loop uses) a failed checkpoint's
    folder is moved to `DIR/rejected/<step>-<time>` (kept for inspection) so that the run can
    write that step again.

    Returns:
      `Restored`, or None when there is no checkpoint at all.
    Raises:
      CheckpointError: `step` was given and fails, or every existing checkpoint fails.
    """
    steps = self.steps()
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no committed checkpoint for step {step} in {self.directory}; "
                              f"available: {steps}")
      return self.restore_step(step, target)
    rejected = []
    for s in reversed(steps):
      try:
        restored = self.restore_step(s, target)
      except CheckpointError as e:
        log.warning("%s; skipped for an older checkpoint", e)
        rejected.append((s, str(e)))
        continue
      restored.rejected = rejected
      if quarantine and rejected:
        self._quarantine([r[0] for r in rejected])
      return restored
    if rejected:
      raise CheckpointError(f"every checkpoint in {self.directory} failed verification: "
                            + "; ".join(f"step {s}: {r}" for s, r in rejected))
    return None

  def _quarantine(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      qdir = os.path.join(self.directory, QUARANTINE_SUBDIR)
      os.makedirs(qdir, exist_ok=True)
      for s in steps:
        src = os.path.join(self.directory, str(s))
        if os.path.isdir(src):
          dst = os.path.join(qdir, f"{s}-{int(time.time())}")
          shutil.move(src, dst)
          log.warning("moved rejected checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("checkpoint_quarantine")
    self._mgr.reload()


def read_error_summary(step_dir: str, e: BaseException, error_log: Optional[str]) -> str:
  """`step N: item X, file F unreadable: CAUSE (detail in LOG)` for a failed read of a step."""
  text = "\n".join(str(x) for x in _chain(e))
  step = os.path.basename(step_dir)
  damaged = damaged_files(step_dir)
  path = _first_path(text, step_dir)
  item = None
  if damaged:
    item = damaged[0].split(os.sep)[0]
    where = ", ".join(os.path.join(step_dir, d) for d in damaged[:3])
    what = f"file {where} is damaged (size differs from the one recorded at save, or missing)"
  elif path:
    item = os.path.relpath(path, step_dir).split(os.sep)[0]
    what = f"file {path}"
  else:
    what = f"folder {step_dir}"
  m = (re.search(r'Error (?:reading|writing) "([^"]+?)/[\d.]+"', text)
       or re.search(r"'path': '([^'/][^']*)/'", text))
  array = f", array {m.group(1)}" if m else ""
  head = f"checkpoint step {step}: item {item or '?'}{array}, {what}: unreadable"
  cause = os_cause(e) or f"{type(_chain(e)[-1]).__name__}: {_last_line(e)}"
  tail = f" (full detail in {error_log})" if error_log else ""
  return f"{head} ({cause}){tail}"


def nonfinite_leaves(tree: Any) -> list[str]:
  """Paths of the floating-point leaves of `tree` that hold a NaN or inf."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  floats = [(p, x) for p, x in leaves
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not floats:
    return []
  flags = _finite_flags([x for _, x in floats])
  return [_path_str(p) for (p, _), ok in zip(floats, flags) if not bool(_fetch(ok))]


@jax.jit
def _finite_flags(arrays):
  return [jnp.all(jnp.isfinite(x)) for x in arrays]


class _DivertOrbaxErrors(logging.Filter):
  """Sends orbax's background-thread tracebacks (several per failed save) to the error log."""

  def __init__(self, mgr: "CheckpointManager"):
    super().__init__()
    self.mgr = mgr

  def filter(self, record: logging.LogRecord) -> bool:
    if "orbax" not in record.pathname or record.levelno < logging.ERROR:
      return True
    if jax.process_index() == 0:
      try:
        with open(self.mgr.error_log, "a", encoding="utf-8") as f:
          f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} orbax: {record.getMessage()}\n")
          if record.exc_info:
            f.write("".join(traceback.format_exception(*record.exc_info)) + "\n")
      except OSError:
        pass
    return False


# ----------------------------------------------------------------------------------------------
# For users: the weights of a run.


def _handlers() -> dict:
  """Orbax handlers for the items every checkpoint holds (see `CheckpointManager.save`)."""
  return {"params": ocp.StandardCheckpointHandler(), "state": ocp.StandardCheckpointHandler(),
          "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def load_params(workdir: str, step: Optional[int] = None, shardings: Any = None,
                verify: bool = True) -> Any:
  """Loads the parameters of a training run (for evaluation, generation, `hf.save`).

  Args:
    workdir: the run's `--workdir` (or its `checkpoints` folder directly).
    step: which checkpoint (default: the newest one that verifies).
    shardings: optional pytree of `jax.sharding.Sharding` like the params; default: every array
      on the first local device (fine for models that fit one device or host).
    verify: check the saved checksums (skips to an older checkpoint on failure when `step` is
      None).
  Returns:
    The params pytree (fp32 master weights), e.g. `{"embed_tokens": [V, E], "layers": {...}}`.
  Raises:
    FileNotFoundError: no checkpoints under `workdir`.
    CheckpointError: the requested checkpoint (or every one) fails verification.
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory) and os.path.isdir(workdir) and any(
      n.isdigit() for n in os.listdir(workdir)):
    directory = os.path.abspath(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoints in {workdir!r}: expected a folder {directory}")
  mgr = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                              save_interval_steps=0),
      item_handlers=_handlers())  # every saved item registered, or orbax warns per restore
  steps = sorted(mgr.all_steps())
  if not steps:
    raise FileNotFoundError(f"no committed checkpoints in {directory}")
  if step is not None and step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {directory}; available: {steps}")
  errors = []
  for s in ([step] if step is not None else list(reversed(steps))):
    try:
      meta = mgr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      saved = meta["checksums"]["params"]
      meta_tree = mgr.item_metadata(s)["params"]
      if meta_tree is None:
        raise CheckpointError(f"step {s}: no params item")
      device = jax.local_devices()[0]
      default = jax.sharding.SingleDeviceSharding(device)
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=default),
                              meta_tree)
      if shardings is not None:
        abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                abstract, shardings)
      with _orbax_unraisable_to(os.path.join(os.path.dirname(directory), ERROR_LOG)):
        params = mgr.restore(s, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract)))["params"]
      if verify:
        verify_tree(params, saved, "params")
      return params
    except Exception as e:  # damaged files raise many types; report and try an older step
      if not isinstance(e, CheckpointError):
        error_log = os.path.join(os.path.dirname(directory), ERROR_LOG)
        try:
          with open(error_log, "a", encoding="utf-8") as f:
            f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} load_params step {s}\n"
                    + "".join(traceback.format_exception(type(e), e, e.__traceback__)) + "\n")
        except OSError:
          error_log = None
        e = CheckpointError(read_error_summary(os.path.join(directory, str(s)), e, error_log))
      if step is not None:
        raise CheckpointError(f"{directory}: {e}") from None
      log.warning("checkpoint step %d unusable, trying an older one: %s", s, e)
      errors.append(f"step {s}: {e}")
  raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(errors))
