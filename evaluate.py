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
  --csv FILE      a CSV with a header and the columns `image` (path relative to the CSV's folder,
                  or absolute), `age` (years) and `gender` (male/female, m/f, or 1/0 with 1 = male,
                  as in labels.csv); other columns are ignored.
The raw photos of --utkface and --csv go through the same detection (MTCNN, the central face)
and alignment as training (face.py); photos where no face is found, or that are not images, are
counted and skipped.

Metrics: gender accuracy, age MAE and CS(5) from metrics.py (the one implementation, shared
with train.py), plus MAE per true-age bucket (0-9, 10-19, ..., 70+) and per gender, gender
accuracy per age bucket and the 2x2 gender confusion matrix (rows true, columns predicted).
Writes OUT/metrics.json, OUT/predictions.csv (one row per face: truth and prediction) and the
plots OUT/mae_by_age.png, OUT/age_scatter.png and OUT/gender_acc_by_age.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

import config
# before face (torch): inference sets torch's OpenMP spinning, read when torch loads
from inference import (GENDERS, Labelled, load_model, predict, predicted_gender, read_ahead, read_csv_labels,
                       read_utkface)
from face import detect_and_align
from utils import UserError, chunks_within, pick_device, pyplot, read_image_or_reason, run_main, save_figure, write_csv, write_json

BUCKET_EDGES = (0, 10, 20, 30, 40, 50, 60, 70)  # lower bounds; the last bucket is open: 70+
BUCKET_LABELS = tuple(f"{lo}-{lo + 9}" for lo in BUCKET_EDGES[:-1]) + (f"{BUCKET_EDGES[-1]}+",)


# --- labelled photos -------------------------------------------------------------------------

def read_pre_processed(data: Path, split: str) -> list[Labelled]:
    """The rows of DATA/labels.csv in `split` (checked by data_gen.load_split, as train.py reads them)."""
    from data_gen import load_split

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
    from tqdm import tqdm

    with tqdm(total=len(items), desc="evaluate", unit=unit, file=sys.stderr, disable=None) as bar:
        for item, img in read_ahead(items, lambda it: read_image_or_reason(it.path), workers, ahead):
            bar.update(1)
            if isinstance(img, str):
                skipped[img] = skipped.get(img, 0) + 1
                print(f"warning: {item.path}: {img.replace('_', ' ')}, skipped", file=sys.stderr)
            else:
                yield item, img


def evaluate_aligned(items: list[Labelled], model, cfg: dict, device, batch_size: int, workers: int
                     ) -> tuple[list[dict], dict]:
    """Predict pre-aligned faces: (records, skipped count per reason)."""
    size = int(cfg["size"])
    records, skipped = [], {}
    # aligned faces are small: decoding may run a whole batch ahead of the forward pass
    for batch in chunks_within(read_images(items, workers, batch_size, "face", skipped), batch_size):
        for item, img in batch:
            if img.shape[:2] != (size, size):
                raise UserError(f"{item.path}: a {img.shape[1]}x{img.shape[0]} face, but the checkpoint takes "
                                f"{size}x{size}; evaluate on a pre_process.py output made with --size {size}")
        p_male, ages = predict(model, cfg, np.stack([img for _, img in batch]), device, batch_size)
        records += [_record(it, p, a) for (it, _), p, a in zip(batch, p_male, ages)]
    return records, skipped


def evaluate_photos(items: list[Labelled], model, cfg: dict, device, batch_size: int, workers: int,
                    detector=None, detect_pixels: int = config.DETECT_PIXELS) -> tuple[list[dict], dict]:
    """Detect, align and predict raw labelled photos: (records, skipped count per reason).

    MTCNN's working memory grows with the pixels it is given, so each detection call gets at most
    detect_pixels pixels of photos (and at most batch_size photos; a larger photo goes alone);
    the aligned faces are then predicted batch_size at a time.
    """
    if detector is None:
        from face import FaceDetector

        detector = FaceDetector(device=str(device))
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
        p_male, ages = predict(model, cfg, np.stack([face for _, face in batch]), device, batch_size)
        records += [_record(it, p, a) for (it, _), p, a in zip(batch, p_male, ages)]
    return records, skipped


def _record(item: Labelled, p_male: float, age: float) -> dict:
    return dict(image=str(item.path), age=float(item.age), gender=int(item.gender), pred_age=float(age),
                pred_gender=int(predicted_gender(p_male)), p_male=float(p_male))


# --- breakdowns --------------------------------------------------------------------------------

def age_bucket(ages: np.ndarray) -> np.ndarray:
    """Bucket index per age: 0 for 0-9, 1 for 10-19, ..., 7 for 70 and over (negative ages -> 0)."""
    return np.clip(np.floor(np.asarray(ages, dtype=np.float64) / 10).astype(np.int64), 0, len(BUCKET_EDGES) - 1)


def breakdown(pred_age, true_age, pred_gender, true_gender) -> dict:
    """MAE per true-age bucket and per true gender, gender accuracy per bucket, confusion matrix.

    Empty groups get n 0 and null (None) values. confusion[t][p] counts true class t predicted p.
    """
    pred_age, true_age = np.asarray(pred_age, np.float64), np.asarray(true_age, np.float64)
    pred_gender, true_gender = np.asarray(pred_gender, np.int64), np.asarray(true_gender, np.int64)
    err = np.abs(pred_age - true_age)
    right = pred_gender == true_gender
    bucket = age_bucket(true_age)

    def stats(mask):
        n = int(mask.sum())
        return dict(n=n, age_mae=float(err[mask].mean()) if n else None,
                    gender_acc=float(right[mask].mean()) if n else None)

    confusion = np.zeros((2, 2), dtype=np.int64)
    np.add.at(confusion, (true_gender, pred_gender), 1)
    return dict(
        by_age_bucket={label: stats(bucket == b) for b, label in enumerate(BUCKET_LABELS)},
        by_gender={name: stats(true_gender == g) for g, name in enumerate(GENDERS)},
        confusion=dict(rows="true", columns="predicted", labels=list(GENDERS), matrix=confusion.tolist()),
    )


def headline(pred_age, true_age, pred_gender, true_gender) -> dict:
    """Gender accuracy, age MAE, CS(5): metrics.py's implementation, the one train.py reports."""
    import metrics

    return metrics.compute_metrics(np.asarray(pred_age, np.float64), np.asarray(true_age, np.float64),
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


def write_predictions(path: Path, records: list[dict]) -> None:
    write_csv(path, ("image", "age", "gender", "pred_age", "pred_gender", "p_male"), records)


def summarize(records: list[dict], skipped: dict) -> dict:
    """metrics.json's content (less the run's settings) from the per-face records."""
    if not records:
        raise UserError("no face could be evaluated" + (f" (skipped: {format_counts(skipped)})" if skipped else ""))
    pred_age = np.array([r["pred_age"] for r in records])
    true_age = np.array([r["age"] for r in records])
    pred_gender = np.array([r["pred_gender"] for r in records])
    true_gender = np.array([r["gender"] for r in records])
    return dict(n=len(records), photos=len(records) + sum(skipped.values()), skipped=dict(sorted(skipped.items())),
                metrics=headline(pred_age, true_age, pred_gender, true_gender),
                **breakdown(pred_age, true_age, pred_gender, true_gender))


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=config.CHECKPOINT,
                   help="best.pt written by train.py, or a .onnx written by export.py (onnxruntime on the CPU: "
                        "faster there) (default: %(default)s)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, help=f"pre_process.py output (default: {config.DATA})")
    src.add_argument("--utkface", default=None, help="folder of photos named age_gender_race_date.jpg")
    src.add_argument("--csv", default=None, help="CSV with columns image,age,gender (paths relative to it)")
    p.add_argument("--split", default="valid", help="with --data: the split to evaluate (default: %(default)s)")
    p.add_argument("--out", default=config.EVAL_OUT, help="where metrics.json and the plots go (default: %(default)s)")
    p.add_argument("--device", default=config.DEVICE, help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=config.EVAL_BATCH, help="faces per forward pass (default: %(default)s)")
    p.add_argument("--detect-pixels", type=int, default=config.DETECT_PIXELS,
                   help="--utkface/--csv: photo pixels per MTCNN call; bounds its memory (default: %(default)s)")
    p.add_argument("--workers", type=int, default=config.WORKERS, help="image decoding threads (default: %(default)s)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N photos, 0 = all (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.detect_pixels < 1:
        raise UserError(f"--detect-pixels {args.detect_pixels}: must be at least 1")
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
    if source["kind"] == "pre_processed":
        records, skipped = evaluate_aligned(items, model, cfg, device, args.batch_size, args.workers)
    else:
        records, skipped = evaluate_photos(items, model, cfg, device, args.batch_size, args.workers,
                                           detect_pixels=args.detect_pixels)
    if bad:
        skipped["bad_name"] = bad
    result = summarize(records, skipped)
    out = Path(args.out)
    write_predictions(out / "predictions.csv", records)
    plots = plot(out, records, result)
    result = dict(checkpoint=str(args.checkpoint), source=source, arch=cfg.get("arch"), age_loss=cfg.get("age_loss"),
                  size=cfg.get("size"), **result, plots=[p.name for p in plots], predictions="predictions.csv")
    write_json(out / "metrics.json", result)
    print(format_table(result))
    print(f"\nwrote {out / 'metrics.json'}, {out / 'predictions.csv'} and {', '.join(p.name for p in plots)}")
    return result


if __name__ == "__main__":
    run_main(main)
