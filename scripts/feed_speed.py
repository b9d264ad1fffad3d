"""How fast pre_process.py's align phase feeds a GPU, without one: an older commit's against ours, on a CPU.

    .venv/bin/python scripts/feed_speed.py --detect-ms 10 5

pre_process.align_all of each tree runs as on a GPU (device cuda:0, its threads and batch), on the
same IMDB-sized photos (scripts/pre_process_speed.make_photos), with MTCNN replaced by a stand-in that
sleeps --detect-ms per photo and finds a face in each (a corner of the photo is written): as a GPU,
it leaves the cores to decoding, shrinking (and, for a GPU, making the pyramids) and writing. So photos/s end to end, against the stand-in's own rate, shows what the
feeding costs: decoding in --workers processes, the threads that shrink, the hand-offs between them.
Trees run alternately (old, new, new, old, ...), each in a fresh process on its own code; the line of
each run is its phase split (pre_process.phase_report). Not a CI test: a minute or more of CPU.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pre_process_speed import make_photos, old_tree  # noqa: E402  (after the path is set)
from utils import argument_parser, run_main  # noqa: E402


# One align_all of the tree it runs in (its cwd, first on sys.path; python -c, so that the decoding processes
# spawned import that tree's modules too, not this script's), timed; prints JSON. argv[1]: the settings as JSON.
CHILD = """
import json, sys, time
import numpy as np
import face, pre_process

s = json.loads(sys.argv[1])
detector = face.FaceDetector(device="cpu")  # prepare_crop reads its settings
detector.device = face.torch.device("cuda")  # so it does a GPU run's host work (a pyramid); its nets never run


def search_crops(detector, searches):  # as a GPU: the cores are left to the feeding; a face in each crop
    time.sleep(s["detect_s"] * len(searches))
    return [["a face"]] * len(searches)


def detect_in_crops(detector, images, searches):  # the same, for the trees before search_crops
    return search_crops(detector, searches), [False] * len(images)


if __name__ == "__main__":
    face.FaceDetector = lambda device: detector
    face.search_crops, face.detect_in_crops = search_crops, detect_in_crops
    face.align_central = lambda img, found, size, center: dict(face=np.ascontiguousarray(img[:size, :size]))
    root, out = pre_process.Path(s["root"]), pre_process.Path(s["out"])
    paths = sorted(p for p in root.glob("*/*.jpg") if p.stat().st_size > 1000)  # not the planted broken files
    todo = [(p, out / str(r) / p.relative_to(root)) for r in range(s["repeat"]) for p in paths]
    start = time.perf_counter()
    seconds = pre_process.align_all(todo, 112, "drop", "cuda:0", s["workers"], s["batch"], 95)[2]
    wall = time.perf_counter() - start
    print(json.dumps(dict(photos=len(todo), seconds=wall, report=pre_process.phase_report(seconds, "cuda:0", s["workers"]))))
"""


def feed(tree: Path, settings: dict) -> dict:
    """One run of CHILD in tree: {photos, seconds, report}."""
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], cwd=tree, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--old", default="5331473", help="the commit to compare with; the default is the last one before "
                   "the next window was taken in while one is detected (default: %(default)s)")
    p.add_argument("--old-tree", default="/tmp/feed_speed_old", help="its git worktree (default: %(default)s)")
    p.add_argument("--detect-ms", type=float, nargs="+", default=[10.0, 5.0],
                   help="the stand-in detector's ms per photo, one comparison each (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="pre_process.py --workers (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="photos per detection call, as on a GPU (default: %(default)s)")
    p.add_argument("--photos", type=int, default=800, help="photos made (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="each photo aligned this many times (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each tree, alternated (default: %(default)s)")
    p.add_argument("--work", default="/tmp/feed_speed", help="photos and outputs go here (default: %(default)s)")
    args = p.parse_args()
    work = Path(args.work)
    root = work / f"imdb_sized_{args.photos}"
    make_photos(root, args.photos, 0)
    trees = {"old": old_tree(Path(args.old_tree), args.old), "new": REPO}
    for ms in args.detect_ms:
        rates: dict[str, list[float]] = {"old": [], "new": []}
        settings = dict(detect_s=ms / 1000, workers=args.workers, batch=args.batch, repeat=args.repeat,
                        root=str(root), out=str(work / "out"))
        for r in range(args.rounds):
            for who in (("old", "new") if r % 2 == 0 else ("new", "old")):
                run = feed(trees[who], settings)
                rates[who].append(run["photos"] / run["seconds"])
                print(f"detection {ms:g} ms/photo, {who}: {rates[who][-1]:.0f} photos/s; {run['report']}", flush=True)
        old, new = (sum(rates[w]) / len(rates[w]) for w in ("old", "new"))
        print(f"detection {ms:g} ms/photo ({1000 / ms:.0f} photos/s): old {old:.0f}, new {new:.0f} photos/s, "
              f"ratio new/old {new / old:.2f}x")


if __name__ == "__main__":
    run_main(main)
