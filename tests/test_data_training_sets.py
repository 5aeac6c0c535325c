import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stpp_hf.data import (
    EvalDataset,
    PseudoLabelStore,
    RetrainDataset,
    SupOnlyDataset,
    TrainTransform,
    load_source,
    make_synthetic_dataset,
)


class _Tagging:
    """A transform that reports which transform handled the sample and the label it got."""

    def __init__(self, tag):
        self.tag = tag

    def __call__(self, image, mask):
        return self.tag, torch.as_tensor(np.array(mask)).long()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic = make_synthetic_dataset(
        root / "synthetic", seed=2, num_labeled=3, num_unlabeled=8, num_val=2, image_size=32
    )
    return synthetic, {
        part: load_source("pascal", synthetic.root, path, cache_dir=root / "cache")
        for part, path in synthetic.split_files.items()
    }


def _stores(tmp_path, unlabeled_ids, split):
    first, second = PseudoLabelStore(tmp_path / "stage3"), PseudoLabelStore(tmp_path / "stage5")
    for image_id in unlabeled_ids[:split]:
        first.put(image_id, np.full((32, 32), 1, np.uint8))
    for image_id in unlabeled_ids[split:]:
        second.put(image_id, np.full((32, 32), 2, np.uint8))
    return first, second


def test_suponly_lists_few_labeled_images_twice(sources):
    _, data = sources
    dataset = SupOnlyDataset(data["labeled"], _Tagging("weak"))
    assert len(dataset) == 6 and dataset.ids == list(data["labeled"]["id"]) * 2
    for index in range(6):
        tag, label = dataset[index]
        expected = np.asarray(data["labeled"][index % 3]["label"])
        assert tag == "weak" and np.array_equal(label.numpy(), expected)


def test_retrain_order_balance_and_strong_only_on_pseudo(sources, tmp_path):
    _, data = sources
    unlabeled_ids = list(data["unlabeled"]["id"])
    reliable, unreliable = unlabeled_ids[::2], unlabeled_ids[1::2]
    stage3, stage5 = _stores(tmp_path, reliable + unreliable, len(reliable))
    dataset = RetrainDataset(
        data["labeled"],
        data["unlabeled"],
        [(reliable, stage3), (unreliable, stage5)],
        _Tagging("weak"),
        _Tagging("strong"),
    )
    repeats = math.ceil(8 / 3)
    assert len(dataset) == 3 * repeats + 8
    assert dataset.ids == list(data["labeled"]["id"]) * repeats + reliable + unreliable
    tags = [dataset[index][0] for index in range(len(dataset))]
    assert tags == ["weak"] * 9 + ["strong"] * 8
    # reliable ids read stage 3's store, unreliable ones stage 5's; never the true masks
    for position, image_id in enumerate(reliable + unreliable):
        _, label = dataset[9 + position]
        assert (label == (1 if image_id in reliable else 2)).all()
    _, label = dataset[0]
    assert np.array_equal(label.numpy(), np.asarray(data["labeled"][0]["label"]))


def test_retrain_rejects_inconsistent_pseudo_sets(sources, tmp_path):
    _, data = sources
    unlabeled_ids = list(data["unlabeled"]["id"])
    stage3, stage5 = _stores(tmp_path, unlabeled_ids, 4)
    weak = strong = _Tagging("x")
    with pytest.raises(ValueError, match=f"id '{unlabeled_ids[3]}' is in two pseudo-label sets"):
        RetrainDataset(
            data["labeled"],
            data["unlabeled"],
            [(unlabeled_ids[:4], stage3), (unlabeled_ids[3:], stage5)],
            weak,
            strong,
        )
    with pytest.raises(ValueError, match="'val_00000' .* is not in the unlabeled set"):
        RetrainDataset(data["labeled"], data["unlabeled"], [(["val_00000"], stage3)], weak, strong)
    empty = PseudoLabelStore(tmp_path / "empty")
    dataset = RetrainDataset(data["labeled"], data["unlabeled"], [(unlabeled_ids[:1], empty)], weak, strong)
    with pytest.raises(KeyError, match=f"no label for id '{unlabeled_ids[0]}'"):
        dataset[len(dataset) - 1]
    wrong_size = PseudoLabelStore(tmp_path / "wrong")
    wrong_size.put(unlabeled_ids[0], np.zeros((5, 5), np.uint8))
    dataset = RetrainDataset(data["labeled"], data["unlabeled"], [(unlabeled_ids[:1], wrong_size)], weak, strong)
    with pytest.raises(ValueError, match=f"pseudo label of '{unlabeled_ids[0]}' .* is 5x5 but the image is 32x32"):
        dataset[len(dataset) - 1]


def test_eval_items_are_full_images_with_optional_masks(sources, tmp_path):
    synthetic, data = sources
    dataset = EvalDataset(data["val"])
    pixel_values, labels = dataset[1]
    assert dataset.ids == ["val_00000", "val_00001"]
    assert pixel_values.shape == (3, 32, 32) and labels.shape == (32, 32) and labels.dtype == torch.int64
    image_only = tmp_path / "unlabeled.txt"
    image_only.write_text(
        "".join(line.split()[0] + "\n" for line in synthetic.split_files["unlabeled"].read_text().splitlines())
    )
    pixel_values, labels = EvalDataset(load_source("pascal", synthetic.root, image_only, cache_dir=tmp_path))[0]
    assert pixel_values.shape == (3, 32, 32) and labels is None


def test_training_sets_batch_in_dataloader_workers(sources, tmp_path):
    _, data = sources
    unlabeled_ids = list(data["unlabeled"]["id"])
    stage3, stage5 = _stores(tmp_path, unlabeled_ids, 4)
    dataset = RetrainDataset(
        data["labeled"],
        data["unlabeled"],
        [(unlabeled_ids[:4], stage3), (unlabeled_ids[4:], stage5)],
        TrainTransform(32, 24),
        TrainTransform(32, 24, strong=True),
    )
    batches = list(DataLoader(dataset, batch_size=5, num_workers=2, shuffle=True))
    images = torch.cat([images for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    assert images.shape == (len(dataset), 3, 24, 24) and labels.shape == (len(dataset), 24, 24)
    # training items stay uint8 through the workers; the trainer normalises on its device
    assert images.dtype == torch.uint8 and labels.dtype == torch.uint8
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3, 4, 5, 255}
    pixels, label = SupOnlyDataset(data["labeled"], TrainTransform(32, 24))[0]
    assert pixels.dtype == label.dtype == torch.uint8 and pixels.shape == (3, 24, 24) and label.shape == (24, 24)
