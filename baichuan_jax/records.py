"""A line of an input file that was left out, with where it is and why.

Shared by every reader that skips malformed input instead of crashing (the alignment JSONL
readers, the evaluation benchmark readers), so each reports skipped lines the same way:
`path:line: reason`, the form editors and terminals turn into a link.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """One skipped line: where it is and why it was rejected."""
  path: str
  line: int  # 1-based line (or row) number in `path`
  reason: str

  def __str__(self) -> str:
    return f"{self.path}:{self.line}: {self.reason}"
