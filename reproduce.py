"""Reproduce the original project's results table in one command, with our numbers beside it.

    python reproduce.py --root data/imdb_crop --out runs/reproduce
    python reproduce.py --quick     # the built-in dataset, tiny settings, on the CPU: a smoke test
    python reproduce.py --root data/imdb_crop --runs 1_r18_112_l1 3_r18_112_l2   # these rows: no 224 px data

Every stage is an ordinary script run as a subprocess, its output streaming through:
  1. pre_process.py: --root at 112 and 224 px with the original's protocol (--split image) and at
     112 with ours (--split identity), the ones the runs train on, into DATA_DIR/{size}_{split}
     (default OUT/data). A data dir whose outputs are complete is reused without calling
     pre_process.py. The identity split starts from hard links to the 112 px faces (a face does not
     depend on the split), so MTCNN runs over the photos twice, not three times.
  2. train.py: every row of RUNS (or those of --runs; a recipe of configs/: train.py --config) into
     OUT/runs/NAME. A finished run is skipped; one with a last.pt that did not reach --epochs (or
     was killed in its final calibration) resumes from it; one begun under other settings is refused.
  3. evaluate.py: each best.pt on its data dir's valid split into OUT/runs/NAME/eval (skipped when
     its metrics.json is newer than best.pt).
Then OUT/results.json (one object per run, in the table's order), OUT/results.md (the original's
table, our numbers beside it) and OUT/mae_by_age.png (age MAE per true-age bucket, every run). A second invocation
runs no stage; a killed one continues where it stopped. OUT/reproduce.json records the root and
the mode, so that the runs of --quick are never resumed into the real table.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import config
from data_gen import pack_is_current, read_labels
from models import is_calibrated
from utils import (REPO, UserError, argument_parser, atomic_write_text, pyplot, read_jsonl, run_main, save_figure,
                   write_json)

OUT = "runs/reproduce"  # --out's default: the run dirs, the data dirs (unless --data-dir) and the results
QUICK_ROOT = "data/builtin_crop"  # --quick without --root: the built-in dataset (make quickstart's), written if absent
QUICK_OUT = "runs/reproduce_quick"  # --quick's default --out, apart from the real table's
QUICK_EPOCHS = 1  # --quick's default --epochs
QUICK_LIMIT = 8  # --quick: train and evaluate on the first N faces of each split
QUICK_BATCH = 8  # --quick: the batch of every row, the original's included


@dataclass(frozen=True)
class Run:
    """One row of the table: a data dir and a recipe of train.py's (configs/), or train.py's defaults."""
    name: str  # the run directory under OUT/runs
    size: int  # face side in pixels: picks the data dir
    split: str  # image (the original's protocol) or identity (ours): picks the data dir
    recipe: str | None = None  # train.py --config, relative to the repo; None: train.py's defaults
    original_gender_acc: float | None = None  # what the original's README reported, where it did
    original_age_mae: float | None = None


# The original's five rows (its README; batch 32; age weight TBD for CE), then ours beside them.
RUNS = (
    Run("1_r18_112_l1", 112, "image", "configs/original_r18_l1.toml", 0.90756, 5.710),
    Run("2_r18_224_l1", 224, "image", "configs/original_r18_l1.toml", 0.90887, 5.694),
    Run("3_r18_112_l2", 112, "image", "configs/original_r18_l2.toml", 0.90140, 5.986),
    Run("4_r18_224_ce", 224, "image", "configs/original_r18_ce.toml", 0.90064, 8.475),
    Run("5_r50_224_ce", 224, "image", "configs/original_r50_ce.toml", 0.90034, None),
    Run("dex_112", 112, "image", "configs/dex.toml"),
    Run("mv_112", 112, "image", "configs/mv.toml"),
    Run("default_112_identity", 112, "identity"),
)
# pre-processing order: the 112 px image split first, so that the identity split can link its faces
DATA_DIRS = ((112, "image"), (112, "identity"), (224, "image"))
NAMES = [run.name for run in RUNS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--root", default=None,
                   help=f"the unpacked imdb_crop/ (default: {config.ROOT}; with --quick: {QUICK_ROOT})")
    p.add_argument("--out", default=None, help=f"runs and results (default: {OUT}; with --quick: {QUICK_OUT})")
    p.add_argument("--data-dir", default=None, help="where the pre-processed data dirs go (default: OUT/data)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epochs of every run (default: {config.EPOCHS}; with --quick: {QUICK_EPOCHS})")
    p.add_argument("--device", default=None, help=f"every stage's --device (default: {config.DEVICE}; with --quick: cpu)")
    p.add_argument("--pretrained", default=None,
                   help="train.py's --pretrained: imagenet, none or PATH (default: train.py's; with --quick: none)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: the built-in dataset, {QUICK_LIMIT} faces a split, batch {QUICK_BATCH}, on the CPU")
    p.add_argument("--runs", nargs="+", choices=NAMES, default=NAMES, metavar="NAME",
                   help=f"the rows to run, pre-processing only the data dirs they train on (default: all of {', '.join(NAMES)})")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    args.root = Path(args.root or (QUICK_ROOT if args.quick else config.ROOT))
    args.out = Path(args.out or (QUICK_OUT if args.quick else OUT))
    args.data_dir = Path(args.data_dir) if args.data_dir else args.out / "data"
    args.epochs = args.epochs or (QUICK_EPOCHS if args.quick else config.EPOCHS)
    args.device = args.device or ("cpu" if args.quick else config.DEVICE)
    args.pretrained = args.pretrained or ("none" if args.quick else None)
    args.runs = [run for run in RUNS if run.name in args.runs]  # the table's order, each row once
    return args


# --- stages -----------------------------------------------------------------------------------

def run_stage(title: str, cmd: list[str], where: Path) -> None:
    """Run one script, its output streaming to ours; a failure stops everything, naming the command."""
    print(f"\n== {title}\nrun: {shlex.join(cmd)}", flush=True)  # flushed: the child writes to the same stream
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise UserError(f"{title} failed (exit code {code}): {shlex.join(cmd)}\n  {where} keeps what it finished; "
                        "fix the cause shown above and rerun reproduce.py, which continues from there")


def skip(title: str, why: str) -> None:
    print(f"== {title}: {why}, skipped", flush=True)


def script(name: str) -> str:
    return str(REPO / name)  # by absolute path: the user's relative paths stay relative to their folder


def out_mark(args: argparse.Namespace) -> dict:
    """What OUT/reproduce.json records: OUT's runs belong to one dataset and one mode."""
    return dict(root=str(args.root.resolve()), quick=args.quick)


def check_out(args: argparse.Namespace) -> None:
    """A quick run must never resume into the real table: an OUT marked for another root or mode is refused. The mark
    is written once the data dirs are made (main), so that a mistyped --root marks nothing."""
    mark, now = args.out / "reproduce.json", out_mark(args)
    if mark.is_file():
        before = json.loads(mark.read_text())
        if before != now:
            raise UserError(f"--out {args.out}: its runs were made from {before['root']}"
                            f"{' with --quick' if before['quick'] else ''}, not from {now['root']}"
                            f"{' with --quick' if args.quick else ''}; pass another --out (or delete {args.out})")


def data_dir(args: argparse.Namespace, size: int, split: str) -> Path:
    return args.data_dir / f"{size}_{split}"


def data_complete(path: Path, root: Path, size: int, split: str) -> bool:
    """Whether pre_process.py finished `path` from `root` at `size` and `split`.

    It writes summary.json, then labels.csv, then faces_{split}.npy for each non-empty split: each array current
    for labels.csv and its faces (data_gen.pack_is_current, the loader's own check) means a finished run (one killed
    on the way leaves an array missing, or stale). A data dir made from other photos or at another size is an error,
    not something to redo over.
    """
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        return False
    summary = json.loads(summary_path.read_text())
    settings = summary["settings"]
    made = (Path(settings["root"]).resolve(), settings["size"], settings["split"])
    if made != (root.resolve(), size, split):
        raise UserError(f"{path} was pre-processed from {made[0]} at {made[1]} px, split {made[2]}, not from "
                        f"{root.resolve()} at {size} px, split {split}; pass another --data-dir (or delete {path})")
    if not (path / "labels.csv").is_file():
        return False
    return all(pack_is_current(path, s, read_labels(path, s).images) for s in ("train", "valid") if summary[s])


def link_faces(src: Path, dst: Path) -> int:
    """Hard-link the aligned faces of src into dst, where pre_process.py then skips them; how many were linked.

    A link is made whole or not at all, so a kill leaves no half face; where links are impossible
    (another file system) nothing is linked and pre_process.py aligns every face itself.
    """
    linked = 0
    for face in (src / "faces").rglob("*.jpg"):
        target = dst / face.relative_to(src)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(face, target)
        except OSError:
            break
        linked += 1
    return linked


def data_dirs(runs: list[Run]) -> list[tuple[int, str]]:
    """The (size, split) of the data dirs that runs train on, in DATA_DIRS' order."""
    used = {(run.size, run.split) for run in runs}
    return [d for d in DATA_DIRS if d in used]


def pre_process_all(args: argparse.Namespace) -> None:
    for size, split in data_dirs(args.runs):
        path, title = data_dir(args, size, split), f"pre-process {size} px, split {split}"
        if data_complete(path, args.root, size, split):
            skip(title, f"{path} is complete")
            continue
        same_faces = data_dir(args, size, "image")
        if split != "image" and data_complete(same_faces, args.root, size, "image"):
            print(f"linked {link_faces(same_faces, path)} faces from {same_faces}", flush=True)
        # the root made absolute: summary.json records it as given, and a relative one means another folder elsewhere
        run_stage(title, [sys.executable, script("pre_process.py"), "--root", str(args.root.resolve()),
                          "--out", str(path), "--size", str(size), "--split", split, "--device", args.device], path)


def train_command(args: argparse.Namespace, run: Run) -> list[str]:
    cmd = [sys.executable, script("train.py")] + (["--config", str(REPO / run.recipe)] if run.recipe else [])
    cmd += ["--data", str(data_dir(args, run.size, run.split)), "--out", str(args.out / "runs" / run.name),
            "--epochs", str(args.epochs), "--device", args.device]
    for flag, value in (("--batch-size", QUICK_BATCH if args.quick else None), ("--pretrained", args.pretrained),
                        ("--limit", QUICK_LIMIT if args.quick else None)):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def epochs_done(run_dir: Path) -> int:
    """The last epoch metrics.jsonl records (0 for none)."""
    log = run_dir / "metrics.jsonl"
    return max((r["epoch"] for r in read_jsonl(log)), default=0) if log.is_file() else 0


def asked_settings(args: argparse.Namespace, run: Run) -> dict:
    """The settings this invocation asks of run's train.py that make its row, as config.json records them: the
    recipe's, then reproduce.py's own (--epochs, --pretrained, --quick's batch and limit), which override them."""
    asked = {key.replace("-", "_"): value for key, value in recipe_of(run).items()}
    asked.update(epochs=args.epochs, pretrained=args.pretrained or config.PRETRAINED)
    if args.quick:
        asked.update(batch_size=QUICK_BATCH, limit=QUICK_LIMIT)
    return asked


def recipe_of(run: Run) -> dict:
    """The train.py options of run's recipe ({} for train.py's defaults)."""
    return tomllib.loads((REPO / run.recipe).read_text(encoding="utf-8")) if run.recipe else {}


def check_run(run_dir: Path, asked: dict) -> None:
    """A run begun under other settings (another --epochs, an edited recipe, another --pretrained) would be skipped
    or resumed into the table as if it were this invocation's: refused, naming what differs."""
    saved = json.loads((run_dir / "config.json").read_text())
    diffs = [f"{key} {saved.get(key)!r} there, {value!r} now" for key, value in asked.items() if saved.get(key) != value]
    if diffs:
        raise UserError(f"{run_dir} was trained with other settings ({'; '.join(diffs)}); rerun with its settings, "
                        f"or delete {run_dir} (or pass another --out) to train it anew")


def train_all(args: argparse.Namespace) -> None:
    for run in args.runs:
        run_dir, title = args.out / "runs" / run.name, f"train {run.name}"
        if (run_dir / "config.json").is_file():
            check_run(run_dir, asked_settings(args, run))
        done = epochs_done(run_dir)
        best = run_dir / "best.pt"
        # not calibrated: killed in train.py's last step, which its --resume does
        if done >= args.epochs and best.is_file() and is_calibrated(best):
            skip(title, f"finished ({done} epochs)")
            continue
        cmd = train_command(args, run)
        if (run_dir / "last.pt").is_file():
            cmd += ["--resume", str(run_dir / "last.pt")]
            title += f", resuming after epoch {done}"
        run_stage(title, cmd, run_dir)


def evaluate_all(args: argparse.Namespace) -> None:
    for run in args.runs:
        run_dir, title = args.out / "runs" / run.name, f"evaluate {run.name}"
        best, metrics = run_dir / "best.pt", run_dir / "eval" / "metrics.json"
        if metrics.is_file() and metrics.stat().st_mtime_ns >= best.stat().st_mtime_ns:
            skip(title, f"{metrics} is newer than {best.name}")
            continue
        cmd = [sys.executable, script("evaluate.py"), "--checkpoint", str(best),
               "--data", str(data_dir(args, run.size, run.split)), "--out", str(metrics.parent), "--device", args.device]
        if args.quick:
            cmd += ["--limit", str(QUICK_LIMIT)]  # the faces train.py validated on
        run_stage(title, cmd, metrics.parent)


# --- results ----------------------------------------------------------------------------------

def read_run(run_dir: Path, run: Run) -> tuple[dict, int, dict]:
    """(the run's results.json object, its global batch, evaluate.py's MAE per true-age bucket), from its own files."""
    cfg = json.loads((run_dir / "config.json").read_text())
    log = read_jsonl(run_dir / "metrics.jsonl")
    ev = json.loads((run_dir / "eval" / "metrics.json").read_text())
    result = dict(size=cfg["size"], arch=cfg["arch"], age_loss=cfg["age_loss"], age_weight=cfg["age_weight"],
                  split=run.split, epochs=max(r["epoch"] for r in log),
                  gender_acc=ev["metrics"]["gender_acc"], age_mae=ev["metrics"]["age_mae"], cs5=ev["metrics"]["cs5"],
                  seconds=sum(r["seconds"] for r in log))  # a resumed run's log keeps its earlier epochs
    for key in ("original_gender_acc", "original_age_mae"):
        if getattr(run, key) is not None:
            result[key] = getattr(run, key)
    return result, cfg["global_batch"], {label: s["age_mae"] for label, s in ev["by_age_bucket"].items()}


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{seconds:.0f} s" if seconds < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def percent(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.3f}%"


def years(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def table(results: list[dict], batches: list[int], args: argparse.Namespace) -> str:
    """results.md: the original's rows with its numbers and ours side by side, then our extra rows."""
    lines = [f"# The original's table, reproduced ({'--quick: built-in data, tiny settings; not real numbers' if args.quick else args.root})",
             "", "| # | image size | network | age loss | age weight | batch | split | epochs | gender acc. original "
             "| gender acc. ours | age MAE original | age MAE ours | CS(5) ours | training |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, r, batch in zip(args.runs, results, batches):
        network = r["arch"].replace("resnet", "ResNet-")
        lines.append(f"| {run.name} | {r['size']}x{r['size']} | {network} | {r['age_loss']} | {r['age_weight']:g} | "
                     f"{batch} | {r['split']} | {r['epochs']} | {percent(r.get('original_gender_acc'))} | "
                     f"{percent(r['gender_acc'])} | {years(r.get('original_age_mae'))} | {years(r['age_mae'])} | "
                     f"{percent(r['cs5'])} | {duration(r['seconds'])} |")
    lines += ["", "Ours: best.pt of each run on its data dir's valid split (evaluate.py). The original's rows 1-5 use "
              "its recipe (its batch and age weights: configs/original_*.toml); dex_112 and mv_112 change only the "
              "age loss (configs/dex.toml, configs/mv.toml) and default_112_identity uses train.py's defaults. "
              "Training: the sum of the epochs' seconds in metrics.jsonl.", "",
              "![age MAE by true age](mae_by_age.png)", ""]
    return "\n".join(lines)


def plot_buckets(path: Path, buckets: dict[Run, dict]) -> None:
    """One line per run (ours dashed): age MAE in each true-age bucket (evaluate.py's breakdown)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for run, mae in buckets.items():
        labels = sorted(mae, key=lambda b: int(b.split("-")[0].rstrip("+")))  # metrics.json sorts its keys as text
        ax.plot(labels, [float("nan") if mae[b] is None else mae[b] for b in labels], marker="o", label=run.name,
                linestyle="-" if run.original_gender_acc is not None else "--")
    ax.set(xlabel="true age (years)", ylabel="age MAE (years)", title="Age MAE by true age, every run (valid split)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_results(args: argparse.Namespace) -> list[dict]:
    results, batches, buckets = zip(*(read_run(args.out / "runs" / run.name, run) for run in args.runs))
    write_json(args.out / "results.json", list(results))
    text = table(list(results), list(batches), args)
    atomic_write_text(args.out / "results.md", text)
    plot_buckets(args.out / "mae_by_age.png", dict(zip(args.runs, buckets)))
    print("\n" + text)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'} and {args.out / 'mae_by_age.png'}")
    return list(results)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.quick and not (args.root / "imdb.mat").is_file() and str(args.root) == QUICK_ROOT:
        # synth_imdb.py writes imdb.mat last: without it the dataset is absent or unfinished
        run_stage("write the built-in dataset", [sys.executable, script("synth_imdb.py"), "--out", str(args.root)],
                  args.root)
    check_out(args)
    pre_process_all(args)
    if not (args.out / "reproduce.json").is_file():
        write_json(args.out / "reproduce.json", out_mark(args))
    train_all(args)
    evaluate_all(args)
    return write_results(args)


if __name__ == "__main__":
    run_main(main)
