"""The cleaning CLI on a real distributed engine: Beam's DaskRunner against a local
``dask.distributed`` cluster of 2 worker processes, compared byte for byte with the in-process run.

The slice of the embedded corpus comes in two train files plus validation, with planted
near-duplicate documents (so connected components has work), a repeated boilerplate sentence and
bad lines (so rejected rows are counted); input ranges of 32 KiB give several read tasks.
"""

import json
import os
import subprocess
import sys

import pytest

from baichuan_jax.data import clean, corpus

# dask[distributed] comes with the [test] extra (setup.py); a missing install fails, never skips.
from distributed import Client, LocalCluster  # noqa: E402  pylint: disable=wrong-import-position

BOILER = "本报讯：欢迎订阅人民日报海外版电子版，每日更新新闻与评论。"


@pytest.fixture(scope="module")
def slice_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("dask_slice")
  built = root / "built"
  corpus.build(built, limit=40, code_chars=8000, validation_fraction=0.1, progress=False)
  train = [json.loads(l) for l in (built / "train.jsonl").read_text(encoding="utf-8").splitlines()]
  # Planted near-duplicates: 6 documents copied with one character changed, one copied twice.
  extra = []
  for k, i in enumerate(range(0, 60, 10)):
    rec = dict(train[i])
    t = rec["text"]
    rec["id"] = f"{rec['id']}-copy"
    rec["text"] = t[:len(t) // 2] + "某" + t[len(t) // 2 + 1:]
    extra.append(rec)
    if k == 0:
      extra.append(dict(rec, id=rec["id"] + "2", text=rec["text"] + "。"))
  for i in range(3):  # the same boilerplate sentence in three documents
    extra.append(dict(train[i + 1], id=f"boiler-{i}", text=train[i + 1]["text"] + BOILER))
  docs = train + extra
  src = root / "src"
  src.mkdir()
  half = len(docs) // 2
  rejected = []
  for name, part in (("train-00000-of-00002.jsonl", docs[:half]),
                     ("train-00001-of-00002.jsonl", docs[half:])):
    lines = [json.dumps(r, ensure_ascii=False) for r in part]
    lines.insert(3, '{"text": "unterminated')
    data = ("\n".join(lines) + "\n").encode("utf-8")
    (src / name).write_bytes(data + b'{"text": "\xff\xfe bad bytes"}\n')
    rejected += [(name, 4, "malformed JSON"), (name, len(lines) + 1, "not UTF-8")]
  (src / "validation.jsonl").write_bytes((built / "validation.jsonl").read_bytes())
  return src, rejected, [train[0]["id"]]


def test_dask_runner_on_two_workers_matches_in_process(slice_dir, tmp_path):
  slice_dir, want_rejected, want_group = slice_dir
  split_mb = str(32 / 1024)
  local = tmp_path / "local"
  # Clusters here have at most a few members: 6 rounds converge (the star check would fail
  # the run otherwise), and keep the Dask task graph small.
  report_local = clean.run(str(slice_dir), str(local), split_bytes=32 << 10, cc_rounds=6)
  with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                    memory_limit="2GiB") as cluster, Client(cluster) as client:
    dask_out = tmp_path / "dask"
    cmd = [sys.executable, "-m", "baichuan_jax.data.clean", "--corpus", str(slice_dir),
           "--out", str(dask_out), "--split-mb", split_mb, "--cc-rounds", "6",
           f"--runner={clean.DASK_RUNNER}", f"--dask_client_address={cluster.scheduler_address}",
           "--dask_npartitions=2"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert res.returncode == 0, res.stderr[-4000:]
    # Both workers ran pipeline tasks.
    done = client.run(lambda dask_worker: len(dask_worker.state.log))
    assert len(done) == 2 and all(n > 0 for n in done.values())
  for name in ("train.jsonl", "validation.jsonl", "rejected.jsonl", "clean_report.json"):
    assert (dask_out / name).read_bytes() == (local / name).read_bytes(), name
  report = json.loads((dask_out / "clean_report.json").read_text(encoding="utf-8"))
  assert report == report_local
  s = report["stats"]
  # Independent expectations: the planted copies go, the bad lines are counted with their lines.
  assert sum(s["doc/near_duplicate"].values()) >= 7
  assert s["dedup/doc/verified_pairs"]["all"] >= 7
  assert sum(s["sentence/near_duplicate"].values()) >= 2
  assert report["rejected"]["count"] == 4
  rows = [json.loads(l) for l in (dask_out / "rejected.jsonl").read_text().splitlines()]
  assert [(os.path.basename(r["file"]), r["line"], r["reason"].split(":")[0]) for r in rows] == (
      want_rejected)
  kept = [json.loads(l) for l in (dask_out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
  # The first planted group (original, copy, copy + "。") keeps one member, the longest.
  group = [r for r in kept if r["id"] in (want_group[0], want_group[0] + "-copy",
                                         want_group[0] + "-copy2")]
  assert [(r["id"], r["cluster_size"]) for r in group] == [(want_group[0] + "-copy2", 3)]
  assert sum(s["out/docs"].values()) == len(kept) + len(
      (dask_out / "validation.jsonl").read_text(encoding="utf-8").splitlines())
  assert all(r["weight"] == pytest.approx(r["cluster_size"] ** -0.5, rel=1e-5) for r in kept)
