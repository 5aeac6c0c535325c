import math

import numpy as np
import pytest
import torch

from stpp_hf.metrics import SegmentationMetric, confusion_matrix, iou_from_confusion, per_image_miou


def numpy_reference_miou(pairs, num_classes):
    """Spec section 6 written independently with numpy: one histogram over all pairs, nan-mean."""
    hist = np.zeros((num_classes, num_classes))
    for prediction, target in pairs:
        prediction, target = prediction.numpy().ravel(), target.numpy().ravel()
        keep = (target >= 0) & (target < num_classes)
        hist += np.bincount(num_classes * target[keep] + prediction[keep], minlength=num_classes**2).reshape(
            num_classes, num_classes
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    return np.nanmean(iou), iou


def test_streaming_metric_matches_numpy_reference_with_ignored_pixels():
    generator = torch.Generator().manual_seed(0)
    num_classes = 5
    pairs = []
    for height, width in [(7, 9), (12, 5), (6, 6)]:
        target = torch.randint(0, num_classes, (height, width), generator=generator)
        target[torch.rand(height, width, generator=generator) < 0.2] = 255
        target[0, 0] = 17  # outside [0, C): ignored like 255
        prediction = torch.randint(0, num_classes, (height, width), generator=generator)
        pairs.append((prediction, target))
    metric = SegmentationMetric(num_classes, ["a", "b", "c", "d", "e"])
    for prediction, target in pairs:
        metric.update(prediction, target)
    result = metric.compute()
    expected_miou, expected_iou = numpy_reference_miou(pairs, num_classes)
    assert result["miou"] == pytest.approx(expected_miou)
    assert list(result["per_class_iou"]) == ["a", "b", "c", "d", "e"]
    assert [result["per_class_iou"][name] for name in "abcde"] == pytest.approx(list(expected_iou))
    # the whole-set mIoU is not the mean of per-image mIoUs
    per_image_mean = np.mean([per_image_miou(p, t, num_classes) for p, t in pairs])
    assert per_image_mean != pytest.approx(result["miou"])


def test_absent_classes_are_nan_and_left_out_of_the_mean():
    target = torch.tensor([[0, 0, 1, 255]])
    prediction = torch.tensor([[0, 1, 1, 3]])
    iou = iou_from_confusion(confusion_matrix(prediction, target, 4))
    assert iou[0].item() == pytest.approx(0.5) and iou[1].item() == pytest.approx(0.5)
    assert math.isnan(iou[2].item()) and math.isnan(iou[3].item())  # pixel predicted 3 is ignored (gt 255)
    metric = SegmentationMetric(4)
    metric.update(prediction, target)
    result = metric.compute()
    assert result["miou"] == pytest.approx(0.5)
    assert result["per_class_iou"]["2"] is None
    assert result["pixel_accuracy"] == pytest.approx(2 / 3)


def test_perfect_prediction_and_bad_inputs():
    target = torch.tensor([[2, 1], [0, 2]])
    assert per_image_miou(target, target, 3) == 1.0
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(target, target[:1], 3)
    with pytest.raises(ValueError, match="predictions must lie"):
        confusion_matrix(torch.tensor([[3, 1], [0, 2]]), target, 3)
    with pytest.raises(ValueError, match="class names"):
        SegmentationMetric(3, ["only", "two"])


class _SummingAccelerator:
    """Stands in for N processes: reduce() sums the matrices every fake process holds."""

    def __init__(self, metrics):
        self.metrics, self.num_processes, self.device = metrics, len(metrics), torch.device("cpu")

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return sum(metric.hist for metric in self.metrics)


def test_sharded_metrics_sum_to_the_single_process_result():
    generator = torch.Generator().manual_seed(1)
    images = [
        (torch.randint(0, 3, (4, 4), generator=generator), torch.randint(0, 3, (4, 4), generator=generator))
        for _ in range(5)
    ]
    single = SegmentationMetric(3)
    shards = [SegmentationMetric(3), SegmentationMetric(3)]
    for index, (prediction, target) in enumerate(images):
        single.update(prediction, target)
        shards[index % 2].update(prediction, target)
    accelerator = _SummingAccelerator(shards)
    assert shards[0].compute(accelerator) == single.compute()
    assert shards[0].compute()["miou"] != single.compute()["miou"]
