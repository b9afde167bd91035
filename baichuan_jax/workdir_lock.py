"""One writer per workdir: an OS-level lock file that names its holder.

Two runs writing one workdir corrupt each other quietly (both write the same temporary checkpoint
folder, `metrics.jsonl` gets every step twice, and one run's start-up clean-up deletes the other's
in-flight save). Training (`train.trainer.run`), alignment (`align.recipes.run_sft`,
`align.sentiment.run`) and research sweeps (`research.ablation.run_ablation`,
`research.scaling.run_scaling`) therefore take `WORKDIR/.lock` first:

    with workdir_lock.hold(workdir, "train"):
      ...                                    # the only writer of workdir

    @workdir_lock.locked("workdir", "sft")   # the same around a function's call
    def run_sft(cfg, workdir): ...

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on the file, and the file holds the holder's host, pid,
purpose and start time (JSON). The kernel drops a flock when its process dies (kill -9 included),
so a lock file left by a dead run is simply unlocked and is taken over (logged, naming the old
holder). One case keeps a dead run's lock held: a child process that inherited the descriptor
(a forked worker outliving a killed parent). If the file names a pid of THIS host that is no longer
running, the lock file is replaced (the orphans keep a lock on the deleted file) and taken.
A live holder makes `acquire` raise `WorkdirLocked` at once, naming host, pid and purpose.

Within one process the lock is re-entrant (a sweep that calls the trainer on its own workdir),
and `held_by_other(path)` tells whether another live process holds it (what the checkpoint
manager's start-up clean-up of temporary folders asks first).

Limits: flock is per host on most network filesystems (NFSv4 maps it to POSIX locks; some FUSE
mounts ignore it). Two hosts sharing a workdir over such a filesystem are only told apart by the
holder line, which is checked (different host, recorded pid) but cannot be proven dead from here.
In a multi-process job only process 0 takes the lock (the trainer makes every process stop if it
fails).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import socket
import threading
import time
from typing import Callable, Iterator, Optional

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"

_held: dict[str, "_Lock"] = {}  # real lock-file path -> lock held by this process
_mutex = threading.Lock()


class WorkdirLocked(RuntimeError):
  """Another live process holds the workdir's lock."""


def lock_path(workdir: str | os.PathLike) -> str:
  """`WORKDIR/.lock` (absolute, symlinks resolved)."""
  return os.path.join(os.path.realpath(os.path.expanduser(os.fspath(workdir))), LOCK_FILE)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  return True


def read_holder(workdir: str | os.PathLike) -> Optional[dict]:
  """The holder line of `WORKDIR/.lock` ({"host", "pid", "purpose", "since"}), or None."""
  try:
    with open(lock_path(workdir), encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    return None
  if not text.strip():  # released (emptied) or being written
    return None
  try:
    holder = json.loads(text)
  except json.JSONDecodeError:
    return {"host": "?", "pid": -1, "purpose": "?", "since": None, "raw": text[:200]}
  return holder if isinstance(holder, dict) else None


def describe(holder: Optional[dict]) -> str:
  if not holder:
    return "an unknown process"
  since = holder.get("since")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
  return (f"{holder.get('purpose', '?')} run pid {holder.get('pid')} on host "
          f"{holder.get('host')} (since {when})")


class _Lock:
  """A held lock: the open descriptor and its holder record."""

  def __init__(self, path: str, fd: int, holder: dict):
    self.path, self.fd, self.holder, self.depth = path, fd, holder, 1

  def release(self) -> None:
    try:
      # Empty the file before unlocking, so no reader sees a stale holder line afterwards.
      os.ftruncate(self.fd, 0)
    except OSError:
      pass
    try:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
    finally:
      os.close(self.fd)


def _try_lock(path: str) -> Optional[int]:
  """An fd holding the flock on `path` (same inode as the path now), or None if it is taken."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        return None
      raise
    # The file may have been replaced between open and flock (a stale-lock take-over): then the
    # lock is on a deleted inode and means nothing; try again on the new file.
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      return fd
    os.close(fd)


def acquire(workdir: str | os.PathLike, purpose: str) -> "_Lock":
  """Takes `WORKDIR/.lock` (creating the workdir) or raises `WorkdirLocked` at once.

  Args:
    workdir: the run folder.
    purpose: what this run is ("train", "sft", "rlhf", "ablation"...), shown to a second writer.
  Returns:
    the held lock; give it to `release` (or use `hold` / `locked`).
  Raises:
    WorkdirLocked: a live process holds it; the message names its host, pid and purpose.
  """
  os.makedirs(os.path.realpath(os.path.expanduser(os.fspath(workdir))), exist_ok=True)
  path = lock_path(workdir)
  with _mutex:
    mine = _held.get(path)
    if mine is not None:
      mine.depth += 1
      return mine
    previous = read_holder(workdir)
    fd = _try_lock(path)
    if fd is None:
      holder = read_holder(workdir)
      host = socket.gethostname()
      if (holder and holder.get("host") == host and isinstance(holder.get("pid"), int)
          and holder["pid"] > 0 and not _pid_alive(holder["pid"])):
        # Held only by orphans of a dead run (see the module docstring): replace the file.
        log.warning("workdir lock %s: its holder (%s) is dead but the lock is still held "
                    "(by an orphaned child); taking it over", path, describe(holder))
        os.unlink(path)
        fd = _try_lock(path)
      if fd is None:
        raise WorkdirLocked(
            f"{os.path.dirname(path)} is in use by {describe(holder)}: one workdir has one "
            f"writer. Wait for it to finish, stop it, or choose another workdir (lock file "
            f"{path})")
    elif previous and previous.get("pid") not in (None, os.getpid()):
      log.warning("workdir %s: taking over the lock of %s (not running any more)",
                  os.path.dirname(path), describe(previous))
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "purpose": purpose,
              "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
    os.fsync(fd)
    lock = _held[path] = _Lock(path, fd, holder)
    return lock


def release(lock: "_Lock") -> None:
  """Releases one `acquire` of `lock` (the file is unlocked when the outermost one is)."""
  with _mutex:
    lock.depth -= 1
    if lock.depth == 0:
      _held.pop(lock.path, None)
      lock.release()


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, purpose: str) -> Iterator["_Lock"]:
  """`with hold(workdir, purpose):` the calling process is the workdir's only writer."""
  lock = acquire(workdir, purpose)
  try:
    yield lock
  finally:
    release(lock)


def held_here(workdir: str | os.PathLike) -> bool:
  """True if this process holds the workdir's lock."""
  return lock_path(workdir) in _held


def held_by_other(workdir: str | os.PathLike) -> bool:
  """True if another live process holds the workdir's lock (a non-blocking probe)."""
  path = lock_path(workdir)
  if path in _held or not os.path.exists(path):
    return False
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except OSError:
    return True
  finally:
    os.close(fd)
  return False


def locked(arg: str, purpose: str) -> Callable:
  """Decorator: holds the lock of the workdir passed as argument `arg` during each call."""

  def wrap(fn):
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def inner(*args, **kwargs):
      workdir = sig.bind(*args, **kwargs).arguments[arg]
      with hold(workdir, purpose):
        return fn(*args, **kwargs)

    return inner

  return wrap
