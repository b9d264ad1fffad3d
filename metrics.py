"""The metrics, one implementation for train.py (validation) and evaluate.py (test sets).

Not run directly.
  gender_acc  share of faces whose predicted gender (argmax of the 2 logits) is right
  age_mae          mean |predicted age - true age| in years
  cs5              cumulative score CS(5): share of faces with |age error| <= 5 years
compute_metrics() works on numpy arrays of raw predictions (evaluate.py adds its breakdowns from the
same arrays); MetricSums accumulates the same sums on the device batch by batch, without a host
sync per batch, and can be all-reduced across processes before compute().
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

CS_K = 5  # years of tolerance of the cumulative score


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
