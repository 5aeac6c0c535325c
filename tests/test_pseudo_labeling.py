"""Batched / sharded TTA pseudo-labeling equals the per-image spec procedure (docs/method.md §5)."""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import NUM_CLASSES, FakeShardAccelerator, images_of_mixed_sizes, tiny_model

from stpp_hf.data import PseudoLabelStore
from stpp_hf.training import pseudo_labeling
from stpp_hf.training.pseudo_labeling import label_images, pseudo_label_miou, tta_images_per_pass, tta_pseudo_labels


@torch.no_grad()
def reference_pseudo_label(model, image):
    """Spec section 5, one image at a time, written independently of the package."""
    height, width = image.shape[-2:]
    total = 0
    for scale in (0.5, 0.75, 1.0, 1.5, 2.0):
        scaled = F.interpolate(
            image[None], size=(int(height * scale), int(width * scale)), mode="bilinear", align_corners=True
        )
        for flip in (False, True):
            inputs = scaled.flip(-1) if flip else scaled
            logits = model(pixel_values=inputs).logits
            logits = logits.flip(-1) if flip else logits
            probabilities = F.softmax(logits, dim=1)
            total = total + F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=True)
    return total[0]


@pytest.mark.slow
def test_batched_sharded_labels_equal_the_per_image_reference(tmp_path):
    model = tiny_model()
    dataset = images_of_mixed_sizes()
    ids = [f"img_{index}" for index in range(len(dataset))]
    store = PseudoLabelStore(tmp_path / "store")
    # two "processes" each label their shard into the same store, in batches of 2 same-size images
    written = [
        label_images(model, dataset, ids, store, FakeShardAccelerator(rank, 2), batch_size=2) for rank in (0, 1)
    ]
    assert written == [3, 3]
    store.verify(ids)
    assert store.pending(ids) == []
    for (image, _), image_id in zip(dataset, ids):
        reference = reference_pseudo_label(model, image)
        label = torch.from_numpy(store.get(image_id).astype(np.int64))
        top2 = reference.topk(2, dim=0).values
        decided = (top2[0] - top2[1]) > 1e-4  # pixels where float reordering cannot flip the argmax
        assert decided.float().mean() > 0.95
        assert torch.equal(label[decided], reference.argmax(0)[decided])
    assert len(np.unique(np.concatenate([store.get(i).ravel() for i in ids]))) > 1  # not a constant labeling


@pytest.mark.slow
def test_partial_store_is_completed_and_pseudo_label_miou(tmp_path):
    model = tiny_model(1)
    dataset = images_of_mixed_sizes(1)
    ids = [f"img_{index}" for index in range(len(dataset))]
    store = PseudoLabelStore(tmp_path / "store")
    label_images(model, dataset[:2], ids[:2], store, batch_size=4)
    first = np.asarray(store.get(ids[0])).copy()
    assert sorted(store.pending(ids)) == ids[2:]
    assert label_images(model, dataset, ids, store, batch_size=4) == len(ids) - 2  # only the missing ones
    assert np.array_equal(np.asarray(store.get(ids[0])), first)
    miou = pseudo_label_miou(store, dataset, ids, NUM_CLASSES)
    assert 0.0 <= miou <= 1.0
    # against masks equal to the stored labels the mIoU is exactly 1
    perfect = [(image, torch.from_numpy(store.get(i).astype(np.int64))) for (image, _), i in zip(dataset, ids)]
    assert pseudo_label_miou(store, perfect, ids, NUM_CLASSES) == pytest.approx(1.0)
    unlabeled = [(image, None) for image, _ in dataset]
    assert pseudo_label_miou(store, unlabeled, ids, NUM_CLASSES) is None
    with pytest.raises(ValueError, match="ids"):
        label_images(model, dataset, ids[:3], store)


@pytest.mark.slow
def test_predict_tta_batches_the_flip_and_keeps_the_per_image_result():
    """The flipped copy and same-size images share a batch; the summed softmax maps (float32) still equal
    the image-by-image, flip-by-flip procedure up to float rounding, and so do the labels."""
    model = tiny_model(2)
    images = torch.stack([image for image, _ in images_of_mixed_sizes(2)[:3]])  # three 32x40 images
    with torch.no_grad():
        batched = model.predict_tta(images)
    reference = torch.stack([reference_pseudo_label(model, image) for image in images])
    assert batched.dtype == torch.float32 and batched.shape == reference.shape
    torch.testing.assert_close(batched, reference, rtol=0, atol=1e-5)
    top2 = reference.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert decided.float().mean() > 0.95
    assert torch.equal(batched.argmax(1)[decided], reference.argmax(1)[decided])
    # without the flip it is one pass per scale, also equal to the reference's unflipped half
    with torch.no_grad():
        unflipped = model.predict_tta(images[:1], scales=(1.0,), flip=False)
        expected = model(pixel_values=images[:1]).logits.softmax(1)
    torch.testing.assert_close(unflipped, expected, rtol=0, atol=1e-6)


def smooth_images(count, height=48, width=64, seed=0):
    """Images made of smooth colour regions (coarse noise upsampled), closer to photos than white noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, height // 8, width // 8, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)


@pytest.mark.slow
def test_bf16_labels_match_fp32_labels(tmp_path):
    """Mixed precision (CPU autocast, bf16) pseudo-labeling changes a label only where fp32's summed softmax
    (10 maps, total 10) is within 0.05 of a tie. This untrained model is tie-heavy (a fifth of its pixels are
    within 0.1), so the overall agreement here (98.5% measured) is a floor, not what a trained model gives."""
    model = tiny_model(3)
    dataset = [(image, None) for image in smooth_images(6, seed=3)]
    ids = [f"img_{index}" for index in range(len(dataset))]
    stores = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        stores[name] = PseudoLabelStore(tmp_path / name)
        label_images(model, dataset, ids, stores[name], FakeShardAccelerator(0, 1, dtype), batch_size=4)
    fp32 = np.stack([stores["fp32"].get(i) for i in ids])
    bf16 = np.stack([stores["bf16"].get(i) for i in ids])
    assert len(np.unique(fp32)) > 1
    assert (fp32 == bf16).mean() >= 0.98
    with torch.no_grad():
        top2 = model.predict_tta(torch.stack([image for image, _ in dataset])).topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).numpy()
    assert (margin[fp32 != bf16] < 0.05).all()


def test_tta_passes_keep_the_largest_maps_under_the_kernel_limit():
    """A Cityscapes batch of 8 at scale 2 with flips was 16 x 19 x 2048 x 4096 = 2.55e9 elements in one map, above
    INT_MAX, which CUDA's channels-last bilinear upsample refuses: it is now labeled one image per pass."""
    int_max = 2**31 - 1
    per_pass = tta_images_per_pass(1024, 2048, 19)
    assert per_pass == 1
    assert 2 * per_pass * 19 * 2048 * 4096 < int_max // 4 + 1
    assert tta_images_per_pass(500, 500, 21) >= 8  # a Pascal batch of --inference_batch_size 8 stays one pass
    assert tta_images_per_pass(64, 64, 25) >= 25  # and the synthetic demo's
    assert tta_images_per_pass(4096, 8192, 19) == 1  # never fewer than one image


@pytest.mark.slow
def test_labeling_in_tta_passes_equals_batches_of_that_size(tmp_path, monkeypatch):
    model = tiny_model(3)
    dataset = [(image, None) for image, _ in images_of_mixed_sizes(3)]  # sizes 32x40 x3, 28x44, 32x40, 28x44
    ids = [f"img_{index}" for index in range(len(dataset))]
    by_batches = PseudoLabelStore(tmp_path / "batches")
    label_images(model, dataset, ids, by_batches, batch_size=2)
    passes = []
    original = type(model).predict_tta
    monkeypatch.setattr(
        type(model),
        "predict_tta",
        lambda self, images, **kwargs: passes.append(len(images)) or original(self, images, **kwargs),
    )
    # a budget of two 32x40 images (the largest scale doubles each side, the flip doubles the batch)
    monkeypatch.setattr(pseudo_labeling, "TTA_ELEMENTS_BUDGET", 2 * 2 * NUM_CLASSES * 64 * 80)
    by_passes = PseudoLabelStore(tmp_path / "passes")
    label_images(model, dataset, ids, by_passes, batch_size=8)
    assert passes == [2, 1, 1, 1, 1]  # batches [3 x 32x40], [28x44], [32x40], [28x44]; 28x44 is over 32x40's pixels
    for image_id in ids:
        assert np.array_equal(by_passes.get(image_id), by_batches.get(image_id))


def test_argmax_maps_cross_to_the_host_as_8_bits():
    model = tiny_model(4)
    image, _ = images_of_mixed_sizes(4)[0]
    labels = tta_pseudo_labels(model, image[None])
    assert labels.dtype == torch.uint8 and labels.device.type == "cpu"
    assert torch.equal(labels.long(), model.predict_tta(image[None]).argmax(dim=1))


class FailingStore(PseudoLabelStore):
    """A store whose disk fills up at its third label."""

    def put(self, image_id, label_map):
        assert threading.current_thread() is not threading.main_thread()  # written off the labeling loop
        if len(self.entries(refresh=False)) == 2:
            raise OSError(28, "No space left on device")
        return super().put(image_id, label_map)


@pytest.mark.slow
def test_labels_are_written_off_the_loop_and_a_write_error_surfaces(tmp_path):
    model = tiny_model(5)
    dataset = [(image, None) for image, _ in images_of_mixed_sizes(5)]
    ids = [f"img_{index}" for index in range(len(dataset))]
    store = FailingStore(tmp_path / "store")
    with pytest.raises(OSError, match="No space left on device"):
        label_images(model, dataset, ids, store, batch_size=2)
    # what was written is intact and journaled; the rest is pending, so a relaunch completes the store
    reopened = PseudoLabelStore(tmp_path / "store")
    assert reopened.pending(ids) == ids[2:]
    assert label_images(model, dataset, ids, reopened, batch_size=2) == len(ids) - 2
    reopened.verify(ids)
