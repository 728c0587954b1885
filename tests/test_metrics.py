import math

import pytest
import torch
import torch.nn as nn

from trainables.metrics import accuracy, confusion_matrix, expected_calibration_error, per_class_scores, weight_l2


def test_accuracy_counts_argmax_hits():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.2, 0.1]])
    assert accuracy(logits, torch.tensor([0, 1, 0, 1])) == 0.75


# confidences 0.9 (right), 0.75 (wrong), 0.65 (right), 0.55 (wrong)
PROBS = torch.tensor([[0.9, 0.1], [0.75, 0.25], [0.35, 0.65], [0.45, 0.55]])
LABELS = torch.tensor([0, 1, 1, 0])


def test_ece_four_samples_by_hand():
    # 5 bins: (0.8, 1] holds 0.9 -> 1/4 * |1 - 0.9| = 0.025
    #         (0.6, 0.8] holds 0.75, 0.65 -> 2/4 * |0.5 - 0.7| = 0.1
    #         (0.4, 0.6] holds 0.55 -> 1/4 * |0 - 0.55| = 0.1375
    assert expected_calibration_error(PROBS, LABELS, n_bins=5) == pytest.approx(0.2625)


def test_ece_one_bin_is_accuracy_minus_mean_confidence():
    assert expected_calibration_error(PROBS, LABELS, n_bins=1) == pytest.approx(abs(0.5 - 0.7125))


def test_ece_is_zero_when_confidence_matches_accuracy():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
    assert expected_calibration_error(probs, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_ece_of_non_finite_probabilities_is_nan_not_a_crash(bad):
    probs = PROBS.clone()
    probs[2, 0] = bad
    assert math.isnan(expected_calibration_error(probs, LABELS))


def test_ece_of_no_rows_is_nan():
    assert math.isnan(expected_calibration_error(torch.empty(0, 3), torch.empty(0, dtype=torch.long)))


def test_weight_l2_of_known_weights():
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 4.0]]))
        layer.bias.fill_(12.0)
    assert weight_l2(layer) == pytest.approx(13.0)  # sqrt(9 + 16 + 144)
    assert weight_l2(nn.ReLU()) == 0.0


def test_confusion_matrix_rows_true_columns_predicted():
    cm = confusion_matrix(torch.tensor([0, 2, 1, 1, 0]), torch.tensor([0, 1, 1, 2, 0]), num_classes=3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[2, 0, 0], [0, 1, 1], [0, 1, 0]]


def test_confusion_matrix_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), num_classes=3)
    nothing = torch.tensor([], dtype=torch.long)
    assert confusion_matrix(nothing, nothing, num_classes=2).tolist() == [[0, 0], [0, 0]]


def test_per_class_scores_match_sklearn_classification_report():
    from sklearn.metrics import precision_recall_fscore_support

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (300,), generator=generator)
    preds = torch.where(torch.rand(300, generator=generator) < 0.6, labels, torch.randint(0, 4, (300,), generator=generator))
    preds[preds == 4] = 3  # class 4 is never predicted: its precision is 0, not NaN
    scores = per_class_scores(confusion_matrix(preds, labels, num_classes=6))  # class 5 never occurs at all
    expected = precision_recall_fscore_support(labels, preds, labels=range(6), zero_division=0)
    for name, values in zip(["precision", "recall", "f1", "support"], expected, strict=True):
        assert scores[name] == pytest.approx(values.tolist())
    assert scores["precision"][4] == 0 and scores["support"][5] == 0
