"""Confusion matrix → PA, CPA, MIoU: a hand-computed case and a torchmetrics cross-check."""
import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex, MulticlassPrecision, MulticlassRecall

from bloodseg.errors import DataError
from bloodseg.metrics import ConfusionMatrix, confusion_matrix, per_image_scores, scores


def test_hand_computed_example():
    target = np.array([[0, 0, 1], [2, 2, 2]])
    pred = np.array([[0, 1, 1], [2, 0, 2]])
    cm = confusion_matrix(pred, target)
    # rows = truth, columns = prediction
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert cm.dtype == torch.long
    s = scores(cm)
    assert s["pa"] == pytest.approx(4 / 6)
    assert s["cpa"] == pytest.approx([1 / 2, 1 / 2, 2 / 2])     # precision: TP / predicted
    assert s["recall"] == pytest.approx([1 / 2, 1 / 1, 2 / 3])  # TP / actual
    assert s["iou"] == pytest.approx([1 / 3, 1 / 2, 2 / 3])
    assert s["miou"] == pytest.approx((1 / 3 + 1 / 2 + 2 / 3) / 3)


def test_absent_class_is_skipped_by_the_mean():
    target = torch.tensor([0, 0, 2, 2])
    s = scores(confusion_matrix(torch.tensor([0, 2, 2, 2]), target))
    assert math.isnan(s["iou"][1]) and math.isnan(s["cpa"][1])
    assert s["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_logits_are_argmaxed_and_accumulate_over_batches():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 8, 8)
    target = torch.randint(0, 3, (4, 8, 8))
    acc = ConfusionMatrix(3)
    acc.update(logits[:2], target[:2]).update(logits[2:], target[2:])
    assert torch.equal(acc.compute(), confusion_matrix(logits.argmax(1), target))
    assert acc.compute().sum() == 4 * 8 * 8
    # one image given as C x H x W logits
    assert torch.equal(confusion_matrix(logits[0], target[0]), confusion_matrix(logits[0].argmax(0), target[0]))
    acc.reset()
    assert acc.compute().sum() == 0


def test_bad_labels_and_shapes_are_refused():
    with pytest.raises(DataError, match="0..2"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="shape"):
        confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    cm = confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 255, 2]), ignore_index=255)
    assert cm.sum() == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_torchmetrics(seed):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 3, (5, 16, 16), generator=g)
    # a prediction that is right about 70 % of the time, so scores are not all near 1/3
    noise = torch.randint(0, 3, target.shape, generator=g)
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.7, target, noise)
    s = scores(confusion_matrix(pred, target))

    pa = MulticlassAccuracy(num_classes=3, average="micro")(pred, target)
    iou = MulticlassJaccardIndex(num_classes=3, average=None)(pred, target)
    miou = MulticlassJaccardIndex(num_classes=3, average="macro")(pred, target)
    precision = MulticlassPrecision(num_classes=3, average=None)(pred, target)
    recall = MulticlassRecall(num_classes=3, average=None)(pred, target)
    assert s["pa"] == pytest.approx(float(pa), abs=1e-6)
    assert s["iou"] == pytest.approx(iou.tolist(), abs=1e-6)
    assert s["miou"] == pytest.approx(float(miou), abs=1e-6)
    assert s["cpa"] == pytest.approx(precision.tolist(), abs=1e-6)
    assert s["recall"] == pytest.approx(recall.tolist(), abs=1e-6)


def test_per_image_scores_and_dataset_level_differ():
    target = torch.tensor([[[0, 0], [0, 0]], [[1, 2], [2, 2]]])
    pred = torch.tensor([[[0, 0], [0, 0]], [[2, 2], [2, 2]]])
    per_image = per_image_scores(pred, target)
    assert [r["pa"] for r in per_image] == pytest.approx([1.0, 0.75])
    assert per_image[0]["miou"] == pytest.approx(1.0)  # only background present, the rest skipped
    whole = scores(confusion_matrix(pred, target))
    assert whole["pa"] == pytest.approx(7 / 8)
    assert whole["miou"] != pytest.approx(np.mean([r["miou"] for r in per_image]))
    with pytest.raises(DataError):
        per_image_scores(pred, target[:1])
