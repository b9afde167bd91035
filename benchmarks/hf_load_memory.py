"""Peak host memory of loading a Hugging Face Baichuan checkpoint: `hf.load` vs a naive load.

Writes a synthetic ~1.1B-parameter Baichuan-format checkpoint (bf16, sharded safetensors, and the
same tensors as sharded `pytorch_model-*.bin`) to a temporary directory, then loads it in a fresh
subprocess per method, recording the subprocess's peak resident memory and sampling
its RSS over time. Peak = VmHWM of the child (Linux), which starts afresh at exec. Methods:

  ours-safetensors  `baichuan_jax.hf.load(dir)` (streams tensor by tensor, positional reads)
  naive-safetensors `safetensors.numpy.load_file` of every shard, then stack/transpose to our layout
  ours-bin          `baichuan_jax.hf.load(dir)` on the .bin copy (torch mmap + page release)
  naive-bin         `torch.load` of every shard (no mmap), then stack/transpose to our layout

Usage:
  python benchmarks/hf_load_memory.py                    # ~2.2 GB checkpoint, all methods
  python benchmarks/hf_load_memory.py --layers 4 --methods ours-safetensors naive-safetensors
  python benchmarks/hf_load_memory.py --plot docs/hf_load_memory.png

Prints a table (peak RSS, ratio to the checkpoint's size, time) and removes its temp files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

METHODS = ("ours-safetensors", "naive-safetensors", "ours-bin", "naive-bin")


def _config(layers: int):
  from baichuan_jax import configs  # pylint: disable=import-outside-toplevel
  # Baichuan-7B vocabulary and a 2048-wide, 16-layer body: 1.07B parameters, 2.15 GB in bf16.
  return configs.get("baichuan-7b", hidden_size=2048, num_heads=16, num_kv_heads=16,
                     intermediate_size=configs.ffn_width(2048), num_layers=layers,
                     param_dtype="bfloat16")


def write_checkpoint(root: Path, layers: int, shard_size: str) -> dict:
  """Writes random bf16 weights as sharded safetensors (root/st) and .bin (root/bin)."""
  import jax  # pylint: disable=import-outside-toplevel
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from baichuan_jax import hf  # pylint: disable=import-outside-toplevel
  from baichuan_jax.model import init_params  # pylint: disable=import-outside-toplevel
  cfg = _config(layers)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: (0.02 * rng.standard_normal(s.shape, dtype=np.float32)).astype(ml_dtypes.bfloat16),
      shapes)
  st_dir, bin_dir = root / "st", root / "bin"
  hf.save(cfg, params, st_dir, shard_size=shard_size)
  del params
  # The .bin copy: the same shards, re-read tensor by tensor and written with torch.save.
  bin_dir.mkdir()
  shutil.copy(st_dir / "config.json", bin_dir / "config.json")
  index_file = st_dir / hf.SAFETENSORS_INDEX
  index = (json.loads(index_file.read_text())["weight_map"] if index_file.exists() else
           dict.fromkeys(hf.param_names(cfg), "model.safetensors"))
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  bin_map = {}
  for shard in sorted(set(index.values())):
    sd = {}
    with safe_open(st_dir / shard, framework="numpy") as f:
      for name in f.keys():
        arr = f.get_tensor(name)
        sd[name] = torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
    name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
    torch.save(sd, bin_dir / name)
    bin_map.update({k: name for k in sd})
    del sd
  (bin_dir / hf.BIN_INDEX).write_text(json.dumps({"weight_map": bin_map}))
  size = lambda d, ext: sum(p.stat().st_size for p in d.iterdir() if p.suffix == ext)
  return {"params": sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)),
          "safetensors_bytes": size(st_dir, ".safetensors"), "bin_bytes": size(bin_dir, ".bin"),
          "shards": len(set(index.values()))}


# ----------------------------------------------------------------------------------------------
# Child process: one load, reports peak RSS.


def _naive_to_tree(cfg, sd):
  """The usual conversion script: the whole state dict in memory, then np.stack of transposes
  (the state dict is freed only when the new tree is complete)."""
  from baichuan_jax import hf  # pylint: disable=import-outside-toplevel
  params = {}
  for spec in hf._specs(cfg):  # pylint: disable=protected-access
    arrs = [sd[n].reshape(spec.view).transpose(spec.perm) for n in spec.hf_names()]
    value = np.stack(arrs) if spec.layers else np.ascontiguousarray(arrs[0])
    node = params
    for k in spec.path[:-1]:
      node = node.setdefault(k, {})
    node[spec.path[-1]] = value
  return params


def _peak_rss() -> int:
  """Peak resident bytes of this process image (VmHWM). Unlike ru_maxrss it restarts at exec,
  so the parent's memory at fork time does not leak into the child's number."""
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _nbytes(tree) -> int:
  return sum(_nbytes(v) for v in tree.values()) if isinstance(tree, dict) else tree.nbytes


def child(method: str, path: str) -> None:
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  from baichuan_jax import hf  # pylint: disable=import-outside-toplevel
  if "bin" in method:
    import torch  # pylint: disable=import-outside-toplevel,unused-import
  base = _peak_rss()
  t0 = time.perf_counter()
  root = Path(path)
  if method.startswith("ours"):
    _, params = hf.load(root, progress=False)
  elif method == "naive-safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    cfg = hf.config_from_hf(json.loads((root / "config.json").read_text()))
    sd = {}
    for f in sorted(root.glob("*.safetensors")):
      sd.update(load_file(f))
    params = _naive_to_tree(cfg, sd)
  elif method == "naive-bin":
    cfg = hf.config_from_hf(json.loads((root / "config.json").read_text()))
    sd = {}
    for f in sorted(root.glob("pytorch_model*.bin")):
      for k, t in torch.load(f, map_location="cpu", weights_only=True).items():
        sd[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    params = _naive_to_tree(cfg, sd)
  else:
    raise ValueError(f"unknown method {method!r}; allowed: {METHODS}")
  seconds = time.perf_counter() - t0
  peak = _peak_rss()
  out_bytes = _nbytes(params)
  print(json.dumps({"method": method, "peak_rss": peak, "baseline_rss": base,
                    "params_bytes": out_bytes, "seconds": seconds}))


def _run_child(method: str, path: Path, interval: float = 0.05):
  """Runs one load in a fresh interpreter; returns (result dict, [(t, rss_bytes)])."""
  cmd = [sys.executable, __file__, "--child", method, str(path)]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  trace, t0 = [], time.perf_counter()

  def poll():
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
      try:
        for line in status.read_text().splitlines():
          if line.startswith("VmRSS:"):
            trace.append((time.perf_counter() - t0, int(line.split()[1]) * 1024))
      except (FileNotFoundError, ProcessLookupError):
        break
      time.sleep(interval)

  thread = threading.Thread(target=poll, daemon=True)
  thread.start()
  out, err = proc.communicate()
  thread.join()
  if proc.returncode:
    raise RuntimeError(f"{method} failed (exit {proc.returncode}):\n{err[-3000:]}")
  return json.loads(out.strip().splitlines()[-1]), trace


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=16,
                      help="decoder layers of the synthetic model (16: 1.07B parameters)")
  parser.add_argument("--shard-size", default="1GB", help="safetensors shard size (default 1GB)")
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  parser.add_argument("--tmp", default=None, help="directory for the temporary checkpoint")
  parser.add_argument("--plot", default=None, help="write an RSS-over-time plot (png) here")
  parser.add_argument("--json", default=None, help="write the results as JSON here")
  parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(*args.child)
    return

  import torch  # pylint: disable=import-outside-toplevel
  import safetensors  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  root = Path(tempfile.mkdtemp(prefix="hf_load_memory_", dir=args.tmp))
  try:
    t = time.perf_counter()
    info = write_checkpoint(root, args.layers, args.shard_size)
    print(f"wrote {info['params']:,} parameters: {info['safetensors_bytes'] / 1e9:.3f} GB safetensors "
          f"in {info['shards']} shards, {info['bin_bytes'] / 1e9:.3f} GB .bin "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    results, traces = [], {}
    for method in args.methods:
      res, trace = _run_child(method, root / ("bin" if "bin" in method else "st"))
      res["file_bytes"] = info["bin_bytes" if "bin" in method else "safetensors_bytes"]
      res["ratio"] = res["peak_rss"] / res["file_bytes"]
      results.append(res)
      traces[method] = trace
      print(f"{method:<18} peak RSS {res['peak_rss'] / 1e9:6.3f} GB  file {res['file_bytes'] / 1e9:.3f} GB  "
            f"ratio {res['ratio']:.3f}  (interpreter+imports {res['baseline_rss'] / 1e9:.3f} GB)  "
            f"{res['seconds']:.1f} s", flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)

  print("\n| method | peak RSS (GB) | checkpoint (GB) | peak / checkpoint | load time (s) |")
  print("|---|---|---|---|---|")
  for r in results:
    print(f"| {r['method']} | {r['peak_rss'] / 1e9:.3f} | {r['file_bytes'] / 1e9:.3f} | "
          f"{r['ratio']:.3f} | {r['seconds']:.1f} |")
  print(f"\npython {sys.version.split()[0]}, numpy {np.__version__}, safetensors "
        f"{safetensors.__version__}, torch {torch.__version__}, jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs")
  if args.json:
    Path(args.json).write_text(json.dumps({"checkpoint": info, "results": results}, indent=2) + "\n")
  if args.plot:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, trace in traces.items():
      if trace:
        ts, rss = zip(*trace)
        ax.plot(ts, np.asarray(rss) / 1e9, label=method)
    ax.axhline(info["safetensors_bytes"] / 1e9, color="k", ls=":", lw=1, label="checkpoint size")
    ax.axhline(1.3 * info["safetensors_bytes"] / 1e9, color="r", ls="--", lw=1, label="1.3 x checkpoint")
    ax.set_xlabel("seconds since start of the process")
    ax.set_ylabel("resident memory (GB)")
    ax.set_title(f"Loading a {info['params'] / 1e9:.2f}B-parameter bf16 Baichuan checkpoint")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
  main()
