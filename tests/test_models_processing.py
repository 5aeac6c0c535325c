"""Image processor, label presets and colorize."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.modeling_outputs import SemanticSegmenterOutput

from stpp_hf.models import (
    CITYSCAPES_PALETTE,
    DeepLabImageProcessor,
    DeepLabV3PlusConfig,
    colorize,
    get_label_preset,
)


def test_processor_normalises_with_imagenet_statistics_and_keeps_size():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    mask = Image.fromarray(rng.integers(0, 21, (37, 53), dtype=np.uint8))
    inputs = DeepLabImageProcessor()(image, segmentation_maps=mask, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 37, 53)
    expected = (np.asarray(image) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(inputs["pixel_values"][0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert inputs["labels"].dtype == torch.int64
    assert torch.equal(inputs["labels"][0], torch.from_numpy(np.asarray(mask).astype(np.int64)))


def test_processor_save_load_through_auto_class(tmp_path):
    DeepLabV3PlusConfig(backbone="resnet18").save_pretrained(tmp_path)
    DeepLabImageProcessor().save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, DeepLabImageProcessor)
    assert loaded.do_resize is False and list(loaded.image_mean) == pytest.approx([0.485, 0.456, 0.406])


def test_post_process_semantic_segmentation():
    logits = torch.randn(2, 5, 8, 12)
    maps = DeepLabImageProcessor().post_process_semantic_segmentation(SemanticSegmenterOutput(logits=logits))
    assert len(maps) == 2 and torch.equal(maps[1], logits[1].argmax(0))
    resized = DeepLabImageProcessor().post_process_semantic_segmentation(
        SemanticSegmenterOutput(logits=logits), target_sizes=[(16, 24), (4, 6)]
    )
    expected = torch.nn.functional.interpolate(logits[:1], size=(16, 24), mode="bilinear", align_corners=True)
    assert resized[0].shape == (16, 24) and resized[1].shape == (4, 6)
    assert torch.equal(resized[0], expected[0].argmax(0))
    with pytest.raises(ValueError, match="target_sizes"):
        DeepLabImageProcessor().post_process_semantic_segmentation(logits, target_sizes=[(4, 4)])


def test_post_process_semantic_segmentation_returns_scores_like_its_parent():
    logits = torch.randn(2, 5, 8, 12)
    target_sizes = torch.tensor([[16, 24], [4, 6]])
    outputs = DeepLabImageProcessor().post_process_semantic_segmentation(
        SemanticSegmenterOutput(logits=logits), target_sizes, return_segmentation_scores=True
    )
    expected = torch.nn.functional.interpolate(logits[1:], size=(4, 6), mode="bilinear", align_corners=True)[0]
    assert torch.equal(outputs[1].segmentation_scores, expected)
    assert torch.equal(outputs[1].segmentation, expected.argmax(0)) and outputs[0].segmentation.shape == (16, 24)
    unresized = DeepLabImageProcessor().post_process_semantic_segmentation(logits, return_segmentation_scores=True)
    assert torch.equal(unresized[0].segmentation_scores, logits[0])


def test_presets_hold_the_dataset_classes():
    pascal, cityscapes = get_label_preset("pascal_voc"), get_label_preset("cityscapes")
    assert pascal.num_labels == 21 and pascal.id2label[15] == "person"
    assert cityscapes.num_labels == 19 and cityscapes.id2label[13] == "car" and cityscapes.id2label[0] == "road"
    assert len(cityscapes.palette) == cityscapes.num_labels  # one colour per class
    # Known entries of the VOC colour map (computed by its bit rule; 255 is the ignore index) and of the
    # Cityscapes train-id colours, as colorize paints them.
    voc = np.asarray(colorize(np.array([[0, 1, 15, 255]]), "pascal_voc").convert("RGB"))[0]
    assert [tuple(colour) for colour in voc] == [(0, 0, 0), (128, 0, 0), (192, 128, 128), (224, 224, 192)]
    assert tuple(np.asarray(colorize(np.array([[0]]), "cityscapes").convert("RGB"))[0, 0]) == (128, 64, 128)


def test_colorize_gives_a_palette_image_keeping_class_ids(tmp_path):
    label_map = np.array([[0, 1, 255], [15, 20, 0]], dtype=np.int64)
    image = colorize(label_map, "pascal_voc")
    assert image.mode == "P" and image.size == (3, 2)
    rgb = np.asarray(image.convert("RGB"))
    assert (
        tuple(rgb[0, 1]) == (128, 0, 0) and tuple(rgb[1, 0]) == (192, 128, 128) and tuple(rgb[0, 2]) == (224, 224, 192)
    )
    image.save(tmp_path / "mask.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "mask.png")), label_map)
    city = colorize(torch.tensor([[13, 0]]), CITYSCAPES_PALETTE)
    assert tuple(np.asarray(city.convert("RGB"))[0, 0]) == (0, 0, 142)


def test_colorize_rejects_bad_label_maps():
    with pytest.raises(ValueError, match=r"values \[19\]"):
        colorize(np.array([[0, 19]]), CITYSCAPES_PALETTE)
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros((2, 2, 3), dtype=np.uint8), "pascal_voc")
    with pytest.raises(ValueError, match="integer"):
        colorize(np.zeros((2, 2)), "pascal_voc")
    with pytest.raises(ValueError, match="allowed values"):
        colorize(np.zeros((2, 2), dtype=np.uint8), "ade20k")
