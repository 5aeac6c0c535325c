"""pipeline("image-segmentation") on a saved DeepLab model: one named mask per predicted class."""

import numpy as np
import torch
from helpers import tiny_deeplab
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

from stpp_hf import DeepLabImageProcessor


def test_image_segmentation_pipeline_returns_one_named_mask_per_present_class(tmp_path):
    torch.manual_seed(0)
    model = tiny_deeplab(preset="pascal_voc")
    # Larger classifier weights make the argmax vary more across the image, so several classes show up.
    with torch.no_grad():
        model.classifier.weight.mul_(50)
    model.save_pretrained(tmp_path)
    DeepLabImageProcessor().save_pretrained(tmp_path)

    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    segmenter = pipeline("image-segmentation", model=loaded, image_processor=processor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    segments = segmenter(image)

    with torch.no_grad():
        pixel_values = processor(image, return_tensors="pt")["pixel_values"]
        prediction = loaded(pixel_values).logits[0].argmax(0).numpy()
    present = sorted(np.unique(prediction).tolist())
    assert len(present) >= 2
    assert [segment["label"] for segment in segments] == [model.config.id2label[index] for index in present]
    for segment, class_id in zip(segments, present):
        mask = np.asarray(segment["mask"])
        assert segment["mask"].size == (61, 45)
        assert np.array_equal(mask > 0, prediction == class_id)
