"""pre_process.py under torchrun: 2 CPU processes write the data dir one process writes."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from synth_imdb import generate
from utils import REPO


def args(root, out):
    return ["pre_process.py", "--root", str(root), "--out", str(out), "--device", "cpu", "--workers", "0", "--batch", "4"]


def torchrun(*rest):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *rest]


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def labels(out):
    with open(out / "labels.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_two_processes_write_what_one_writes(tmp_path):
    root = tmp_path / "crop"
    generate(root, 24, seed=3, dirty_fraction=0.2)
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, *args(root, one)], cwd=REPO, check=True, capture_output=True)
    r = subprocess.run(torchrun(*args(root, two)), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (two / "labels.csv").read_text() == (one / "labels.csv").read_text()
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["dropped"] == s1["dropped"] and s2["kept"] == s1["kept"] and s2["retried"] == s1["retried"]
    assert [(r["rank"], r["photos"]) for r in s1["ranks"]] == [(0, s1["kept"])]
    assert [r["rank"] for r in s2["ranks"]] == [0, 1] and sum(r["photos"] for r in s2["ranks"]) == s2["kept"]
    assert [r["device"] for r in s1["ranks"] + s2["ranks"]] == ["cpu"] * 3
    for r in s1["ranks"] + s2["ranks"]:  # each process's align phase: where its seconds went
        assert set(r["seconds"]) == {"photos", "detect", "writes", "total", "first"} and r["seconds"]["detect"] > 0
        phases = sum(v for k, v in r["seconds"].items() if k not in ("total", "first"))  # "first" overlaps "photos"
        assert phases <= r["seconds"]["total"] + 0.01  # each rounded to 1 ms
        assert 0 < r["seconds"]["first"] <= r["seconds"]["total"]
    assert all(r["photos"] >= s2["kept"] // 2 - 3 for r in s2["ranks"])  # each its half, give or take a drop
    sources = {r["source"] for r in labels(two)}
    assert len(sources) == s2["kept"]  # no photo twice
    for split in ("train", "valid"):
        a, b = (np.load(d / f"faces_{split}.npy").astype(int) for d in (one, two))
        # other batches, the same faces (batched MTCNN equals per-photo MTCNN to ~1e-5 px)
        assert a.shape == b.shape and np.abs(a - b).mean() < 0.5


def test_a_killed_sharded_run_rerun_continues(tmp_path):
    root = tmp_path / "crop"
    generate(root, 64, seed=13, dirty_fraction=0.1)
    one, killed = tmp_path / "one", tmp_path / "killed"
    subprocess.run([sys.executable, *args(root, one), "--no-pack"], cwd=REPO, check=True, capture_output=True)
    proc = subprocess.Popen(torchrun(*args(root, killed), "--no-pack"), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("faces/*/*.jpg"))) < 12:
        time.sleep(0.05)
    ranks = children(proc.pid)  # torchrun starts each rank in a session of its own
    assert len(ranks) == 2
    for pid in [proc.pid, *ranks]:  # torchrun and both ranks, as a kill of the whole job would
        os.killpg(pid, signal.SIGKILL)
    proc.wait()
    n_before = len(list(killed.glob("faces/*/*.jpg")))
    assert 12 <= n_before < len(labels(one)), "the kill must land mid-run"
    assert not (killed / "labels.csv").exists()
    r = subprocess.run(torchrun(*args(root, killed), "--no-pack"), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (killed / "labels.csv").read_text() == (one / "labels.csv").read_text()
    summary = json.loads((killed / "summary.json").read_text())
    assert sum(r["photos"] for r in summary["ranks"]) == summary["kept"] - n_before  # only what was left
    assert not list(killed.rglob("*.tmp"))
