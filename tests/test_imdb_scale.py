"""scripts/imdb_scale.py: its dataset (the rows pre_process.py parses, and which of them reach detection) and its memory
sums."""
import subprocess
import sys
from collections import Counter

import numpy as np

import pre_process as pp
from utils import REPO, read_image

sys.path.insert(0, str(REPO / "scripts"))  # its worker processes (spawn) import it by this name too
import imdb_scale  # noqa: E402


def test_dataset_rows_and_filters(tmp_path):
    root = tmp_path / "d"
    assert imdb_scale.build(root, rows=2000, photos=20, pool=8, seed=0, jobs=2)
    assert not imdb_scale.build(root, rows=2000, photos=20, pool=8, seed=0, jobs=2)  # cached
    assert not (tmp_path / "d.partial").exists()
    name, meta = pp.load_meta(root / "imdb.mat")
    assert name == "imdb" and len(meta.full_path) == 2000
    ages, keep, dropped = pp.filter_meta(meta, root, 1.0, 0, 100)
    # the photo rows pass, spread over the file; each filler row fails one filter, the kinds in turn
    photo_rows = [k * 2000 // 20 for k in range(20)]
    assert list(np.flatnonzero(keep)) == photo_rows
    reason = dict(no_face_score="face_score", low_face_score="face_score")  # the others are named alike
    kinds = Counter(reason.get(k, k) for k in (imdb_scale.FILLER_KINDS[r % 5] for r in range(2000) if r not in photo_rows))
    assert dropped == dict(kinds, missing_file=0) and kinds["face_score"] > kinds["second_face"] > 0
    assert all(not (root / p).exists() for p in meta.full_path[~keep])
    shorts = [min(read_image(root / p).shape[:2]) for p in meta.full_path[keep]]
    assert all(150 <= s <= 700 for s in shorts) and len(set(shorts)) > 10  # IMDB's spread of sizes
    assert len(set(ages[keep])) > 1 and len(set(meta.identity[keep])) > 1


def test_tree_rss_tells_a_process_s_own_memory_from_the_file_pages_it_maps(tmp_path):
    """A child holding 64 MB of its own and 96 MB of a file it reads through a memory map (as the packing maps
    faces_*.npy): both count in its RSS, only the 64 MB in the anonymous sum."""
    mb = 2**20
    np.save(tmp_path / "mapped.npy", np.ones(96 * mb, np.uint8))
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, numpy as np
own = np.ones(64 * {mb}, np.uint8)  # written: resident
mapped = np.load({str(tmp_path / "mapped.npy")!r}, mmap_mode="r")
print(int(mapped.sum()), flush=True)  # read: every page of it resident
sys.stdin.read()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert int(child.stdout.readline()) == 96 * mb
        total, anon = imdb_scale.tree_rss(child.pid)
    finally:
        child.communicate("")
    assert 64 * mb <= anon < 64 * mb + 60 * mb  # its own array, and the interpreter's and numpy's few MB
    assert total - anon >= 96 * mb  # the mapped file's pages (and the libraries')
