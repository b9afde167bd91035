"""Small helpers for result pages: markdown tables and the environment a number was measured on."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A GitHub-markdown table."""
  out = ["| " + " | ".join(map(str, headers)) + " |",
         "|" + "|".join("---" for _ in headers) + "|"]
  for r in rows:
    if len(r) != len(headers):
      raise ValueError(f"row {list(r)} has {len(r)} cells for {len(headers)} headers")
    out.append("| " + " | ".join(map(str, r)) + " |")
  return "\n".join(out)


def environment() -> dict:
  """Device, core count and library versions (recorded next to every timing)."""
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  return {"device": f"{dev.platform}:{getattr(dev, 'device_kind', dev.platform)}",
          "num_devices": jax.device_count(), "cpu_cores": os.cpu_count(),
          "jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def env_line(env: dict) -> str:
  """One-line description of `environment()` for a results page."""
  return (f"Measured on {env['device']} x{env['num_devices']} ({env['cpu_cores']} CPU cores), "
          f"jax {env['jax']}, flax {env['flax']}, Python {env['python']}, {env['date']}.")
