"""Executes colab/baichuan_jax_tour.ipynb headless (nbclient) with the small-size flag, and checks
that the committed notebook carries no outputs."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parent.parent / "colab" / "baichuan_jax_tour.ipynb"


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, "the tour has no code cells"
  assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
      "strip the notebook's outputs before committing"


def test_notebook_runs_top_to_bottom(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  env = {"BAICHUAN_TOUR_SMALL": "1", "JAX_PLATFORMS": "cpu"}
  # The kernel is a fresh process: it must not inherit the test session's 8 fake CPU devices.
  # Plots must render inline (the kernel's default), not to a non-interactive backend.
  old = {k: os.environ.get(k) for k in [*env, "XLA_FLAGS", "MPLBACKEND"]}
  os.environ.update(env)
  os.environ.pop("XLA_FLAGS", None)
  os.environ.pop("MPLBACKEND", None)
  try:
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")
  assert "restored params identical: True" in text
  assert "max |logit difference| after the HF round trip" in text
  images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))
  assert images >= 3  # RoPE, ALiBi and the live loss plot
