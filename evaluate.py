"""Evaluate a checkpoint: gender accuracy, age MAE, CS(5) and their breakdowns, with plots.

    python evaluate.py --checkpoint runs/r18_112/best.pt --data data/imdb_112    # its valid split
    python evaluate.py --checkpoint runs/r18_112/best.pt --utkface data/UTKFace  # raw labelled photos
    python evaluate.py --checkpoint runs/r18_112/best.pt --csv photos/labels.csv # raw labelled photos

Sources (one of):
  --data DIR      a pre_process.py output: the rows of DIR/labels.csv in --split (default valid).
                  Their faces are already aligned; each is read with utils.read_image and fed
                  through data_gen.preprocess, exactly as in validation.
  --utkface DIR   photos named age_gender_race_date.jpg (UTKFace; `.jpg.chip.jpg` too). UTKFace's
                  gender is 0 = male, 1 = female, the reverse of ours; it is flipped on reading.
                  Names that do not parse are counted and skipped.
  --csv FILE      a UTF-8 CSV with a header and the columns `image` (path relative to the CSV's folder,
                  or absolute), `age` (years) and `gender` (male/female, m/f, or 1/0 with 1 = male,
                  as in labels.csv); other columns are ignored.
The raw photos of --utkface and --csv go through the same detection (MTCNN, the central face)
and alignment as training (face.py); photos where no face is found, or that are not images, are
counted and skipped.

Metrics: gender accuracy, age MAE and CS(5) from metrics.py (the one implementation, shared
with train.py), plus MAE per true-age bucket (0-9, 10-19, ..., 70+) and per gender, gender
accuracy per age bucket and the 2x2 gender confusion matrix (rows true, columns predicted).
How far to trust the predictions:
  calibration     the ECE of the gender probability (15 equal-width bins of the predicted
                  class's confidence) at the checkpoint's temperature, the reliability diagram's
                  bins, and the temperature used (train.py fits it on the validation split)
  age_interval    for ce/dex/mv heads: the share of true ages inside the 80% interval
                  age_low..age_high, overall and per age bucket (null for l1/l2: no interval)
  by_gender_age   gender x age bucket: n, age MAE, gender accuracy, and few=true where n is below
                  --min-group (too few faces to trust the numbers)
  flip            with --flip (each face and its mirror image averaged): the headline metrics
                  and ECE of the plain and of the flipped predictions, from the same forward pass
Writes OUT/metrics.json, OUT/predictions.csv (one row per face: truth and prediction, with
age_std, age_low, age_high, empty for l1/l2) and the plots OUT/mae_by_age.png,
OUT/age_scatter.png, OUT/gender_acc_by_age.png, OUT/reliability.png and OUT/groups.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

import config
# before face (torch): inference sets torch's OpenMP spinning, read when torch loads
from inference import (GENDERS, INTERVAL_KEYS, Labelled, Model, OnnxModel, add_checkpoint_option, check_flip,
                       detector_for, load_model, predict, predicted_gender, read_ahead, read_csv_labels, read_utkface)
import torch  # after inference, as face is
from metrics import compute_metrics, interval_coverage, reliability
from data_gen import load_split
from face import FaceDetector, detect_and_align
from utils import (UserError, argument_parser, check_output_folder, chunks_within, pick_device, pyplot,
                   read_image_or_reason, run_main, save_figure, write_csv, write_json)

BUCKET_EDGES = (0, 10, 20, 30, 40, 50, 60, 70)  # lower bounds; the last bucket is open: 70+
BUCKET_LABELS = tuple(f"{lo}-{lo + 9}" for lo in BUCKET_EDGES[:-1]) + (f"{BUCKET_EDGES[-1]}+",)


# --- labelled photos -------------------------------------------------------------------------

def read_pre_processed(data: Path, split: str) -> list[Labelled]:
    """The rows of DATA/labels.csv in `split` (checked by data_gen.load_split, as train.py reads them)."""
    if not (data / "labels.csv").is_file():
        raise UserError(f"--data {data}: no labels.csv there; make it with `python pre_process.py --out {data}` "
                        "(or pass --utkface / --csv for raw labelled photos)")
    labels = load_split(data, split)
    return [Labelled(data / image, float(age), int(gender))
            for image, age, gender in zip(labels.images, labels.age, labels.gender)]


# --- the two kinds of evaluation -------------------------------------------------------------

def read_images(items: list[Labelled], workers: int, ahead: int, unit: str, skipped: dict
                ) -> Iterator[tuple[Labelled, np.ndarray]]:
    """Yield (item, RGB image) in order, decoded in `workers` threads at most `ahead` photos in advance
    (so memory does not grow with the data), with a progress bar.

    Files that are not usable images are counted in `skipped` by reason and left out.
    """
    with tqdm(total=len(items), desc="evaluate", unit=unit, file=sys.stderr, disable=None) as bar:
        for item, img in read_ahead(items, lambda it: read_image_or_reason(it.path), workers, ahead):
            bar.update(1)
            if isinstance(img, str):
                skipped[img] = skipped.get(img, 0) + 1
                print(f"warning: {item.path}: {img.replace('_', ' ')}, skipped", file=sys.stderr)
            else:
                yield item, img


def evaluate_aligned(items: list[Labelled], model: Model, cfg: dict, device: str | torch.device, batch_size: int,
                     workers: int, flip: bool = False) -> tuple[list[dict], dict]:
    """Predict pre-aligned faces: (records, skipped count per reason)."""
    size = int(cfg["size"])
    records, skipped = [], {}
    # aligned faces are small: decoding may run a whole batch ahead of the forward pass
    for batch in chunks_within(read_images(items, workers, batch_size, "face", skipped), batch_size):
        for item, img in batch:
            if img.shape[:2] != (size, size):
                raise UserError(f"{item.path}: a {img.shape[1]}x{img.shape[0]} face, but the checkpoint takes "
                                f"{size}x{size}; evaluate on a pre_process.py output made with --size {size}")
        records += _records([it for it, _ in batch],
                            predict(model, cfg, np.stack([img for _, img in batch]), device, batch_size, flip))
    return records, skipped


def evaluate_photos(items: list[Labelled], model: Model, cfg: dict, device: str | torch.device, batch_size: int,
                    workers: int, detector: FaceDetector | None = None, detect_pixels: int = config.DETECT_PIXELS,
                    flip: bool = False) -> tuple[list[dict], dict]:
    """Detect, align and predict raw labelled photos: (records, skipped count per reason).

    MTCNN's working memory grows with the pixels it is given, so each detection call gets at most
    detect_pixels pixels of photos (and at most batch_size photos; a larger photo goes alone);
    the aligned faces are then predicted batch_size at a time.
    """
    if detector is None:
        detector = detector_for(model, device)
    size = int(cfg["size"])
    records, skipped = [], {}

    def aligned() -> Iterator[tuple[Labelled, np.ndarray]]:
        photos = read_images(items, workers, 2 * max(1, workers), "photo", skipped)
        for chunk in chunks_within(photos, detect_pixels, lambda p: p[1].shape[0] * p[1].shape[1], batch_size):
            for (item, _), found in zip(chunk, detect_and_align(detector, [img for _, img in chunk], size)):
                if found is None:
                    skipped["no_face"] = skipped.get("no_face", 0) + 1
                else:
                    yield item, found["face"]

    for batch in chunks_within(aligned(), batch_size):
        records += _records([it for it, _ in batch],
                            predict(model, cfg, np.stack([face for _, face in batch]), device, batch_size, flip))
    return records, skipped


def _records(items: list[Labelled], pred: dict) -> list[dict]:
    """predictions.csv's rows; with a flip of a PyTorch model, each also holds its plain prediction
    under "plain" ({pred_age, p_male}), which the CSV leaves out."""
    out = []
    for k, item in enumerate(items):
        r = dict(image=str(item.path), age=float(item.age), gender=int(item.gender), pred_age=float(pred["age"][k]),
                 pred_gender=int(predicted_gender(pred["p_male"][k])), p_male=float(pred["p_male"][k]),
                 **{key: None if np.isnan(pred[key][k]) else float(pred[key][k]) for key in INTERVAL_KEYS})
        if "plain" in pred:
            r["plain"] = dict(pred_age=float(pred["plain"]["age"][k]), p_male=float(pred["plain"]["p_male"][k]))
        out.append(r)
    return out


# --- breakdowns --------------------------------------------------------------------------------

def age_bucket(ages: np.ndarray) -> np.ndarray:
    """Bucket index per age: 0 for 0-9, 1 for 10-19, ..., 7 for 70 and over (negative ages -> 0)."""
    return np.clip(np.floor(np.asarray(ages, dtype=np.float64) / 10).astype(np.int64), 0, len(BUCKET_EDGES) - 1)


def _group_stats(err: np.ndarray, right: np.ndarray, mask: np.ndarray) -> dict:
    """{n, age_mae, gender_acc} of the faces in mask (None where it is empty); err, right, mask (N,)."""
    n = int(mask.sum())
    return dict(n=n, age_mae=float(err[mask].mean()) if n else None, gender_acc=float(right[mask].mean()) if n else None)


def breakdown(pred_age: np.ndarray, true_age: np.ndarray, pred_gender: np.ndarray, true_gender: np.ndarray) -> dict:
    """MAE per true-age bucket and per true gender, gender accuracy per bucket, confusion matrix.

    Empty groups get n 0 and null (None) values. confusion[t][p] counts true class t predicted p.
    """
    pred_age, true_age = np.asarray(pred_age, np.float64), np.asarray(true_age, np.float64)
    pred_gender, true_gender = np.asarray(pred_gender, np.int64), np.asarray(true_gender, np.int64)
    err = np.abs(pred_age - true_age)
    right = pred_gender == true_gender
    bucket = age_bucket(true_age)
    confusion = np.zeros((2, 2), dtype=np.int64)
    np.add.at(confusion, (true_gender, pred_gender), 1)
    return dict(
        by_age_bucket={label: _group_stats(err, right, bucket == b) for b, label in enumerate(BUCKET_LABELS)},
        by_gender={name: _group_stats(err, right, true_gender == g) for g, name in enumerate(GENDERS)},
        confusion=dict(rows="true", columns="predicted", labels=list(GENDERS), matrix=confusion.tolist()),
    )


def group_table(pred_age: np.ndarray, true_age: np.ndarray, pred_gender: np.ndarray, true_gender: np.ndarray,
                min_n: int = config.MIN_GROUP) -> dict:
    """{gender: {age bucket: {n, age_mae, gender_acc, few}}}: the errors of each true gender x true-age
    bucket; few is true where n < min_n (too few faces for the numbers to mean much)."""
    true_age, true_gender = np.asarray(true_age, np.float64), np.asarray(true_gender, np.int64)
    err = np.abs(np.asarray(pred_age, np.float64) - true_age)
    right = np.asarray(pred_gender, np.int64) == true_gender
    bucket = age_bucket(true_age)
    table = {}
    for g, name in enumerate(GENDERS):
        table[name] = {}
        for b, label in enumerate(BUCKET_LABELS):
            stats = _group_stats(err, right, (true_gender == g) & (bucket == b))
            table[name][label] = dict(stats, few=stats["n"] < min_n)
    return table


def interval_report(records: list[dict]) -> dict | None:
    """Coverage of the predicted age intervals, overall and per true-age bucket; None without intervals (l1/l2)."""
    if records[0]["age_low"] is None:
        return None
    low, high, true = (np.array([r[k] for r in records], np.float64) for k in ("age_low", "age_high", "age"))
    bucket = age_bucket(true)
    return dict(level=config.AGE_INTERVAL, coverage=interval_coverage(low, high, true),
                mean_width=float((high - low).mean()), mean_age_std=float(np.mean([r["age_std"] for r in records])),
                by_age_bucket={label: dict(n=int((bucket == b).sum()),
                                           coverage=interval_coverage(low[bucket == b], high[bucket == b], true[bucket == b]))
                               for b, label in enumerate(BUCKET_LABELS)})


def headline(pred_age: np.ndarray, true_age: np.ndarray, pred_gender: np.ndarray, true_gender: np.ndarray) -> dict:
    """Gender accuracy, age MAE, CS(5): metrics.py's implementation, the one train.py reports."""
    return compute_metrics(np.asarray(pred_age, np.float64), np.asarray(true_age, np.float64),
                           np.asarray(pred_gender, np.int64), np.asarray(true_gender, np.int64))


# --- outputs -----------------------------------------------------------------------------------

HEADLINE_NAMES = {"gender_acc": ("gender accuracy", True), "age_mae": ("age MAE (years)", False),
                  "cs5": ("CS(5)", True)}  # metrics.py's keys -> printed name, shown as a percentage


def format_counts(skipped: dict) -> str:
    """'reason n, reason n' in reason order."""
    return ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if pct else f"{v:.2f}"


def format_table(result: dict) -> str:
    h = result["metrics"]
    lines = [f"{result['n']} faces evaluated" + (f"; skipped: {format_counts(result['skipped'])}" if result["skipped"] else ""),
             ""]
    for k, v in h.items():
        name, pct = HEADLINE_NAMES.get(k, (k, False))
        lines.append(f"  {name:<16}{_fmt(v, pct) if isinstance(v, float) else v:>10}")
    lines += ["", f"  {'true age':<9}{'n':>7}{'age MAE':>10}{'gender acc':>12}"]
    for label, s in result["by_age_bucket"].items():
        lines.append(f"  {label:<9}{s['n']:>7}{_fmt(s['age_mae']):>10}{_fmt(s['gender_acc'], True):>12}")
    lines += ["", f"  {'gender':<9}{'n':>7}{'age MAE':>10}{'gender acc':>12}"]
    for label, s in result["by_gender"].items():
        lines.append(f"  {label:<9}{s['n']:>7}{_fmt(s['age_mae']):>10}{_fmt(s['gender_acc'], True):>12}")
    m = result["confusion"]["matrix"]
    lines += ["", "  confusion (rows: true, columns: predicted)", f"  {'':<9}{'female':>9}{'male':>9}",
              f"  {'female':<9}{m[0][0]:>9}{m[0][1]:>9}", f"  {'male':<9}{m[1][0]:>9}{m[1][1]:>9}"]
    c = result["calibration"]
    lines += ["", f"  gender ECE ({len(c['counts'])} bins) {_fmt(c['ece'], True)} at temperature {c['temperature']:.3g}"]
    interval = result["age_interval"]
    if interval is None:
        lines.append("  age interval: none (an l1/l2 head predicts one value, no distribution)")
    else:
        lines.append(f"  age interval ({100 * interval['level']:g}%): coverage {_fmt(interval['coverage'], True)}, "
                     f"mean width {interval['mean_width']:.1f} years")
        lines.append("    by true age: " + ", ".join(f"{label} {_fmt(s['coverage'], True)}"
                                                    for label, s in interval["by_age_bucket"].items() if s["n"]))
    lines += ["", f"  {'gender':<8}{'true age':<9}{'n':>7}{'age MAE':>10}{'gender acc':>12}"]
    for gender, rows in result["by_gender_age"].items():
        for label, s in rows.items():
            lines.append(f"  {gender:<8}{label:<9}{s['n']:>7}{_fmt(s['age_mae']):>10}{_fmt(s['gender_acc'], True):>12}"
                         + (f"  (n < {result['min_group']}: too few)" if s["few"] else ""))
    if "flip" in result:
        lines += ["", f"  {'':<10}{'gender acc':>12}{'age MAE':>10}{'CS(5)':>10}{'gender ECE':>12}"]
        for name, v in result["flip"].items():
            lines.append(f"  {name:<10}{_fmt(v['gender_acc'], True):>12}{_fmt(v['age_mae']):>10}{_fmt(v['cs5'], True):>10}"
                         f"{_fmt(v['gender_ece'], True):>12}")
    return "\n".join(lines)


def plot(out: Path, records: list[dict], result: dict) -> list[Path]:
    """The three PNGs: MAE by age bucket, predicted vs true age, gender accuracy by age bucket."""
    plt = pyplot()
    labels = list(BUCKET_LABELS)
    buckets = result["by_age_bucket"]
    counts = [buckets[b]["n"] for b in labels]
    paths = [out / "mae_by_age.png", out / "age_scatter.png", out / "gender_acc_by_age.png"]

    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(labels, [buckets[b]["age_mae"] or 0 for b in labels], color="#4C72B0")
    for bar, n in zip(bars, counts):
        ax.annotate(f"n={n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set(xlabel="true age (years)", ylabel="age MAE (years)",
           title=f"Age MAE by age (overall {result['metrics'].get('age_mae', float('nan')):.2f})")
    save_figure(fig, paths[0])

    true_age = np.array([r["age"] for r in records])
    pred_age = np.array([r["pred_age"] for r in records])
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    few = len(records) < 1000
    ax.scatter(true_age, pred_age, s=16 if few else 4, alpha=0.8 if few else 0.3, color="#4C72B0", edgecolors="none")
    hi = max(100.0, float(true_age.max(initial=0)), float(pred_age.max(initial=0)))
    lo = min(0.0, float(pred_age.min(initial=0)))
    ax.plot([lo, hi], [lo, hi], color="#C44E52", lw=1, label="prediction = truth")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="true age (years)", ylabel="predicted age (years)",
           title=f"Predicted vs true age ({len(records)} faces)")
    ax.set_aspect("equal")
    ax.legend(loc="upper left")
    save_figure(fig, paths[1])

    fig, ax = plt.subplots(figsize=(8, 4))
    acc = [100 * (buckets[b]["gender_acc"] or 0) for b in labels]
    bars = ax.bar(labels, acc, color="#55A868")
    for bar, n in zip(bars, counts):
        ax.annotate(f"n={n}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set(xlabel="true age (years)", ylabel="gender accuracy (%)", ylim=(0, 105),
           title=f"Gender accuracy by age (overall {100 * result['metrics'].get('gender_acc', float('nan')):.2f}%)")
    save_figure(fig, paths[2])
    return paths


def plot_trust(out: Path, result: dict) -> list[Path]:
    """The reliability diagram (reliability.png) and the gender x age-bucket errors (groups.png)."""
    plt = pyplot()
    paths = [out / "reliability.png", out / "groups.png"]
    c = result["calibration"]
    edges = np.array(c["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    filled = [k for k, n in enumerate(c["counts"]) if n]
    ax.bar(centres[filled], [c["accuracy"][k] for k in filled], width=width * 0.9, color="#4C72B0", label="accuracy")
    ax.plot([c["confidence"][k] for k in filled], [c["accuracy"][k] for k in filled], "o", color="#DD8452",
            label="(mean confidence, accuracy)")
    for k in filled:
        ax.annotate(f"{c['counts'][k]}", (centres[k], c["accuracy"][k]), ha="center", va="bottom", fontsize=7)
    ax.plot([0, 1], [0, 1], color="#C44E52", lw=1, label="perfect calibration")
    ax.set(xlim=(0.5, 1), ylim=(0, 1.05), xlabel="confidence of the predicted gender", ylabel="accuracy",
           title=f"Gender reliability: ECE {100 * c['ece']:.2f}% (T = {c['temperature']:.3g})")
    ax.legend(loc="upper left", fontsize=8)
    save_figure(fig, paths[0])

    table, labels = result["by_gender_age"], list(BUCKET_LABELS)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(len(labels))
    for g, (gender, rows) in enumerate(table.items()):
        colour = {"female": "#C44E52", "male": "#4C72B0"}[gender]
        for ax, key, scale in ((axes[0], "age_mae", 1), (axes[1], "gender_acc", 100)):
            values = [(rows[b][key] or 0) * scale for b in labels]
            bars = ax.bar(x + (g - 0.5) * 0.4, values, 0.4, color=colour, label=gender)
            for bar, b in zip(bars, labels):
                if rows[b]["few"]:  # too few faces to trust: pale and hatched
                    bar.set_alpha(0.35)
                    bar.set_hatch("//")
                ax.annotate(f"{rows[b]['n']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7)
    axes[0].set(xticks=x, xticklabels=labels, xlabel="true age (years)", ylabel="age MAE (years)", title="Age MAE")
    axes[1].set(xticks=x, xticklabels=labels, xlabel="true age (years)", ylabel="gender accuracy (%)", ylim=(0, 105),
                title="Gender accuracy")
    axes[0].legend()
    fig.suptitle(f"Errors per gender x age (n above the bars; hatched: n < {result['min_group']})")
    save_figure(fig, paths[1])
    return paths


def write_predictions(path: Path, records: list[dict]) -> None:
    write_csv(path, ("image", "age", "gender", "pred_age", "pred_gender", "p_male") + INTERVAL_KEYS,
              [{k: v for k, v in r.items() if k != "plain"} for r in records])


def trust(pred_age: np.ndarray, p_male: np.ndarray, true_age: np.ndarray, true_gender: np.ndarray) -> dict:
    """The headline metrics and the gender ECE of one set of predictions (plain or flipped)."""
    pred_gender = predicted_gender(p_male)
    return dict(headline(pred_age, true_age, pred_gender, true_gender),
                gender_ece=reliability(p_male, true_gender)["ece"])


def summarize(records: list[dict], skipped: dict, temperature: float = 1.0, min_group: int = config.MIN_GROUP) -> dict:
    """metrics.json's content (less the run's settings) from the per-face records; temperature: the one
    the gender probabilities were made with (reported beside their ECE)."""
    if not records:
        raise UserError("no face could be evaluated" + (f" (skipped: {format_counts(skipped)})" if skipped else ""))
    pred_age = np.array([r["pred_age"] for r in records])
    true_age = np.array([r["age"] for r in records])
    pred_gender = np.array([r["pred_gender"] for r in records])
    true_gender = np.array([r["gender"] for r in records])
    p_male = np.array([r["p_male"] for r in records])
    result = dict(n=len(records), photos=len(records) + sum(skipped.values()), skipped=dict(sorted(skipped.items())),
                  metrics=headline(pred_age, true_age, pred_gender, true_gender),
                  **breakdown(pred_age, true_age, pred_gender, true_gender),
                  calibration=dict(temperature=temperature, **reliability(p_male, true_gender)),
                  age_interval=interval_report(records),
                  by_gender_age=group_table(pred_age, true_age, pred_gender, true_gender, min_group), min_group=min_group)
    if "plain" in records[0]:
        plain = trust(np.array([r["plain"]["pred_age"] for r in records]), np.array([r["plain"]["p_male"] for r in records]),
                      true_age, true_gender)
        result["flip"] = dict(plain=plain, flipped=trust(pred_age, p_male, true_age, true_gender))
    return result


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argument_parser(__doc__)
    add_checkpoint_option(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, help=f"pre_process.py output (default: {config.DATA})")
    src.add_argument("--utkface", default=None, help="folder of photos named age_gender_race_date.jpg")
    src.add_argument("--csv", default=None, help="CSV with columns image,age,gender (paths relative to it)")
    p.add_argument("--split", default="valid", choices=("train", "valid"),
                   help="with --data: the split to evaluate (default: %(default)s)")
    p.add_argument("--out", default=config.EVAL_OUT, help="where metrics.json and the plots go (default: %(default)s)")
    p.add_argument("--device", default=config.DEVICE, help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=config.EVAL_BATCH, help="faces per forward pass (default: %(default)s)")
    p.add_argument("--detect-pixels", type=int, default=config.DETECT_PIXELS,
                   help="--utkface/--csv: photo pixels per MTCNN call; bounds its memory (default: %(default)s)")
    p.add_argument("--workers", type=int, default=config.WORKERS, help="image decoding threads (default: %(default)s)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N photos, 0 = all (default: %(default)s)")
    p.add_argument("--flip", action="store_true",
                   help="average each face with its mirror image; prints the plain and the flipped results")
    p.add_argument("--temperature", type=float, default=None,
                   help="a .pt's gender temperature instead of the one it stores (1: uncalibrated; default: the stored one)")
    p.add_argument("--min-group", type=int, default=config.MIN_GROUP,
                   help="gender x age groups with fewer faces are flagged as too few to trust (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.detect_pixels < 1:
        raise UserError(f"--detect-pixels {args.detect_pixels}: must be at least 1")
    if args.limit < 0:  # a slice's negative end would drop the last photos instead
        raise UserError(f"--limit {args.limit}: must be 0 (all) or more")
    check_output_folder(args.out, f"--out {args.out}")
    if args.utkface:
        items, bad = read_utkface(Path(args.utkface))
        source = dict(kind="utkface", path=args.utkface)
    elif args.csv:
        items, bad = read_csv_labels(Path(args.csv)), 0
        source = dict(kind="csv", path=args.csv)
    else:
        data = args.data or config.DATA
        items, bad = read_pre_processed(Path(data), args.split), 0
        source = dict(kind="pre_processed", path=data, split=args.split)
    if args.limit:
        items = items[:args.limit]
    device = pick_device(args.device)
    model, cfg = load_model(args.checkpoint, device)
    check_flip(model, args.flip)
    if args.temperature is not None:
        if isinstance(model, OnnxModel):
            raise UserError(f"--temperature: {args.checkpoint} has its temperature inside the graph; pass the .pt")
        if not args.temperature > 0:
            raise UserError(f"--temperature {args.temperature}: must be positive")
        model.gender_temperature = args.temperature
    temperature = cfg["gender_temperature"] if isinstance(model, OnnxModel) else model.gender_temperature
    if source["kind"] == "pre_processed":
        records, skipped = evaluate_aligned(items, model, cfg, device, args.batch_size, args.workers, args.flip)
    else:
        records, skipped = evaluate_photos(items, model, cfg, device, args.batch_size, args.workers,
                                           detect_pixels=args.detect_pixels, flip=args.flip)
    if bad:
        skipped["bad_name"] = bad
    result = summarize(records, skipped, temperature, args.min_group)
    out = Path(args.out)
    write_predictions(out / "predictions.csv", records)
    plots = plot(out, records, result) + plot_trust(out, result)
    result = dict(checkpoint=str(args.checkpoint), source=source, arch=cfg.get("arch"), age_loss=cfg.get("age_loss"),
                  size=cfg.get("size"), flipped=args.flip or bool(cfg.get("flip")), **result,
                  plots=[p.name for p in plots], predictions="predictions.csv")
    write_json(out / "metrics.json", result)
    print(format_table(result))
    print(f"\nwrote {out / 'metrics.json'}, {out / 'predictions.csv'} and {', '.join(p.name for p in plots)}")
    return result


if __name__ == "__main__":
    run_main(main)
