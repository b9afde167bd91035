"""The shared packed-row layout: first fit by hand, and one segment written by hand."""

import numpy as np
import pytest

from baichuan_jax.data import packing


def test_first_fit_by_hand():
  # seq_len 10: 6 -> row 0; 5 -> row 1; 4 -> row 0 (6+4); 3 -> row 1 (5+3); 2 -> row 1 (8+2).
  assert packing.first_fit([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
  # Only the newest open row is a candidate: 4 no longer goes back to row 0.
  assert packing.first_fit([6, 5, 4], 10, open_rows=1) == [[0], [1, 2]]
  with pytest.raises(ValueError, match="example of 11 tokens does not fit seq_len=10"):
    packing.first_fit([3, 11], 10)


def test_put_segment_writes_the_row_layout():
  rows = packing.empty_rows(2, 6, pad_id=9)
  at = packing.put_segment(rows, 1, 0, 1, [5, 6], [6, 7])
  at = packing.put_segment(rows, 1, at, 2, [1, 2, 3], [2, 3, 4], np.array([0, 1, 1]))
  assert at == 5
  assert rows["inputs"].tolist() == [[9] * 6, [5, 6, 1, 2, 3, 9]]
  assert rows["targets"].tolist() == [[9] * 6, [6, 7, 2, 3, 4, 9]]
  assert rows["positions"].tolist() == [[0] * 6, [0, 1, 0, 1, 2, 0]]
  assert rows["segment_ids"].tolist() == [[0] * 6, [1, 1, 2, 2, 2, 0]]
  assert rows["loss_mask"].tolist() == [[0] * 6, [1, 1, 0, 1, 1, 0]]
  assert all(v.dtype == np.int32 for v in rows.values())
