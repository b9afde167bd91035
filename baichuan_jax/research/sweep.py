"""Resumable sweep bookkeeping: one JSON result per finished run, a progress table, nothing else.

A sweep is a dict of run name -> spec (a JSON-able dict that fully describes the run). A run is
done when ``WORKDIR/runs/<name>/result.json`` exists; it is written atomically (temp file + rename)
only after the run finished, so a sweep killed at any moment restarts with exactly the runs that
are missing. A stored result whose spec differs from the requested one is an error (the config
changed under an existing workdir), never silently reused.

    sweep = Sweep(workdir, {"s0": {...}, "s1": {...}})
    for name in sweep.pending():
      sweep.record(name, train_and_measure(sweep.specs[name]))
    print(sweep.progress_table())
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence


def _canonical(obj) -> object:
  return json.loads(json.dumps(obj, sort_keys=True))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
  """Writes `obj` as JSON to `path` via a temp file and rename (never a half-written file)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
  os.replace(tmp, path)


class Sweep:
  """Tracks which runs of a sweep have finished under `workdir`; see the module docstring."""

  def __init__(self, workdir: str | os.PathLike, specs: Mapping[str, dict]):
    self.workdir = Path(workdir)
    for name in specs:
      if not name or "/" in name or name.startswith("."):
        raise ValueError(f"run name {name!r} must be a non-empty file name without '/'")
    self.specs = {k: _canonical(v) for k, v in specs.items()}

  def result_path(self, name: str) -> Path:
    return self.workdir / "runs" / name / "result.json"

  def run_dir(self, name: str) -> Path:
    return self.workdir / "runs" / name

  def _stored(self, name: str) -> dict | None:
    path = self.result_path(name)
    if not path.exists():
      return None
    try:
      stored = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}); delete it to re-run {name!r}") from e
    if stored.get("spec") != self.specs[name]:
      old, new = stored.get("spec") or {}, self.specs[name]
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      raise ValueError(f"run {name!r} in {self.workdir} was made with a different spec "
                       f"(fields {diff}); use a new workdir or delete {path.parent}")
    return stored

  def is_done(self, name: str) -> bool:
    return self._stored(name) is not None

  def pending(self) -> list[str]:
    """Names of the runs without a stored result, in spec order."""
    return [n for n in self.specs if not self.is_done(n)]

  def result(self, name: str) -> dict:
    """The stored result of a finished run (KeyError if it has not finished)."""
    stored = self._stored(name)
    if stored is None:
      raise KeyError(f"run {name!r} has no result yet ({self.result_path(name)})")
    return stored["result"]

  def results(self) -> dict[str, dict]:
    """Results of every finished run, in spec order."""
    return {n: self.result(n) for n in self.specs if self.is_done(n)}

  def record(self, name: str, result: dict) -> None:
    """Stores the result of a finished run (atomically)."""
    if name not in self.specs:
      raise KeyError(f"unknown run {name!r}; runs: {list(self.specs)}")
    atomic_write_json(self.result_path(name), {"spec": self.specs[name], "result": result})

  def progress_table(self, columns: Sequence[tuple[str, Callable[[str, dict, dict | None], str]]]
                     = ()) -> str:
    """Plain-text table: one row per run with its status and the given extra columns.

    Args:
      columns: (header, fn(name, spec, result_or_None) -> cell text) pairs.
    """
    headers = ["run", "status"] + [h for h, _ in columns]
    rows = []
    for name, spec in self.specs.items():
      res = self._stored(name)
      res = None if res is None else res["result"]
      rows.append([name, "done" if res is not None else "pending"]
                  + [fn(name, spec, res) for _, fn in columns])
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    done = sum(r[1] == "done" for r in rows)
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]
                     + [f"{done}/{len(rows)} runs done"])
