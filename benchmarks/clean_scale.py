"""Scale-out of the cleaning pipeline: peak memory per worker and docs/s on Beam's DaskRunner.

    python benchmarks/clean_scale.py [--corpus ~/.cache/baichuan_jax/corpus] [--base-docs 250]
        [--scales 1,4,16] [--workers 1,2] [--json docs/results/clean_scale.json]
        [--plot docs/clean_scale.png]

For each scale s, takes ``s x base-docs`` distinct real documents of the embedded corpus (drawn in
a seeded order from ``train.jsonl``, after dropping every document the in-memory MinHash finds a
near-duplicate for, so the base has none), and plants near-duplicates: 10% of documents get one or
two copies with random character edits at 0.2-1% per character. A planted copy whose exact 5-gram
shingle Jaccard with its original is >= 0.8 (the pipeline's threshold) is a true duplicate.

Each corpus is cleaned by ``baichuan_jax.data.clean`` on a local ``dask.distributed`` cluster of
1 or 2 worker processes (``DaskRunner``), with the quality rules and sentence dedup switched off,
so every removed document is a near-duplicate decision:
* recall: share of true-duplicate copies removed (one member of each planted group is kept);
* precision: share of removed documents that belong to a planted group.
Peak memory per worker is the largest RSS of each worker process, sampled every 50 ms during the
run (``psutil``), and its growth over the idle worker. docs/s is input documents over wall time of
the pipeline (cluster start not included). The run is repeated for 1 and 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dedup import mutate  # noqa: E402  pylint: disable=wrong-import-position

from baichuan_jax.data import clean, minhash  # noqa: E402  pylint: disable=wrong-import-position


def base_pool(corpus: str, n: int, seed: int) -> list[dict]:
  """n train records without near-duplicates among them, in a seeded order."""
  recs = [json.loads(l) for l in open(os.path.join(corpus, "train.jsonl"), encoding="utf-8")]
  rng = np.random.default_rng(seed)
  recs = [recs[i] for i in rng.permutation(len(recs))[:2 * n + 100]]
  res = minhash.deduplicate([r["text"] for r in recs], ngram=5, num_perm=128, threshold=0.5)
  in_cluster = res["size"] > 1
  recs = [r for r, c in zip(recs, in_cluster) if not c and len(r["text"]) >= 20]
  if len(recs) < n:
    raise ValueError(f"only {len(recs)} usable documents for --base-docs x scale = {n}")
  return recs[:n]


def plant(recs: list[dict], fraction: float, seed: int):
  """Adds 1-2 edited copies to ``fraction`` of the records. Returns (records, groups, truth):
  groups maps each planted group's ids; truth is the set of copy ids with exact Jaccard >= 0.8."""
  rng = np.random.default_rng(seed)
  out, groups, truth = list(recs), [], set()
  for i in np.flatnonzero(rng.random(len(recs)) < fraction):
    n = int(rng.integers(1, 3))
    groups.append(add_copies(recs[i], n, lambda: float(rng.choice([0.002, 0.005, 0.01])), rng, out,
                             truth))
  return out, groups, truth


def add_copies(orig: dict, n: int, rate, rng, out: list, truth: set) -> list:
  """Appends `n` copies of `orig` to `out`, each with character edits at `rate()` (drawn per copy,
  just before its edits); adds to `truth` the copies whose exact 5-gram Jaccard with `orig` is
  >= 0.8. Returns the group's ids."""
  members = [orig["id"]]
  base = set(minhash.shingle_hashes(orig["text"], 5).tolist())
  for k in range(n):
    text = mutate(orig["text"], rate(), rng)
    cid = f"{orig['id']}-copy{k}"
    out.append(dict(orig, id=cid, text=text))
    members.append(cid)
    if minhash.jaccard(base, set(minhash.shingle_hashes(text, 5).tolist())) >= 0.8:
      truth.add(cid)
  return members


def plant_groups(recs: list[dict], budget: int, group_copies: int, seed: int):
  """Fixed-size groups at a fixed number of documents: ``budget // group_copies`` originals get
  ``group_copies`` edited copies each (0.2% character edits), so the corpus has the same
  ``len(recs) + budget`` documents for every group size while the near-duplicate pairs grow as
  ``budget * (group_copies + 1) / 2``. Returns (records, groups, truth) as ``plant`` does."""
  rng = np.random.default_rng(seed)
  out, groups, truth = list(recs), [], set()
  for i in rng.permutation(len(recs))[:budget // group_copies]:
    groups.append(add_copies(recs[i], group_copies, lambda: 0.002, rng, out, truth))
  return out, groups, truth


class RssSampler:
  """Largest RSS of each pid, sampled every ``period`` seconds in a thread."""

  def __init__(self, pids, period=0.05):
    self.procs = {p: psutil.Process(p) for p in pids}
    self.peak = {p: 0 for p in pids}
    self.period = period
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True)

  def _loop(self):
    while not self._stop.is_set():
      for p, proc in self.procs.items():
        try:
          self.peak[p] = max(self.peak[p], proc.memory_info().rss)
        except psutil.Error:
          pass
      time.sleep(self.period)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def bench_config():
  cfg = clean.default_config()
  for name in cfg.filters.keys():
    if "enabled" in cfg.filters[name]:
      cfg.filters[name].enabled = False
  cfg.sentence_dedup.enabled = False
  return cfg


def run_one(client_address, pids, corpus_dir, out_dir, npartitions, split_bytes):
  rss0 = {p: psutil.Process(p).memory_info().rss for p in pids}
  args = [f"--runner={clean.DASK_RUNNER}", f"--dask_client_address={client_address}",
          f"--dask_npartitions={npartitions}"]
  with RssSampler(pids) as s:
    t0 = time.perf_counter()
    report = clean.run(str(corpus_dir), str(out_dir), bench_config(), args, split_bytes=split_bytes)
    wall = time.perf_counter() - t0
  return report, wall, rss0, s.peak


def plot(rows, path):
  """Peak RSS per worker vs verified pairs, and docs/s vs documents, one line per worker count."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
  for w in sorted({r["workers"] for r in rows}):
    rs = [r for r in rows if r["workers"] == w]
    x = [r["verified_pairs"] for r in rs]
    a1.plot(x, [max(r["peak_rss_mb"]) for r in rs], "o-", label=f"{w} worker(s): peak RSS")
    a1.plot(x, [max(r["peak_growth_mb"]) for r in rs], "s--",
            label=f"{w} worker(s): peak minus idle worker")
    a2.plot([r["docs"] for r in rs], [r["docs_per_s"] for r in rs], "o-", label=f"{w} worker(s)")
  for ax, key in ((a1, "verified_pairs"), (a2, "docs")):
    ticks = sorted({r[key] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
  scales = sorted({r["scale"] for r in rows})
  a1.set_xlabel(f"verified near-duplicate pairs (corpus x{', x'.join(map(str, scales))})")
  a1.set_ylabel("MiB, largest worker")
  a1.set_ylim(bottom=0)
  a1.legend(fontsize=7)
  a2.set_xlabel("input documents")
  a2.set_ylabel("docs/s (wall; shared, contended 2-core machine)")
  a2.set_ylim(bottom=0)
  a2.legend(fontsize=7)
  fig.suptitle("benchmarks/clean_scale.py: cleaning on Beam's DaskRunner, local dask.distributed")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_edges(rows, path):
  """Peak RSS per worker against verified pairs at a fixed number of documents (--group-copies)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for w in sorted({r["workers"] for r in rows}):
    rs = sorted((r for r in rows if r["workers"] == w), key=lambda r: r["verified_pairs"])
    x = [r["verified_pairs"] for r in rs]
    ax.plot(x, [max(r["peak_rss_mb"]) for r in rs], "o-", label=f"{w} worker(s): peak RSS")
    ax.plot(x, [max(r["peak_growth_mb"]) for r in rs], "s--",
            label=f"{w} worker(s): peak minus idle worker")
    for r in rs:
      ax.annotate(f"groups of {r['group_copies'] + 1}", (r["verified_pairs"], max(r["peak_rss_mb"])),
                  fontsize=6, textcoords="offset points", xytext=(0, 5))
  ax.set_xscale("log")
  ax.set_xlabel(f"verified near-duplicate pairs ({rows[0]['docs']} documents in every run)")
  ax.set_ylabel("MiB, largest worker")
  ax.set_ylim(bottom=0)
  ax.legend(fontsize=7)
  fig.suptitle("clean_scale.py --group-copies: same documents, more edges", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write_corpus(d: Path, recs) -> None:
  d.mkdir()
  with open(d / "train.jsonl", "w", encoding="utf-8") as f:
    for r in recs:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  (d / "validation.jsonl").write_text("", encoding="utf-8")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--corpus", default=str(Path.home() / ".cache/baichuan_jax/corpus"))
  ap.add_argument("--base-docs", type=int, default=250)
  ap.add_argument("--scales", default="1,4,16")
  ap.add_argument("--workers", default="1,2")
  ap.add_argument("--plant-fraction", type=float, default=0.1)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", default="")
  ap.add_argument("--plot", default="")
  ap.add_argument("--replot", default="", help="only redraw --plot from this --json file")
  ap.add_argument("--group-copies", default="",
                  help="edge sweep instead of --scales: e.g. 1,4,15,60 copies per planted group at "
                       "a fixed --copies-budget, so documents stay fixed while pairs grow")
  ap.add_argument("--copies-budget", type=int, default=60,
                  help="planted copies in every --group-copies run (default: %(default)s)")
  args = ap.parse_args(argv)
  draw = plot_edges if args.group_copies else plot
  if args.replot:
    draw(json.load(open(args.replot, encoding="utf-8"))["rows"], args.plot)
    return 0
  from distributed import Client, LocalCluster  # pylint: disable=import-outside-toplevel

  group_copies = [int(x) for x in args.group_copies.split(",")] if args.group_copies else []
  # A run is keyed by its scale (corpus x s) or, in the edge sweep, by its group size (scale 1).
  scales = group_copies or [int(x) for x in args.scales.split(",")]
  workers = [int(x) for x in args.workers.split(",")]
  pool = base_pool(args.corpus, args.base_docs * (1 if group_copies else max(scales)), args.seed)
  tmp = Path(tempfile.mkdtemp(prefix="clean-scale-"))
  corpora = {}
  for s in scales:
    if group_copies:
      recs, groups, truth = plant_groups(pool, args.copies_budget, s, args.seed)
    else:
      recs, groups, truth = plant(pool[:args.base_docs * s], args.plant_fraction, args.seed + s)
    write_corpus(tmp / f"x{s}", recs)
    corpora[s] = (tmp / f"x{s}", recs, groups, truth)
  rows = []
  try:
    for w in workers:
      for s in scales:
        # A fresh cluster per run, so each peak is that run's alone.
        with LocalCluster(n_workers=w, threads_per_worker=1, processes=True,
                          dashboard_address=None, memory_limit="4GiB") as cluster, \
            Client(cluster) as client:
          pids = list(client.run(os.getpid).values())
          d, recs, groups, truth = corpora[s]
          size = (d / "train.jsonl").stat().st_size
          # Two read ranges per worker: partitions grow with the data, their number does not.
          split_bytes = max(1, -(-size // (2 * w)))
          report, wall, rss0, peak = run_one(cluster.scheduler_address, pids, d, tmp / f"o{w}-{s}",
                                             2 * w, split_bytes)
        kept = {json.loads(l)["id"] for l in open(tmp / f"o{w}-{s}" / "train.jsonl",
                                                    encoding="utf-8")}
        removed = {r["id"] for r in recs} - kept
        in_group = {m for g in groups for m in g}
        copies = {m for g in groups for m in g[1:]}
        tp_removed = len(removed & in_group)
        # A group keeps one member, so its removed members are its copies when all are found.
        expected = len(truth)
        row = {"workers": w, "scale": 1 if group_copies else s,
               "group_copies": s if group_copies else None, "docs": len(recs),
               "input_mb": size / 2**20,
               "planted_copies": len(copies), "true_copies": len(truth),
               "verified_pairs": report["stats"]["dedup/doc/verified_pairs"]["all"],
               "removed": len(removed),
               "precision": tp_removed / len(removed) if removed else 1.0,
               "recall": min(1.0, tp_removed / expected) if expected else 1.0,
               "wall_s": wall, "docs_per_s": len(recs) / wall,
               "peak_rss_mb": [peak[p] / 2**20 for p in pids],
               "idle_rss_mb": [rss0[p] / 2**20 for p in pids],
               "peak_growth_mb": [(peak[p] - rss0[p]) / 2**20 for p in pids],
               "load_avg_1m": os.getloadavg()[0]}
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else
                              [round(x, 1) for x in v] if isinstance(v, list) else v)
                          for k, v in row.items()}), flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  import apache_beam, dask  # noqa: E401  pylint: disable=import-outside-toplevel,multiple-imports
  env = {"python": sys.version.split()[0], "apache_beam": apache_beam.__version__,
         "dask": dask.__version__, "cpu": platform.processor() or platform.machine(),
         "cores": os.cpu_count(), "load_avg_at_end": os.getloadavg()}
  print("env:", env)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"args": vars(args), "rows": rows, "env": env}, f, indent=1)
  if args.plot:
    draw(rows, args.plot)
  return 0


if __name__ == "__main__":
  sys.exit(main())
