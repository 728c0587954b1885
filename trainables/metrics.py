"""Per-epoch metrics computed from model outputs, in plain torch."""

import math

import torch
import torch.nn as nn


def predictions(logits: torch.Tensor) -> torch.Tensor:
    """Arg-max class of each row; -1 (no class) where a row's outputs are not all finite.

    A diverged model's NaN outputs would otherwise "predict" whichever class argmax picks for NaN,
    and score the frequency of that class as its accuracy."""
    return torch.where(torch.isfinite(logits).all(dim=1), logits.argmax(dim=1), -1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose predicted class equals the label; rows with non-finite outputs count as wrong."""
    return (predictions(logits) == labels).float().mean().item()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of |B|/n * |accuracy(B) - confidence(B)|.

    Confidence is the max class probability; bins are (k/n_bins, (k+1)/n_bins]. Returns NaN
    when there are no rows or any probability is not finite (a diverged model has no calibration).
    """
    if probs.numel() == 0 or not torch.isfinite(probs).all():
        return float("nan")
    confidence, predicted = probs.detach().max(dim=1)
    # float64 on the CPU: exact sums, and weighted bincount is not deterministic on CUDA
    confidence = confidence.double().cpu()
    correct = (predicted == labels).double().cpu()
    inner_edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)[1:-1]
    bin_index = torch.bucketize(confidence, inner_edges)
    confidence_sum = torch.bincount(bin_index, weights=confidence, minlength=n_bins)
    correct_sum = torch.bincount(bin_index, weights=correct, minlength=n_bins)
    # |B|/n * |acc(B) - conf(B)| == |sum of correct in B - sum of confidence in B| / n
    return ((correct_sum - confidence_sum).abs().sum() / len(confidence)).item()


def weight_l2(model: nn.Module) -> float:
    """L2 norm of all parameters taken as one vector: sqrt(sum of squares)."""
    return math.sqrt(sum(torch.linalg.vector_norm(p.detach()).item() ** 2 for p in model.parameters()))


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 counts, rows = true class, columns = predicted class."""
    preds, labels = preds.long().flatten(), labels.long().flatten()
    both = torch.cat([preds, labels])
    if both.numel() and (both.min() < 0 or both.max() >= num_classes):
        raise ValueError(f"preds and labels must lie in [0, {num_classes}) for num_classes={num_classes}")
    counts = torch.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def per_class_scores(confusion: torch.Tensor) -> dict[str, list]:
    """Precision, recall, F1 and support of each class from a [true][pred] confusion matrix, as
    sklearn's classification_report gives them (0 for a class never predicted or never present)."""
    confusion = confusion.double()
    hits, predicted, actual = confusion.diag(), confusion.sum(dim=0), confusion.sum(dim=1)
    precision = torch.where(predicted > 0, hits / predicted, 0.0)
    recall = torch.where(actual > 0, hits / actual, 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": actual.long().tolist()}
