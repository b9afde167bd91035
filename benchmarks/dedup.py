"""Near-duplicate detection: our vectorised MinHash-LSH vs datasketch, same documents, same run.

    python benchmarks/dedup.py [--corpus /tmp/corpus] [--docs 4000] [--threshold 0.8]

Builds a test set from real corpus documents (``train.jsonl`` of a built corpus) and plants
near-duplicates: a fraction of documents get 1-3 copies with random character edits (deletions,
substitutions, insertions) at rates of 0.2-5%. Both systems get the same normalised units and the
same shingle size, permutations and (bands, rows), and both verify LSH candidates by estimated
Jaccard >= threshold.

Quality is measured against exact Jaccard of the shingle sets:
* precision: share of reported pairs whose exact Jaccard >= threshold;
* recall: share of true pairs found, where true pairs are the planted pairs (and any pair either
  system reports) with exact Jaccard >= threshold.

Throughput is documents per second for the whole detection (shingling, signatures, LSH index and
query, verification), single process: by wall clock (fastest of ``--repeat`` interleaved runs) and
by the process's CPU time, which is steadier when other jobs share the cores. datasketch is used as its users do: Python shingle strings,
``MinHash.update_batch``, ``MinHashLSH.insert`` then ``query``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time

import numpy as np

from baichuan_jax.data import minhash as mh

_CJK = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in mh.CJK_RANGES if hi < 0x10000)
_UNIT = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")


def load_docs(corpus: str, n: int, seed: int) -> list[str]:
  """n documents with at least 20 units, sampled without replacement in a seeded order."""
  path = os.path.join(corpus, "train.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found; build it: python -m baichuan_jax.data.corpus build "
                            f"--out {corpus}")
  texts = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      t = json.loads(line)["text"]
      if len(_UNIT.findall(mh.normalize(t))) >= 20:
        texts.append(t)
  rng = np.random.default_rng(seed)
  idx = rng.choice(len(texts), size=min(n, len(texts)), replace=False)
  return [texts[i] for i in sorted(idx)]


def mutate(text: str, rate: float, rng: np.random.Generator) -> str:
  """Random character edits at ``rate`` per character (1/3 delete, 1/3 substitute, 1/3 insert)."""
  chars = list(text)
  pool = chars or ["x"]
  out = []
  for c in chars:
    u = rng.random()
    if u < rate / 3:
      continue
    if u < 2 * rate / 3:
      out.append(pool[rng.integers(len(pool))])
    elif u < rate:
      out.extend((c, pool[rng.integers(len(pool))]))
    else:
      out.append(c)
  return "".join(out)


def plant(base: list[str], fraction: float, seed: int):
  """Appends 1-3 edited copies of ``fraction`` of the documents. Returns (texts, planted pairs)."""
  rng = np.random.default_rng(seed)
  texts = list(base)
  planted = set()
  for i in np.flatnonzero(rng.random(len(base)) < fraction):
    members = [int(i)]
    for _ in range(int(rng.integers(1, 4))):
      rate = float(rng.choice([0.002, 0.005, 0.01, 0.02, 0.05]))
      members.append(len(texts))
      texts.append(mutate(base[i], rate, rng))
    planted |= {(a, b) for k, a in enumerate(members) for b in members[k + 1:]}
  return texts, planted


def ours(texts, ngram, num_perm, bands, rows, threshold):
  res = mh.deduplicate(texts, ngram=ngram, num_perm=num_perm, bands=bands, rows=rows,
                       threshold=threshold)
  return {tuple(p) for p in res["pairs"].tolist()}


def datasketch_run(texts, ngram, num_perm, bands, rows, threshold):
  from datasketch import MinHash, MinHashLSH  # pylint: disable=import-outside-toplevel
  lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=(bands, rows))
  sigs = []
  for i, t in enumerate(texts):
    units = _UNIT.findall(mh.normalize(t))
    w = min(ngram, len(units))
    shingles = {" ".join(units[j:j + w]).encode("utf-8") for j in range(len(units) - w + 1)}
    m = MinHash(num_perm=num_perm)
    m.update_batch(list(shingles))
    sigs.append(m)
    lsh.insert(i, m)
  pairs = set()
  for i, m in enumerate(sigs):
    for j in lsh.query(m):
      if j != i:
        a, b = min(i, j), max(i, j)
        if (a, b) not in pairs and sigs[a].jaccard(sigs[b]) >= threshold:
          pairs.add((a, b))
  return pairs


def timed(fn, *args):
  """(result, wall seconds, CPU seconds of this process)."""
  w0, c0 = time.perf_counter(), time.process_time()
  out = fn(*args)
  return out, time.perf_counter() - w0, time.process_time() - c0


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--corpus", default="/tmp/corpus", help="built corpus dir (train.jsonl)")
  ap.add_argument("--docs", type=int, default=4000, help="base documents (default %(default)s)")
  ap.add_argument("--plant-fraction", type=float, default=0.1)
  ap.add_argument("--ngram", type=int, default=5)
  ap.add_argument("--num-perm", type=int, default=128)
  ap.add_argument("--threshold", type=float, default=0.8)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--repeat", type=int, default=3,
                  help="timed runs per system; the fastest is reported (the machine is shared)")
  ap.add_argument("--json", default="", help="also write the results here")
  args = ap.parse_args(argv)

  base = load_docs(args.corpus, args.docs, args.seed)
  texts, planted = plant(base, args.plant_fraction, args.seed + 1)
  bands, rows = mh.lsh_params(args.threshold, args.num_perm)
  print(f"{len(texts)} docs ({len(base)} base, {len(texts) - len(base)} planted copies, "
        f"{len(planted)} planted pairs); ngram={args.ngram} num_perm={args.num_perm} "
        f"bands x rows = {bands} x {rows}, threshold {args.threshold}")

  # Warm-up on a few docs so one-off allocations and imports are not timed.
  ours(texts[:50], args.ngram, args.num_perm, bands, rows, args.threshold)
  systems = {"baichuan_jax.minhash": ours, "datasketch": datasketch_run}
  runs = {name: [] for name in systems}
  for _ in range(args.repeat):  # interleaved, so both systems see the same machine load
    for name, fn in systems.items():
      runs[name].append(timed(fn, texts, args.ngram, args.num_perm, bands, rows, args.threshold))
  results = {}
  for name, rs in runs.items():
    assert all(r[0] == rs[0][0] for r in rs), f"{name} is not deterministic"
    results[name] = (rs[0][0], min(r[1] for r in rs), min(r[2] for r in rs))

  # Exact Jaccard for every pair anyone reported and every planted pair.
  shingles = [set(mh.shingle_hashes(t, args.ngram).tolist()) for t in texts]
  exact = {}
  for p in planted.union(*(r[0] for r in results.values())):  # pylint: disable=not-an-iterable
    exact[p] = mh.jaccard(shingles[p[0]], shingles[p[1]])
  truth = {p for p, j in exact.items() if j >= args.threshold}

  import datasketch  # pylint: disable=import-outside-toplevel
  rows_out = []
  print(f"true pairs (exact Jaccard >= {args.threshold}): {len(truth)}")
  print(f"{'system':<22}{'wall s':>8}{'docs/s':>8}{'CPU s':>8}{'docs/CPU-s':>11}{'pairs':>7}"
        f"{'precision':>10}{'recall':>8}")
  for name, (pairs, wall, cpu) in results.items():
    tp = len(pairs & truth)
    prec = tp / len(pairs) if pairs else 1.0
    rec = tp / len(truth) if truth else 1.0
    rows_out.append({"system": name, "wall_s": wall, "docs_per_s": len(texts) / wall,
                     "cpu_s": cpu, "docs_per_cpu_s": len(texts) / cpu, "pairs": len(pairs),
                     "precision": prec, "recall": rec})
    print(f"{name:<22}{wall:>8.2f}{len(texts) / wall:>8.0f}{cpu:>8.2f}{len(texts) / cpu:>11.0f}"
          f"{len(pairs):>7}{prec:>10.3f}{rec:>8.3f}")
  env = {"python": sys.version.split()[0], "numpy": np.__version__,
         "datasketch": datasketch.__version__, "cpu": platform.processor() or platform.machine(),
         "cores": os.cpu_count()}
  print("env:", env)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"args": vars(args), "results": rows_out, "env": env, "truth": len(truth)}, f,
                indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
