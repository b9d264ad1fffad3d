"""pre_process.py end to end on a full-size imdb.mat: time, photos/s and peak memory at IMDB's scale.

    .venv/bin/python scripts/imdb_scale.py --rows 460723 --photos 3000 --device auto -- --workers 8
    OMP_NUM_THREADS=4 python scripts/imdb_scale.py --rows 30000 --photos 400 --device cpu --nproc 2   # sharded

Writes (once, cached in --work; a rerun with the same --rows/--photos/--pool/--seed reuses it) an
imdb.mat of --rows rows in IMDB's real field layout (synth_imdb.write_mat: dob, photo_taken,
full_path, gender, name, face_location, face_score, second_face_score, celeb_id, and 20,284
celeb_names, IMDB's count of celebrities), of which
  - --photos rows, spread evenly over the file, are photo rows: a photo on disk, each a copy of one
    of --pool distinct built-in photos (synth_imdb.generate, no dirty entries) re-sized to IMDB's
    spread of sizes (synth_imdb.imdb_sized: short side 150-700 px, median ~430), keeping that
    photo's dob, photo_taken, gender, name, face_score and celeb_id (face_location scaled with the
    photo; pre_process.py does not read it). They pass every metadata filter: detection runs on them.
  - every other row is a filler row, a row a real IMDB has that the metadata filters drop before
    detection: each fails exactly one filter, the kinds in turn: no face (face_score -inf), a face
    score below 1.0, a second face (second_face_score set), unknown gender (NaN), an impossible age
    (born 3 years after the photo). Their full_path names a file that does not exist (no filter
    that drops them looks at the disk). Otherwise they look like real rows (a random celebrity, a
    birthday for an age of 0-90, a photo year 1961-2015, a face box).
So the metadata stage parses, ages and filters all --rows rows, as on the real file, while MTCNN
sees only the photo rows. Their ages are the pool's (1-90, about uniform), so the cap of 5000 per
age drops none of them below ~400,000 photos (over_cap is reported either way).

Then pre_process.py runs as a subprocess (--root the dataset, --out a fresh WORK/out_SIZE, --size,
--device, and any arguments after --; with --nproc N > 1 under `torchrun --standalone
--nproc_per_node N`, the photos shared among N processes, each given OMP_NUM_THREADS=1 by torchrun
unless it is set: set it to the cores per process to compare with one process fairly), and again
into the same folder after deleting the packed arrays: the rerun skips every face already written but
packs again, so its time is the fixed cost (start-up, metadata, labels, packing) and the difference
is the align phase, as in scripts/pre_process_speed.py (the rerun does detect again the few photos in
which no face was found). Reported: wall time of both, align photos/s = photos detected / (run - rerun),
the same after the first batch (photos detected / the slowest process's align phase from its first batch on, by its
own clock: the wait for that batch, the decoding workers' start-up, is paid once a run), end-to-end
photos/s, rows parsed, photos detected, faces kept, retried and over_cap (from OUT/summary.json),
and peak memory two ways:
  - max RSS from os.wait4, the same number as resource.getrusage(RUSAGE_CHILDREN).ru_maxrss but for
    that one run: the largest single process among pre_process.py and the workers it waited for,
    not their sum, so it covers the spawned decode workers only partially;
  - the peak of the summed RSS of pre_process.py and all its descendants, sampled from /proc every
    0.2 s (a peak shorter than that can be missed; pages shared between processes count once per
    process, so the sum overstates what they use together);
  - the peak of the same sum without the pages mapped from files (RSS less statm's shared pages):
    the memory the processes hold themselves. The first two also count the page cache that packing
    maps: faces_*.npy is written through a memory map, 5.5 GB at IMDB's size at 112 px, which the
    kernel writes back and can evict.
Prints a table and writes --out-json. Not a CI test: minutes of CPU, ~0.2 GB of disk at 3000 photos (at 163,065,
as many as the original keeps: 6.6 GB, and 5 minutes to write and 25 to run on 2 cores).
"""
from __future__ import annotations

import datetime as dt
import io
import json
import multiprocessing as mp
import os
import pstats
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import scipy.io
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import config  # noqa: E402  (the repo's modules, after the path is set)
from pre_process import phase_report  # noqa: E402
from synth_imdb import birth_for_age, generate, imdb_sized, matlab_datenum, write_mat  # noqa: E402
from utils import UserError, argument_parser, read_image, run_main, write_jpeg, write_json  # noqa: E402

IMDB_ROWS = 460_723  # rows of the real imdb.mat
IMDB_CELEBS = 20_284  # celebrities it names (celeb_names)
FILLER_KINDS = ("no_face_score", "low_face_score", "second_face", "gender_unknown", "age_out_of_range")
# pre_process.py's drop reasons before detection; every other one is counted by the align phase
META_REASONS = ("face_score", "second_face", "gender_unknown", "age_out_of_range", "missing_file", "over_cap")


def imdb_name(row: int, celeb_id: int, birth: dt.date, taken: int) -> str:
    """A row's full_path in IMDB's pattern: NN/nm<celeb>_rm<row>_<birth>_<taken>.jpg, NN the celeb id mod 100."""
    return f"{celeb_id % 100:02d}/nm{celeb_id:07d}_rm{row}_{birth.year}-{birth.month}-{birth.day}_{taken}.jpg"


def read_fields(path: Path) -> dict[str, list]:
    """The per-row fields of a .mat written by synth_imdb.write_mat, as lists (write_mat's input)."""
    struct = scipy.io.loadmat(path)["imdb"][0, 0]
    fields = {k: list(struct[k].ravel()) for k in ("dob", "photo_taken", "gender", "face_score",
                                                   "second_face_score", "celeb_id", "face_location")}
    fields.update(full_path=[str(p[0]) for p in struct["full_path"].ravel()],
                  name=[str(n[0]) for n in struct["name"].ravel()])
    return fields


def resize_photo(job: tuple[str, str, int, int]) -> float:
    """Write the pool photo src to dst at an IMDB size (seeded by (seed, k)); the scale factor applied."""
    src, dst, seed, k = job
    photo = read_image(src)
    sized = imdb_sized(np.random.default_rng((seed, k)), photo)
    write_jpeg(dst, sized, quality=90)
    return max(sized.shape[:2]) / photo.shape[0]  # imdb_sized scales the square pool photo to its long side


def filler_row(rng: np.random.Generator, row: int, kind: str) -> dict:
    """One row that the metadata filters drop for `kind` (see the module docstring); its file does not exist."""
    cid = int(rng.integers(1, IMDB_CELEBS + 1))
    taken = int(rng.integers(1961, 2016))
    birth = birth_for_age(rng, int(rng.integers(0, 91)), taken)
    side = int(rng.integers(150, 700))
    return dict(
        dob=matlab_datenum(dt.date(taken + 3, 1, 1) if kind == "age_out_of_range" else birth),
        photo_taken=taken, full_path=imdb_name(row, cid, birth, taken),
        gender=np.nan if kind == "gender_unknown" else float(rng.random() < 0.5), name=f"Synthetic Person {cid}",
        face_location=np.array([[side // 4, side // 4, side * 3 // 4, side * 3 // 4]], dtype=np.uint16),
        face_score=(-np.inf if kind == "no_face_score" else
                    float(rng.uniform(0, config.MIN_FACE_SCORE)) if kind == "low_face_score" else float(rng.uniform(1.5, 5))),
        second_face_score=float(rng.uniform(1, 3)) if kind == "second_face" else np.nan, celeb_id=cid)


def build(root: Path, rows: int, photos: int, pool: int, seed: int, jobs: int) -> bool:
    """The dataset in root (see the module docstring), written once via root.partial; True if written now."""
    if (root / "imdb.mat").is_file():
        return False
    if not 0 < photos <= rows:
        raise UserError(f"--photos {photos} --rows {rows}: need 0 < photos <= rows")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pool = min(pool, photos)
    generate(tmp / "_pool", pool, seed=seed, dirty_fraction=0.0)
    src = read_fields(tmp / "_pool" / "imdb.mat")
    at = np.arange(photos) * rows // photos  # the photo rows, spread evenly
    row_jobs = []
    for k, row in enumerate(at):
        j = k % pool
        birth = dt.date.fromordinal(int(src["dob"][j]) - 366)
        rel = imdb_name(int(row), int(src["celeb_id"][j]), birth, int(src["photo_taken"][j]))
        row_jobs.append((str(tmp / "_pool" / src["full_path"][j]), str(tmp / rel), seed, k))
    with mp.get_context("spawn").Pool(jobs) as workers:  # spawn: the pool's MTCNN already started torch threads
        # 163,065 photos take ~5 minutes on 2 cores: a bar, so chunks of at most 256
        chunk = max(1, min(256, len(row_jobs) // (8 * jobs)))
        scales = list(tqdm(workers.imap(resize_photo, row_jobs, chunksize=chunk), total=len(row_jobs),
                           desc="photos at IMDB's sizes", unit="photo"))
    photo_of = {int(row): k for k, row in enumerate(at)}
    rng = np.random.default_rng(seed)
    fields: dict[str, list] = {k: [] for k in ("dob", "photo_taken", "full_path", "gender", "name", "face_location",
                                               "face_score", "second_face_score", "celeb_id")}
    for row in range(rows):
        k = photo_of.get(row)
        if k is None:
            record = filler_row(rng, row, FILLER_KINDS[row % len(FILLER_KINDS)])
        else:
            j = k % pool
            record = {f: src[f][j] for f in fields}
            record["full_path"] = str(Path(row_jobs[k][1]).relative_to(tmp))
            record["face_location"] = np.round(src["face_location"][j] * scales[k]).astype(np.uint16)
        for f in fields:
            fields[f].append(record[f])
    write_mat(tmp / "imdb.mat", fields, [f"Synthetic Person {i + 1}" for i in range(max(IMDB_CELEBS, pool))])
    shutil.rmtree(tmp / "_pool")
    tmp.rename(root)
    return True


def tree_rss(pid: int) -> tuple[int, int]:
    """Summed RSS in bytes of pid and all its descendants, from /proc (0 for those already gone), and the same without
    the pages mapped from files (anonymous memory: what the processes hold themselves)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except OSError:  # exited while we looked
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        tree.update(kids)
        frontier = kids
    resident = shared = 0  # pages; shared: file-backed
    for p in tree:
        try:
            r, s = map(int, Path(f"/proc/{p}/statm").read_text().split()[1:3])
        except OSError:
            continue
        resident, shared = resident + r, shared + s
    page = os.sysconf("SC_PAGE_SIZE")
    return resident * page, (resident - shared) * page


def timed_run(cmd: list[str], log: Path) -> dict:
    """Run cmd (output to log); its wall seconds, its max RSS (os.wait4) and the peak summed RSS of its tree, with and
    without the pages mapped from files, MB."""
    peak = [0, 0]
    done = threading.Event()
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)

        def sample() -> None:
            while not done.wait(0.2):
                peak[:] = map(max, peak, tree_rss(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: not mixed with earlier children's
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); the end of {log}:\n"
                         f"{log.read_text(errors='replace')[-3000:]}")
    return dict(seconds=seconds, max_rss_mb=usage.ru_maxrss / 1024, tree_peak_rss_mb=peak[0] / 2**20,
                tree_peak_anon_mb=peak[1] / 2**20)


def profile(cmd: list[str], out: Path, report: Path, log: Path) -> None:
    """The run once more, into a fresh `out`, under cProfile: which host functions take the main process's time.

    Its own run: the profiler slows Python down, so the timed runs stay unprofiled. Only the main
    process is profiled (a torchrun launcher, if any, is dropped), where MTCNN's glue runs.
    """
    shutil.rmtree(out, ignore_errors=True)
    stats = report.with_suffix(".prof")
    script = cmd.index("pre_process.py")
    timed_run([sys.executable, "-m", "cProfile", "-o", str(stats), *cmd[script:]], log)
    text = io.StringIO()
    pstats.Stats(str(stats), stream=text).sort_stats("tottime").print_stats(30)
    pstats.Stats(str(stats), stream=text).sort_stats("cumulative").print_stats(30)
    report.write_text(text.getvalue(), encoding="utf-8")
    print(f"profile of one run: {report}")


def main() -> None:
    p = argument_parser(__doc__)
    p.add_argument("--rows", type=int, default=IMDB_ROWS, help="rows of imdb.mat (default: %(default)s, the real file's)")
    p.add_argument("--photos", type=int, default=3000, help="rows with a photo on disk (default: %(default)s)")
    p.add_argument("--pool", type=int, default=300, help="distinct generated photos they are copies of (default: %(default)s)")
    p.add_argument("--device", default=config.DEVICE, help="pre_process.py --device: auto, cpu, cuda (default: %(default)s)")
    p.add_argument("--size", type=int, default=config.SIZE, help="pre_process.py --size (default: %(default)s)")
    p.add_argument("--work", default="/tmp/imdb_scale", help="the cached dataset and the outputs go here (default: %(default)s)")
    p.add_argument("--out-json", default=None, help="the results as JSON (default: WORK/results.json)")
    p.add_argument("--seed", type=int, default=0, help="seeds the dataset (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="processes writing the photos (default: %(default)s, the CPUs)")
    p.add_argument("--nproc", type=int, default=1,
                   help="pre_process.py processes (torchrun --nproc_per_node) (default: %(default)s, plain python)")
    p.add_argument("--profile", default=None,
                   help="then a third run under cProfile (one process), its busiest functions written to this text file")
    p.add_argument("extra", nargs="*", help="more pre_process.py arguments, after --")
    args = p.parse_args()
    work = Path(args.work)
    root = work / f"imdb_r{args.rows}_p{args.photos}_pool{args.pool}_s{args.seed}"
    start = time.perf_counter()
    built = build(root, args.rows, args.photos, args.pool, args.seed, args.jobs)
    build_s = time.perf_counter() - start
    print(f"dataset {root}: {'written in ' + format(build_s, '.1f') + ' s' if built else 'reused'}", flush=True)

    out = work / f"out_{args.size}"
    shutil.rmtree(out, ignore_errors=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
                if args.nproc > 1 else [sys.executable])
    cmd = [*launcher, "pre_process.py", "--root", str(root), "--out", str(out), "--size", str(args.size),
           "--device", args.device, *args.extra]
    load = os.getloadavg()[0]
    run = timed_run(cmd, work / "run.log")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    # every face written, and no packed array, which a rerun would keep: all but the align phase
    from data_gen import remove_packed  # here: data_gen loads torch, and the spawned workers import this module

    remove_packed(out)
    rerun = timed_run(cmd, work / "rerun.log")
    dropped = summary["dropped"]
    detected = summary["kept"] + sum(n for reason, n in dropped.items() if reason not in META_REASONS)
    align_s = run["seconds"] - rerun["seconds"]
    # the wait for the first batch (the decoding workers' start: torch's import in each with --prepare-in processes,
    # ~2 s) is paid once a run: at IMDB's 163,065 photos nothing, over these few thousand a visible share. So also
    # the slowest process's align phase after it, from its own clock
    first = max(r["seconds"].get("first", 0.0) for r in summary["ranks"])
    after_first = max(r["seconds"]["total"] - r["seconds"].get("first", 0.0) for r in summary["ranks"])
    result = dict(
        rows=summary["photos"], photo_rows=args.photos, pool=min(args.pool, args.photos), detected=detected,
        kept=summary["kept"], retried=summary["retried"], over_cap=dropped.get("over_cap", 0), dropped=dropped,
        run=run, rerun=rerun, align_s=align_s, align_photos_per_s=detected / align_s if align_s > 0 else None,
        first_batch_s=first, after_first_photos_per_s=detected / after_first if after_first > 0 else None,
        end_to_end_photos_per_s=detected / run["seconds"], nproc=args.nproc, ranks=summary.get("ranks"),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), device=args.device, size=args.size, extra=args.extra,
        cpus=os.cpu_count(), load_before=load, dataset=str(root), dataset_build_s=build_s if built else None,
        command=cmd)
    write_json(Path(args.out_json) if args.out_json else work / "results.json", result)
    if args.profile:
        profile(cmd, out, Path(args.profile), work / "profile.log")

    rate = f"{result['align_photos_per_s']:.1f}" if align_s > 0 else "n/a (rerun not faster)"
    after_rate = f"{result['after_first_photos_per_s']:.1f}" if after_first > 0 else "n/a"
    print(f"""pre_process.py --device {args.device} --size {args.size} {' '.join(args.extra)}, {args.nproc} process(es)
  rows parsed            {result['rows']:>10,}
  photos detected        {detected:>10,}   (photo rows {args.photos:,}, over_cap {result['over_cap']})
  faces kept             {result['kept']:>10,}   (retried with the full pyramid: {result['retried']})
  run                    {run['seconds']:>10.1f} s   ({result['end_to_end_photos_per_s']:.1f} photos/s end to end)
  rerun (fixed cost)     {rerun['seconds']:>10.1f} s
  align phase            {align_s:>10.1f} s   ({rate} photos/s)
  after the first batch  {after_first:>10.1f} s   ({after_rate} photos/s; the first after {first:.1f} s)
  max RSS, one process   {run['max_rss_mb']:>10.0f} MB   (rerun {rerun['max_rss_mb']:.0f} MB)
  peak RSS, process tree {run['tree_peak_rss_mb']:>10.0f} MB   (rerun {rerun['tree_peak_rss_mb']:.0f} MB; sampled every 0.2 s)
  the same, anonymous    {run['tree_peak_anon_mb']:>10.0f} MB   (rerun {rerun['tree_peak_anon_mb']:.0f} MB; without file pages)
  load average before    {load:>10.2f}     on {os.cpu_count()} CPUs""")
    for r in summary["ranks"]:  # the first run's: where each process's align phase went
        print(f"  rank {r['rank']}: " + phase_report(r["seconds"], r["device"], summary["settings"]["workers"]))


if __name__ == "__main__":
    run_main(main)
