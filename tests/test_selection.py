"""Reliable-image selection (docs/method.md §1, ST++ step 2) against a per-image reference loop."""

import numpy as np
import pytest
import torch
from helpers import NUM_CLASSES, FakeShardAccelerator, images_of_mixed_sizes, tiny_model

from stpp_hf.training.selection import compute_reliability, reliability_of_predictions, split_by_reliability


def reference_image_miou(prediction, target, num_classes):
    hist = np.bincount(num_classes * target.ravel() + prediction.ravel(), minlength=num_classes**2).reshape(
        num_classes, -1
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean(np.diag(hist) / (hist.sum(0) + hist.sum(1) - np.diag(hist)))


@torch.no_grad()
def reference_reliability(snapshots, dataset):
    """Each image alone, each snapshot alone: mean mIoU of earlier predictions vs the last one."""
    scores = []
    for image, _ in dataset:
        predictions = [m(pixel_values=image[None]).logits.argmax(1)[0].numpy() for m in snapshots]
        scores.append(np.mean([reference_image_miou(p, predictions[-1], NUM_CLASSES) for p in predictions[:-1]]))
    return scores


@pytest.mark.slow
def test_sharded_batched_reliability_equals_reference():
    snapshots = [tiny_model(3, perturbation_seed=seed) for seed in (4, 5, 6)]
    dataset = images_of_mixed_sizes(2)
    ids = [f"u{index}" for index in range(len(dataset))]
    expected = reference_reliability(snapshots, dataset)
    shards = [
        compute_reliability(snapshots, dataset, ids, NUM_CLASSES, FakeShardAccelerator(r, 2), batch_size=3)
        for r in (0, 1)
    ]
    merged = {**shards[0], **shards[1]}
    assert sorted(shards[0]) == ["u0", "u2", "u4"]
    assert [merged[i] for i in ids] == pytest.approx(expected, abs=0.02)
    assert len(set(np.round(expected, 6))) > 1  # the check is not vacuous: scores differ between images


def test_reliability_formula_and_split():
    last = torch.tensor([[[0, 0], [1, 1]]])
    same = last.clone()
    half = torch.tensor([[[0, 0], [0, 0]]])  # class 0 IoU 2/4, class 1 IoU 0 -> 0.25
    assert reliability_of_predictions([same, half, last], 2) == pytest.approx([(1.0 + 0.25) / 2])
    with pytest.raises(ValueError):
        reliability_of_predictions([last], 2)
    scores = {"a": 0.2, "b": 0.9, "c": 0.5, "d": 0.5, "e": 0.1}
    reliable, unreliable = split_by_reliability(scores, ["a", "b", "c", "d", "e"])
    assert reliable == ["b", "c"] and unreliable == ["d", "a", "e"]  # ties keep list order; N//2 reliable
    with pytest.raises(ValueError, match="no reliability score"):
        split_by_reliability(scores, ["a", "z"])


def test_selection_figure_shows_the_histogram_cut_and_the_extremes(tmp_path):
    from PIL import Image

    from stpp_hf.models.deeplab.label_presets import PASCAL_VOC_PALETTE, colorize, flat_palette
    from stpp_hf.training.visualization import _denormalize, save_selection_figure

    model = tiny_model(3).eval()
    dataset = images_of_mixed_sizes(1)
    ids = [f"u{index}" for index in range(len(dataset))]
    scores = dict(zip(ids, [0.2, 0.95, 0.5, 0.7, 0.1, 0.9]))
    reliable, _ = split_by_reliability(scores, ids)
    palette = flat_palette(PASCAL_VOC_PALETTE)
    save_selection_figure(
        model, dataset, ids, scores, reliable, tmp_path / "selection.png", palette, num_images=2, tile=48
    )
    figure = Image.open(tmp_path / "selection.png").convert("RGB")
    assert figure.size == (360, 150 + 2 * (48 + 14))
    # the histogram: 3 reliable scores right of the cut (green bars), 3 left of it (red bars)
    pixels = np.asarray(figure)[:150]
    green_columns = np.flatnonzero((pixels == (60, 160, 60)).all(-1).any(0))
    red_columns = np.flatnonzero((pixels == (200, 70, 60)).all(-1).any(0))
    assert len(green_columns) and len(red_columns) and red_columns.max() < green_columns.min()
    # rows: most reliable u1 then u5, least reliable u4 then u0, each image next to the teacher's prediction
    for row, expected_ids in enumerate((["u1", "u5"], ["u4", "u0"])):
        for column, image_id in enumerate(expected_ids):
            image, _ = dataset[ids.index(image_id)]
            x, y = column * 96, 150 + row * 62 + 14
            expected_image = _denormalize(image).resize((48, 48), Image.BILINEAR)
            with torch.no_grad():
                prediction = model(pixel_values=image[None]).logits.argmax(1)[0]
            expected_label = colorize(prediction, palette).convert("RGB").resize((48, 48), Image.NEAREST)
            assert np.array_equal(np.asarray(figure.crop((x, y, x + 48, y + 48))), np.asarray(expected_image))
            assert np.array_equal(np.asarray(figure.crop((x + 48, y, x + 96, y + 48))), np.asarray(expected_label))


@pytest.mark.slow
def test_bf16_selection_keeps_the_fp32_split():
    """Selection under bf16 autocast: the reliability scores stay close to fp32's and the reliable / unreliable
    split is the same up to images whose fp32 scores are near-tied at the split."""
    snapshots = [tiny_model(3, perturbation_seed=seed) for seed in (4, 5, 6)]
    dataset = images_of_mixed_sizes(2) + images_of_mixed_sizes(4)
    ids = [f"u{index}" for index in range(len(dataset))]
    scores = {
        name: compute_reliability(
            snapshots, dataset, ids, NUM_CLASSES, FakeShardAccelerator(0, 1, dtype), batch_size=3
        )
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16))
    }
    assert [scores["bf16"][i] for i in ids] == pytest.approx([scores["fp32"][i] for i in ids], abs=0.02)
    reliable = {name: set(split_by_reliability(values, ids)[0]) for name, values in scores.items()}
    moved = reliable["fp32"] ^ reliable["bf16"]
    ranked = sorted(scores["fp32"].values(), reverse=True)
    threshold = (ranked[len(ids) // 2 - 1] + ranked[len(ids) // 2]) / 2
    assert all(abs(scores["fp32"][i] - threshold) < 0.02 for i in moved)
