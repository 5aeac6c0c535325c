"""DeepLab heads on timm backbones other than ResNet: ConvNeXt, EfficientNet, DINOv2 ViTs (random init, small)."""

import json
import math

import numpy as np
import pytest
import timm
import torch
from fake_hub import FakeHub
from helpers import assert_ok, run_script
from PIL import Image
from safetensors.torch import load_file, save_file
from test_backbone_weights import timm_repo_files, use_hub
from test_remote_code import load_in_fresh_process
from timm.layers import convert_sync_batchnorm
from transformers import AutoConfig, AutoModelForSemanticSegmentation, pipeline

from stpp_hf import DeepLabImageProcessor, DeepLabV3PlusConfig, DeepLabV3PlusForSemanticSegmentation, build_model
from stpp_hf.models.backbone_weights import load_backbone_weights
from stpp_hf.training.inference import inference_model

# a 4-block DINOv2-S at a 56-px native size: the real model's design at a fraction of its cost
SMALL_VIT = {"backbone": "vit_small_patch14_dinov2", "backbone_kwargs": {"img_size": 56, "depth": 4}}
BACKBONES = {
    "convnext": {"backbone": "convnext_atto"},
    "efficientnet": {"backbone": "efficientnet_b0"},
    "vit": SMALL_VIT,
}


def small_model(name="deeplabv3plus", family="convnext", seed=0, **kwargs):
    torch.manual_seed(seed)
    labels = {} if "preset" in kwargs else {"num_labels": 3}
    return build_model(name, **{"output_stride": 16, **labels, **BACKBONES[family], **kwargs})


@torch.no_grad()
def assert_same_logits(loaded, model, pixel_values):
    """`loaded` computes what `model` does: to float rounding as loaded, exactly once its tensors are copied (loaded
    ones are views of the file, at addresses for which oneDNN may pick other kernels, so other last bits)."""
    torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=1e-6)
    for parameter in loaded.parameters():
        parameter.data = parameter.data.clone()
    assert torch.equal(loaded(pixel_values).logits, model(pixel_values).logits)


@pytest.mark.parametrize(
    "backbone, output_stride, out_indices, channels",
    [
        ("resnet50", 8, (1, 4), (256, 2048)),  # the method's: layer1, layer4
        ("convnext_base", 8, (0, 3), (128, 1024)),  # no stride-2 level: stride 4 is the first
        ("efficientnet_b0", 16, (1, 4), (24, 320)),
        ("vit_small_patch14_dinov2", 8, (2, 11), (384, 384)),  # block 3 of 12 and the last
        ("vit_base_patch16_dinov3", 16, (2, 11), (768, 768)),
    ],
)
def test_the_levels_are_stride_4_and_the_deepest_with_timms_channels(backbone, output_stride, out_indices, channels):
    layout = DeepLabV3PlusConfig(backbone=backbone, output_stride=output_stride).backbone_layout()
    assert (layout.out_indices, layout.channels) == (out_indices, channels)
    with torch.device("meta"):
        model = build_model("deeplabv2", backbone=backbone, output_stride=output_stride)
    assert model.classifier[0].in_channels == channels[1]


@pytest.mark.parametrize(
    "family, size, output_stride",
    [("convnext", (321, 321), 8), ("efficientnet", (513, 377), 16), ("vit", (75, 61), 8), ("vit", (513, 377), 16)],
)
@pytest.mark.parametrize("name", ["deeplabv3plus", "deeplabv2"])
def test_shapes_at_odd_input_sizes(name, family, size, output_stride):
    model = small_model(name, family, output_stride=output_stride).eval()
    with torch.no_grad():
        output = model(torch.randn(1, 3, *size), output_hidden_states=True)
    assert output.logits.shape == (1, 3, *size)
    low_level, high_level = output.hidden_states
    for features, stride in (
        (low_level, 4),
        (high_level, output_stride),
    ):  # floor (CNN) or ceil (ViT) of size / stride
        assert all(abs(extent - side / stride) < 1 for extent, side in zip(features.shape[-2:], size))
    assert model.config.backbone_layout().channels == (low_level.shape[1], high_level.shape[1])


def test_a_vit_gives_its_block_tokens_resampled_to_the_strides():
    model = small_model("deeplabv3plus", "vit", output_stride=8).eval()
    pixel_values = torch.randn(1, 3, 45, 59)
    with torch.no_grad():
        low_level, high_level = model(pixel_values, output_hidden_states=True).hidden_states
        vit = model.backbone.model
        tokens = vit.forward_intermediates(pixel_values, indices=[0, 3], norm=True, intermediates_only=True)
    assert [t.shape[-2:] for t in tokens] == [(4, 5)] * 2  # patches of 14, the input padded to whole patches
    assert low_level.shape[-2:] == (math.ceil(45 / 4), math.ceil(59 / 4))
    assert high_level.shape[-2:] == (math.ceil(45 / 8), math.ceil(59 / 8))
    expected = torch.nn.functional.interpolate(tokens[1], size=(6, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(high_level, expected)


@pytest.mark.parametrize("family", ["convnext", "vit"])
def test_tta_and_sliding_window(family):
    model = small_model("deeplabv3plus", family).eval()
    pixel_values = torch.randn(1, 3, 37, 50)
    summed = model.predict_tta(pixel_values, scales=(0.75, 1.0, 1.5))
    assert summed.shape == (1, 3, 37, 50)
    torch.testing.assert_close(summed.sum(1), torch.full((1, 37, 50), 6.0))  # 3 scales x 2 flips of softmax maps
    averaged = model.predict_sliding_window(pixel_values, window=32, stride=21)
    assert averaged.shape == (1, 3, 37, 50)
    torch.testing.assert_close(averaged.sum(1), torch.ones(1, 37, 50))


@pytest.mark.parametrize("family", ["convnext", "vit"])
def test_selection_scores_batchnorm_free_backbones_as_image_by_image(family):
    from test_selection import reference_reliability

    from stpp_hf.training.selection import compute_reliability

    snapshots = [small_model("deeplabv3plus", family, seed=seed).eval() for seed in (4, 5, 6)]
    generator = torch.Generator().manual_seed(0)
    dataset = [(torch.randn(3, 33, 45, generator=generator), None) for _ in range(3)]
    ids = [f"u{index}" for index in range(len(dataset))]
    scores = compute_reliability(snapshots, dataset, ids, 3, batch_size=2)  # BN folded (the head's), batched
    assert [scores[i] for i in ids] == pytest.approx(reference_reliability(snapshots, dataset), abs=0.02)


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_gradients_reach_every_backbone_parameter_and_the_lr_split_holds(family):
    model = small_model("deeplabv3plus", family).train()
    labels = torch.randint(0, 3, (2, 48, 40))
    model(torch.randn(2, 3, 48, 40), labels=labels).loss.backward()
    without = [name for name, p in model.backbone.named_parameters() if p.grad is None or not p.grad.any()]
    assert without == []
    backbone, head = model.optimizer_param_groups(0.01)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    assert (backbone["lr"], head["lr"]) == (0.01, pytest.approx(0.1))


@pytest.mark.parametrize("family", sorted(BACKBONES))
def test_save_load_round_trip_and_auto_classes_give_equal_logits(family, tmp_path):
    model = small_model("deeplabv3plus", family).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["backbone"], saved["backbone_kwargs"]) == (model.config.backbone, model.config.backbone_kwargs)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(loaded) is DeepLabV3PlusForSemanticSegmentation
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert_same_logits(loaded, model, torch.randn(1, 3, 41, 33))


def test_a_config_saved_by_the_previous_version_still_loads(tmp_path):
    # config.json as the previous version wrote it: the backbone was a timm ResNet name and an output stride only
    previous = {
        "architectures": ["DeepLabV3PlusForSemanticSegmentation"],
        "aspp_channels": 256, "aspp_dropout": 0.5, "aspp_rates": None, "backbone": "resnet18",
        "decoder_channels": 256, "decoder_dropout": 0.1, "dtype": "float32", "head_lr_multiplier": 10.0,
        "id2label": {"0": "a", "1": "b"}, "label2id": {"a": 0, "b": 1}, "low_level_channels": 48,
        "model_type": "stpp_deeplabv3plus", "output_stride": 16, "semantic_loss_ignore_index": 255,
        "transformers_version": "5.24.0",
    }  # fmt: skip
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", backbone="resnet18", output_stride=16, num_labels=2).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(previous))
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.backbone, config.output_stride, config.backbone_layout().out_indices) == ("resnet18", 16, (1, 4))
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert_same_logits(loaded, model, torch.randn(1, 3, 33, 35))


@pytest.mark.slow
def test_trust_remote_code_rebuilds_other_backbones_in_a_process_without_the_package(tmp_path):
    pixel_values = torch.randn(1, 3, 32, 40)
    directories, expected = {}, {}
    for family in ("convnext", "vit"):
        model = small_model("deeplabv3plus", family, preset="pascal_voc").eval()
        model.save_pretrained(tmp_path / family)
        DeepLabImageProcessor().save_pretrained(tmp_path / family)
        save_file({"pixel_values": pixel_values}, tmp_path / family / "input.safetensors")
        with torch.no_grad():
            expected[family] = model(pixel_values).logits
        directories[family] = str(tmp_path / family)
    report, logits = load_in_fresh_process(directories, tmp_path)
    for family, info in report.items():
        assert info["model_class"].startswith("transformers_modules.")
        assert info["tta_shape"] == [1, 21, 32, 40]
        torch.testing.assert_close(logits[family], expected[family], atol=1e-6, rtol=0)


def test_the_pipeline_runs_a_vit_model(tmp_path):
    model = small_model("deeplabv3plus", "vit", preset="pascal_voc")
    model.save_pretrained(tmp_path)
    DeepLabImageProcessor().save_pretrained(tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8))
    segments = segmenter(image)
    with torch.no_grad():
        pixel_values = segmenter.image_processor(image, return_tensors="pt")["pixel_values"]
        prediction = segmenter.model(pixel_values).logits[0].argmax(0).numpy()
    assert [segment["label"] for segment in segments] == [
        model.config.id2label[index] for index in sorted(np.unique(prediction).tolist())
    ]
    assert all(segment["mask"].size == (61, 45) for segment in segments)


@pytest.mark.slow
def test_weights_by_timm_tag_from_the_hub_load_into_convnext_and_vit(tmp_path, monkeypatch):
    convnext = timm_repo_files(tmp_path / "convnext", "convnext_atto", seed=1)
    torch.manual_seed(2)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **SMALL_VIT["backbone_kwargs"])
    timm.models.save_for_hf(vit, tmp_path / "vit", safe_serialization=True)
    with FakeHub() as hub:
        hub.add_repo("timm/convnext_atto.d2_in1k", convnext)
        hub.add_repo("someone/small-dinov2", {p.name: p.read_bytes() for p in (tmp_path / "vit").iterdir()})
        use_hub(monkeypatch, hub.url, tmp_path / "cache")
        model = small_model("deeplabv3plus", "convnext")
        assert load_backbone_weights(model, "convnext_atto.d2_in1k")["hub_id"] == "timm/convnext_atto.d2_in1k"
        reference = load_file(tmp_path / "convnext" / "model.safetensors")
        assert torch.equal(
            model.backbone.stages_3.blocks[1].mlp.fc2.weight, reference["stages.3.blocks.1.mlp.fc2.weight"]
        )
        assert torch.equal(model.backbone.stem_0.weight, reference["stem.0.weight"])
        model = small_model("deeplabv2", "vit")
        load_backbone_weights(model, "someone/small-dinov2")
        for key, value in vit.state_dict().items():
            if not key.startswith("head"):
                assert torch.equal(model.backbone.model.state_dict()[key], value), key
        with pytest.raises(ValueError, match="holds resnet18 weights, but the model's backbone is convnext_atto"):
            load_backbone_weights(small_model("deeplabv3plus", "convnext"), "resnet18.tv_in1k")


def test_a_weights_file_of_another_architecture_names_the_keys(tmp_path):
    torch.manual_seed(0)
    save_file(timm.create_model("convnext_atto").state_dict(), tmp_path / "convnext_atto.safetensors")
    model = small_model("deeplabv3plus", "efficientnet")
    with pytest.raises(ValueError, match="loaded into a efficientnet_b0 backbone, does not match the model"):
        model.load_backbone_weights(tmp_path / "convnext_atto.safetensors")


@pytest.mark.parametrize("family", ["convnext", "efficientnet", "vit"])
def test_syncbatchnorm_conversion_and_batchnorm_folding_keep_the_outputs(family):
    model = small_model("deeplabv3plus", family).eval()
    pixel_values = torch.randn(2, 3, 40, 36)
    with torch.no_grad():
        reference = model(pixel_values).logits
        converted = convert_sync_batchnorm(model).eval()
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
        torch.testing.assert_close(converted(pixel_values).logits, reference, rtol=0, atol=1e-6)
        folded = inference_model(small_model("deeplabv3plus", family).eval(), torch.device("cpu"), pixel_values)
        head_norms = [
            m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d) and m not in folded.backbone.modules()
        ]
        assert head_norms == []  # the head's BatchNorms are folded into its convs
        torch.testing.assert_close(folded(pixel_values).logits, reference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            folded.predict_tta(pixel_values, scales=(1.0,)),
            model.predict_tta(pixel_values, scales=(1.0,)),
            rtol=1e-4,
            atol=1e-4,
        )


def test_a_non_resnet_run_needs_its_backbone_weights_named(tmp_path):
    from stpp_hf.training.config import resolve_run_config
    from stpp_hf.training.errors import ConfigError
    from stpp_hf.training.options import DataArguments, ModelArguments, RunArguments

    data = DataArguments(dataset="pascal", data_root=str(tmp_path), split="1_16/split_0")
    with pytest.raises(
        ConfigError, match="--backbone convnext_atto has no default initialisation.*convnext_atto.d2_in1k"
    ):
        resolve_run_config(data, ModelArguments(backbone="convnext_atto"), RunArguments(output_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="--backbone swin_tiny_patch4_window7_224 with --output_stride 8"):
        resolve_run_config(data, ModelArguments(backbone="swin_tiny_patch4_window7_224"), RunArguments())


@pytest.mark.slow
def test_the_demo_runs_end_to_end_on_convnext(tmp_path):
    completed = run_script(tmp_path / "run", "--backbone", "convnext_atto", "--framework", "st", "--teacher", "last")
    assert_ok(completed)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["backbone"] == "convnext_atto"
    final = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "run" / "final")
    assert final.config.backbone == "convnext_atto"
    assert 0.0 <= results["final"]["val_miou"] <= 100.0
