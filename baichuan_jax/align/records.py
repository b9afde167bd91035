"""JSONL record reading for alignment data, at its old path: the code is in `baichuan_jax.records`.

Chat (SFT) and preference (reward model) files are read through `read_jsonl`, which parses each
line, hands it to a per-format validator and collects every malformed line as a `BadRecord`
(file, line number, reason); `ReadReport` keeps the counts.
"""

from baichuan_jax.records import (  # noqa: F401  (re-exports)
    BadRecord, ReadReport, RecordError, read_jsonl, require_str)

__all__ = ["BadRecord", "ReadReport", "RecordError", "read_jsonl", "require_str"]
