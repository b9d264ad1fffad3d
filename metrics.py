"""The metrics, one implementation for train.py (validation) and evaluate.py (test sets).

Not run directly.
  gender_acc  share of faces whose predicted gender (argmax of the 2 logits) is right
  age_mae          mean |predicted age - true age| in years
  cs5              cumulative score CS(5): share of faces with |age error| <= 5 years
  ece              expected calibration error of the gender probability: 15 equal-width bins of
                   the predicted class's confidence, sum over bins of (share of faces) x
                   |accuracy - mean confidence| (Guo et al., ICML 2017)
  coverage         share of true ages inside the predicted interval [age_low, age_high]
fit_temperature() finds the one temperature T minimising the gender NLL of softmax(logits / T).
compute_metrics() works on numpy arrays of raw predictions (evaluate.py adds its breakdowns from the
same arrays); MetricSums accumulates the same sums on the device batch by batch, without a host
sync per batch, and can be all-reduced across processes before compute().
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

CS_K = 5  # years of tolerance of the cumulative score
ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
TEMPERATURE_RANGE = (0.05, 20.0)  # fit_temperature searches log T in this range (a wider optimum is a broken head)


def compute_metrics(pred_age: np.ndarray, true_age: np.ndarray, pred_gender: np.ndarray, true_gender: np.ndarray,
                    k: int = CS_K) -> dict:
    """{gender_acc, age_mae, cs<k>} over N faces; ages in years, genders 0/1, all arrays (N,)."""
    err = np.abs(np.asarray(pred_age, np.float64) - np.asarray(true_age, np.float64))
    if err.size == 0:
        raise ValueError("no predictions to score")
    right = np.asarray(pred_gender) == np.asarray(true_gender)
    return {"gender_acc": float(right.mean()), "age_mae": float(err.mean()), f"cs{k}": float((err <= k).mean())}


class MetricSums:
    """Sums of the metrics' numerators, kept on the device: update() per batch, compute() once at the end."""

    FIELDS = ("n", "gender_right", "abs_err", "within_k", "loss")

    def __init__(self, device: torch.device, k: int = CS_K):
        self.k = k
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)

    def update(self, pred_age: torch.Tensor, true_age: torch.Tensor, pred_gender: torch.Tensor,
               true_gender: torch.Tensor, mean_loss: torch.Tensor | None = None) -> None:
        """Add a batch: predictions and truths (N,), mean_loss the batch's mean loss (a 0-d tensor) if any."""
        err = (pred_age.double() - true_age.double()).abs()  # (N,)
        n = err.numel()
        loss = mean_loss.detach().double() * n if mean_loss is not None else err.new_zeros(())
        # new_full is a fill kernel; new_tensor would be a host->device copy, which waits for the queue
        self.sums += torch.stack([err.new_full((), float(n)), (pred_gender == true_gender).sum().double(),
                                  err.sum(), (err <= self.k).sum().double(), loss])

    def all_reduce(self) -> None:
        """Sum over the processes of a distributed run (each validated its own shard)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)

    def compute(self) -> dict:
        """{gender_acc, age_mae, cs<k>, loss}: one host sync."""
        s = dict(zip(self.FIELDS, self.sums.tolist()))
        if s["n"] == 0:
            raise ValueError("no predictions to score")
        return {"gender_acc": s["gender_right"] / s["n"], "age_mae": s["abs_err"] / s["n"],
                f"cs{self.k}": s["within_k"] / s["n"], "loss": s["loss"] / s["n"]}


# --- calibration and intervals -------------------------------------------------------------------

def reliability(p_male: np.ndarray, true_gender: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per confidence bin (k/bins, (k+1)/bins]: counts, mean confidence and accuracy (None where empty), and the ECE.

    The confidence is that of the predicted class, max(p_male, 1 - p_male), so only bins above 0.5 fill.
    """
    p = np.asarray(p_male, np.float64)
    if p.size == 0:
        raise ValueError("no predictions to score")
    pred = (p > 0.5).astype(np.int64)  # inference.predicted_gender's rule
    conf = np.where(pred == 1, p, 1 - p)
    right = (pred == np.asarray(true_gender, np.int64)).astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)  # (N,) bin index
    n = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, conf, minlength=bins)
    right_sum = np.bincount(which, right, minlength=bins)
    ece = float(np.abs(right_sum - conf_sum).sum() / p.size)  # sum_b n_b/N |acc_b - conf_b|
    return dict(ece=ece, edges=np.linspace(0, 1, bins + 1).tolist(), counts=n.tolist(),
                confidence=[float(c / k) if k else None for c, k in zip(conf_sum, n)],
                accuracy=[float(r / k) if k else None for r, k in zip(right_sum, n)])


def expected_calibration_error(p_male: np.ndarray, true_gender: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of P(male) against the true genders (0/1), all (N,)."""
    return reliability(p_male, true_gender, bins)["ece"]


def gender_nll(logits: np.ndarray, true_gender: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature); logits (N, 2), genders (N,)."""
    z = np.asarray(logits, np.float64) / temperature  # (N, 2)
    log_p = z - np.logaddexp(z[:, 0], z[:, 1])[:, None]  # (N, 2) log-softmax
    return float(-log_p[np.arange(len(z)), np.asarray(true_gender, np.int64)].mean())


def fit_temperature(logits: np.ndarray, true_gender: np.ndarray, steps: int = 60) -> float | None:
    """The T in TEMPERATURE_RANGE minimising gender_nll: golden-section search on log T; None where there is no
    minimum inside the range. Where every gender is right (a small or easy validation split), the NLL only falls as T
    shrinks, to 0 (in floats, often 0.0 already inside the range, so the search stops anywhere on that flat stretch),
    and such a T would make every probability 1.0, wrong guesses' too; where every one is wrong, it falls as T grows.

    The NLL is convex in 1/T, hence unimodal in log T, which the search needs; 60 steps shrink
    the bracket (log 400 wide) by 0.618^60 ~ 3e-13.
    """
    if len(logits) == 0:
        raise ValueError("no logits to fit a temperature on")
    logits = np.asarray(logits, np.float64)
    true = np.asarray(true_gender, np.int64)
    margin = logits[np.arange(len(true)), true] - logits[np.arange(len(true)), 1 - true]  # (N,) > 0: right
    if (margin >= 0).all() or (margin <= 0).all():  # a tie's NLL is log 2 at every T: no help either way
        return None
    lo, hi = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    g = (np.sqrt(5) - 1) / 2

    def f(log_t: float) -> float:
        return gender_nll(logits, true_gender, float(np.exp(log_t)))

    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(steps):
        if fa < fb:  # the minimum lies in [lo, b]
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    log_t = (lo + hi) / 2
    ends = np.log(TEMPERATURE_RANGE)
    return None if np.isclose(log_t, ends, atol=1e-3).any() else float(np.exp(log_t))


def interval_coverage(age_low: np.ndarray, age_high: np.ndarray, true_age: np.ndarray) -> float | None:
    """Share of true ages inside [age_low, age_high] (bounds included); None where there are no intervals
    (NaN bounds: l1/l2 heads) or no faces."""
    low, high = np.asarray(age_low, np.float64), np.asarray(age_high, np.float64)
    true = np.asarray(true_age, np.float64)
    if low.size == 0 or np.isnan(low).all():
        return None
    return float(((low <= true) & (true <= high)).mean())
