"""pre_process.py against an older commit's, on the same IMDB-sized photos: photos/s of each, the ratio.

    .venv/bin/python scripts/pre_process_speed.py --photos 800 --rounds 2

Writes the built-in dataset (synth_imdb.generate) once, its photos resized to IMDB's spread of sizes
(synth_imdb.imdb_sized: short side 150-700 px, median ~430), checks the old commit out in a git
worktree (--old-tree), and runs both pre_process.py as subprocesses on those photos with the same
arguments, alternately (old, new, new, old, ...) so that a busy machine slows both alike, each into
a fresh folder. Each run is followed by a rerun into the same folder, its packed arrays deleted, which
skips every face already written but packs again: its time is the run's fixed cost (start-up,
metadata, labels, packing), so the align phase is the difference. Prints each run, the load
average, the ratios, and how the kept photos compare
(labels.csv rows as sets, split aside); exits 1 if the new code dropped a photo the old one kept.
Not a CI test: minutes of CPU.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_gen import remove_packed  # noqa: E402  (the repo's modules, after the path is set)
from synth_imdb import generate, imdb_sized  # noqa: E402
from utils import argument_parser, read_image, run_main, write_jpeg  # noqa: E402


def make_photos(root: Path, n: int, seed: int) -> None:
    """The built-in dataset in root, every photo written again at an IMDB size (once: kept for reruns)."""
    if (root / "imdb.mat").is_file():
        return
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, n, seed=seed)
    rng = np.random.default_rng(seed)
    for path in sorted(tmp.glob("*/*.jpg")):
        if path.stat().st_size > 1000:  # the planted empty and corrupt files stay as they are
            write_jpeg(path, imdb_sized(rng, read_image(path)), quality=90)
    tmp.rename(root)


def old_tree(path: Path, commit: str) -> Path:
    """A git worktree of `commit` at path (added once, detached)."""
    if not (path / "pre_process.py").is_file():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=REPO, check=True)
    return path


def timed(tree: Path, root: Path, out: Path, extra: list[str]) -> float:
    """Seconds of one pre_process.py run of that tree (its own code, our interpreter)."""
    cmd = [sys.executable, "pre_process.py", "--root", str(root), "--out", str(out), "--device", "cpu", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} (in {tree}) failed:\n{proc.stderr[-3000:]}")
    return seconds


def rows(out: Path) -> set[tuple]:
    """labels.csv's rows without the split column: 02182c5 drew the split by another rule (a later commit
    made each side a hash of the person alone), so the kept photos are compared on every other column."""
    with open(out / "labels.csv", newline="", encoding="utf-8") as f:
        return {tuple((k, v) for k, v in sorted(r.items()) if k != "split") for r in csv.DictReader(f)}


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--photos", type=int, default=800, help="photos in the dataset (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each, alternated (default: %(default)s)")
    p.add_argument("--old", default="02182c5", help="the commit to compare with (default: %(default)s)")
    p.add_argument("--old-tree", default="/tmp/old02182c5", help="its git worktree (default: %(default)s)")
    p.add_argument("--work", default="/tmp/pre_process_speed", help="photos and outputs go here (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the photos (default: %(default)s)")
    p.add_argument("extra", nargs="*", help="more pre_process.py arguments for both, after --")
    args = p.parse_args()
    work = Path(args.work)
    root = work / f"imdb_sized_{args.photos}_{args.seed}"
    make_photos(root, args.photos, args.seed)
    trees = {"old": old_tree(Path(args.old_tree), args.old), "new": REPO}
    results: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for who in (("old", "new") if r % 2 == 0 else ("new", "old")):
            out = work / f"out_{who}"
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            total = timed(trees[who], root, out, args.extra)
            remove_packed(out)  # a rerun keeps a current array: with none, it packs as a whole run does
            fixed = timed(trees[who], root, out, args.extra)  # every face written: all but the align phase
            kept = rows(out)
            results[who].append(dict(total=total, fixed=fixed, kept=kept))
            print(f"round {r + 1} {who}: {total:.1f} s end to end, {fixed:.1f} s of it fixed (the rerun), "
                  f"{len(kept)} photos kept; load average before: {load:.2f}", flush=True)
    old, new = results["old"][0]["kept"], results["new"][0]["kept"]
    stable = all(x["kept"] == results[who][0]["kept"] for who, rs in results.items() for x in rs)
    rate = {who: {"end_to_end": args.photos * len(rs) / sum(x["total"] for x in rs),
                  "align": args.photos * len(rs) / sum(x["total"] - x["fixed"] for x in rs)}
            for who, rs in results.items()}
    for who, rs in rate.items():
        print(f"{who}: {rs['end_to_end']:.1f} photos/s end to end, {rs['align']:.1f} photos/s in the align phase")
    print(f"ratio new/old: {rate['new']['end_to_end'] / rate['old']['end_to_end']:.2f}x end to end, "
          f"{rate['new']['align'] / rate['old']['align']:.2f}x align phase; {args.photos} photos")
    print(f"kept: old {len(old)}, new {len(new)}; labels.csv rows (but split) "
          + ("equal as a set" if old == new else f"differ: {len(old - new)} only old's, {len(new - old)} only new's "
             "(faces the full pyramid missed)")
          + ("" if stable else "; a rerun of the same code kept other photos"))
    if old - new or not stable:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
