"""DeepLabV3+ / DeepLabV2: architecture, save/load, loss, TTA, sliding window, optimizer groups, weight import."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import tiny_deeplab
from huggingface_hub.errors import StrictDataclassFieldValidationError

from stpp_hf import (
    MODEL_REGISTRY,
    DeepLabV2Config,
    DeepLabV2ForSemanticSegmentation,
    DeepLabV3PlusConfig,
    DeepLabV3PlusForSemanticSegmentation,
    build_model,
)


@pytest.fixture(scope="module")
def small_model():
    """ResNet-18 DeepLabV3+ at output stride 16 with random BN statistics, eval mode."""
    torch.manual_seed(0)
    model = tiny_deeplab(num_labels=4)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
@pytest.mark.parametrize("output_stride", [8, 16])
def test_feature_strides_and_logit_shape(name, output_stride):
    model = build_model(name, backbone="resnet18", output_stride=output_stride, num_labels=3).eval()
    with torch.no_grad():
        output = model(torch.randn(1, 3, 64, 96), output_hidden_states=True)
    low_level, high_level = output.hidden_states
    assert low_level.shape == (1, 64, 16, 24)  # c1: stride 4
    assert high_level.shape == (1, 512, 64 // output_stride, 96 // output_stride)
    assert output.logits.shape == (1, 3, 64, 96)


def test_aspp_rates_follow_output_stride():
    assert DeepLabV3PlusConfig(output_stride=8).atrous_rates == (12, 24, 36)
    assert DeepLabV3PlusConfig(output_stride=16).atrous_rates == (6, 12, 18)
    assert DeepLabV3PlusConfig(output_stride=16, aspp_rates=[2, 4, 6]).atrous_rates == (2, 4, 6)
    with torch.device("meta"):
        model = tiny_deeplab()
    assert [branch.conv.dilation[0] for branch in model.aspp.branches] == [1, 6, 12, 18]


@pytest.mark.parametrize(
    "name, backbone, expected",
    [
        ("deeplabv3plus", "resnet50", 40_352_181),
        ("deeplabv3plus", "resnet101", 59_344_309),
        ("deeplabv2", "resnet101", 44_048_532),
    ],
)
def test_parameter_counts_match_reference(name, backbone, expected):
    with torch.device("meta"):  # counting needs no memory or init
        model = build_model(name, backbone=backbone, num_labels=21)
    assert sum(parameter.numel() for parameter in model.parameters()) == expected


@pytest.mark.parametrize(
    "backbone, low_level_channels, high_level_channels",
    [("resnet34", 64, 512), ("resnet50", 256, 2048), ("resnet50d", 256, 2048)],
)
def test_head_channels_come_from_the_backbone(backbone, low_level_channels, high_level_channels):
    with torch.device("meta"):
        model = build_model("deeplabv3plus", backbone=backbone, aspp_channels=128)
        logits = model(torch.empty(2, 3, 65, 81)).logits
    assert model.aspp.branches[0].conv.in_channels == high_level_channels
    assert model.low_level_reduce.conv.in_channels == low_level_channels
    assert model.fuse[0].conv.in_channels == 128 + 48
    assert logits.shape == (2, 21, 65, 81)


def test_deeplabv2_head_is_four_summed_dilated_classifiers():
    torch.manual_seed(0)
    model = DeepLabV2ForSemanticSegmentation(DeepLabV2Config(backbone="resnet18", num_labels=21))
    assert [conv.dilation[0] for conv in model.classifier] == [6, 12, 18, 24]
    weights = torch.cat([conv.weight.flatten() for conv in model.classifier])
    assert abs(weights.std().item() - 0.01) < 0.0005 and abs(weights.mean().item()) < 0.0005
    assert all(conv.bias is not None for conv in model.classifier)
    model.eval()
    pixel_values = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        c4 = model.backbone(pixel_values)[1]
        expected = F.interpolate(
            sum(conv(c4) for conv in model.classifier), size=(40, 40), mode="bilinear", align_corners=True
        )
        torch.testing.assert_close(model(pixel_values).logits, expected)


def test_save_load_round_trip_is_bit_exact(small_model, tmp_path):
    small_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = DeepLabV3PlusForSemanticSegmentation.from_pretrained(tmp_path).eval()
    original_state, loaded_state = small_model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key, value in original_state.items():
        assert torch.equal(value, loaded_state[key]), key
    pixel_values = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        # Weights are bit-exact; the CPU conv kernels may round differently on mmap-loaded storage (~1e-8).
        torch.testing.assert_close(small_model(pixel_values).logits, loaded(pixel_values).logits, atol=1e-6, rtol=0)
    assert loaded.config.to_dict()["output_stride"] == 16 and loaded.config.num_labels == 4


def test_bfloat16_loading(small_model, tmp_path):
    small_model.save_pretrained(tmp_path)
    loaded = DeepLabV3PlusForSemanticSegmentation.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {parameter.dtype for parameter in loaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = loaded(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).logits
    assert logits.dtype == torch.bfloat16 and logits.shape == (1, 4, 32, 32)
    torch.testing.assert_close(
        loaded.classifier.weight.float(), small_model.classifier.weight.bfloat16().float(), atol=0, rtol=0
    )


def test_loss_is_cross_entropy_ignoring_255(small_model):
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 4, (2, 32, 32))
    labels[:, :10] = 255
    output = small_model(pixel_values, labels=labels)
    valid = labels != 255
    log_probabilities = output.logits.log_softmax(dim=1).permute(0, 2, 3, 1)[valid]
    expected = -log_probabilities.gather(1, labels[valid][:, None]).mean()
    torch.testing.assert_close(output.loss, expected)
    # Counting 255 as a class (or as 0) would give another value.
    assert not torch.isclose(output.loss, F.cross_entropy(output.logits, labels.clamp(max=3)))


def test_return_dict_false_gives_tuple(small_model):
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    loss, logits = small_model(torch.randn(1, 3, 32, 32), labels=labels, return_dict=False)
    assert loss.dim() == 0 and logits.shape == (1, 4, 32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("flip", [True, False])
def test_tta_equals_a_plain_loop_over_scales_and_flips(small_model, flip):
    torch.manual_seed(2)
    pixel_values = torch.randn(2, 3, 37, 51)  # odd sizes: int(h * s) truncates
    height, width = 37, 51
    expected = torch.zeros(2, 4, height, width)
    with torch.no_grad():
        for scale in (0.5, 0.75, 1.0, 1.5, 2.0):
            scaled = F.interpolate(
                pixel_values, size=(int(height * scale), int(width * scale)), mode="bilinear", align_corners=True
            )
            views = [small_model(scaled).logits.softmax(1)]
            if flip:
                views.append(small_model(scaled.flip(3)).logits.softmax(1).flip(3))
            for probabilities in views:
                expected += F.interpolate(probabilities, size=(height, width), mode="bilinear", align_corners=True)
    actual = small_model.predict_tta(pixel_values, flip=flip)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual.sum(1), torch.full((2, height, width), 10.0 if flip else 5.0))


def test_sliding_window_matches_manual_tiling(small_model):
    torch.manual_seed(3)
    pixel_values = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        full = small_model(pixel_values).logits.softmax(1)
        torch.testing.assert_close(small_model.predict_sliding_window(pixel_values, (40, 56), 8), full)
        # Window 40, stride 32: columns start at 0 and at 16 (flush right); rows need one window.
        left = small_model(pixel_values[..., :40]).logits.softmax(1)
        right = small_model(pixel_values[..., 16:]).logits.softmax(1)
    expected = torch.zeros_like(full)
    counts = torch.zeros(1, 1, 40, 56)
    expected[..., :40] += left
    expected[..., 16:] += right
    counts[..., :40] += 1
    counts[..., 16:] += 1
    actual = small_model.predict_sliding_window(pixel_values, window=40, stride=32)
    torch.testing.assert_close(actual, expected / counts)


def test_sliding_window_pads_small_images(small_model):
    actual = small_model.predict_sliding_window(torch.randn(1, 3, 20, 30), window=32, stride=16)
    assert actual.shape == (1, 4, 20, 30)
    torch.testing.assert_close(actual.sum(1), torch.ones(1, 20, 30))
    with pytest.raises(ValueError, match="stride"):
        small_model.predict_sliding_window(torch.randn(1, 3, 20, 30), window=16, stride=32)


@pytest.mark.parametrize("name, multiplier", [("deeplabv3plus", 10.0), ("deeplabv2", 1.0)])
def test_optimizer_param_groups(name, multiplier):
    with torch.device("meta"):
        model = build_model(name, backbone="resnet18")
    groups = model.optimizer_param_groups(0.004)
    assert [group["name"] for group in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == 0.004 and groups[1]["lr"] == pytest.approx(0.004 * multiplier)
    backbone_ids = {id(parameter) for parameter in model.backbone.parameters()}
    assert {id(parameter) for parameter in groups[0]["params"]} == backbone_ids
    head_ids = {id(parameter) for parameter in groups[1]["params"]}
    assert not head_ids & backbone_ids
    assert head_ids | backbone_ids == {id(parameter) for parameter in model.parameters()}
    torch.optim.SGD(groups, lr=0.004, momentum=0.9, weight_decay=1e-4)  # accepted as-is


def test_load_torchvision_backbone_weights(tmp_path):
    torch.manual_seed(4)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # with fc.*, as the ImageNet files are
    model = tiny_deeplab(num_labels=3)
    head_before = {key: value.clone() for key, value in model.state_dict().items() if not key.startswith("backbone.")}
    model.load_backbone_weights(path)
    loaded = model.backbone.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    for key, value in head_before.items():
        assert torch.equal(model.state_dict()[key], value), key
    model.eval()
    reference.eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected_c1 = reference.layer1(reference.maxpool(reference.relu(reference.bn1(reference.conv1(pixel_values)))))
        c1 = model(pixel_values, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(c1, expected_c1)


def test_load_backbone_weights_errors(tmp_path):
    with torch.device("meta"):
        model = build_model("deeplabv3plus", backbone="resnet18")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        model.load_backbone_weights(tmp_path / "missing.pth")
    wrong = tmp_path / "resnet34.pth"
    with torch.device("meta"):
        torch.save({k: torch.zeros(v.shape) for k, v in torchvision.models.resnet34().state_dict().items()}, wrong)
    with pytest.raises(ValueError, match=r"unexpected keys: .*layer1\.2\.bn1\.bias"):
        model.load_backbone_weights(wrong)
    not_weights = tmp_path / "notes.pth"
    not_weights.write_text("hello")
    with pytest.raises(ValueError, match="notes.pth"):
        model.load_backbone_weights(not_weights)


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_a_fresh_model_keeps_timms_backbone_init(name):
    import timm

    torch.manual_seed(7)  # the backbone is built first, so it draws the same numbers as a lone one
    model = build_model(name, backbone="resnet18", output_stride=16, num_labels=3)
    torch.manual_seed(7)
    timm_backbone = timm.create_model("resnet18", features_only=True, out_indices=(1, 4), output_stride=16)
    for key, value in timm_backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    # timm zero-initialises the last BatchNorm of each residual block; PyTorch's default init would give ones
    assert not model.backbone.layer1[0].bn2.weight.any()


def test_from_pretrained_does_not_reinitialise_a_loaded_backbone(tmp_path):
    torch.manual_seed(5)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = build_model("deeplabv2", backbone="resnet18", num_labels=3)
    model.load_backbone_weights(tmp_path / "resnet18.pth")
    model.save_pretrained(tmp_path / "saved")
    loaded = DeepLabV2ForSemanticSegmentation.from_pretrained(tmp_path / "saved")
    assert torch.equal(loaded.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(loaded.classifier[2].weight, model.classifier[2].weight)


def test_bad_inputs_raise_clear_errors(small_model):
    with pytest.raises(ValueError, match="4-D"):
        small_model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="3 channels"):
        small_model(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"labels must have shape .*\(1, 32, 32\)"):
        small_model(torch.randn(1, 3, 32, 32), labels=torch.zeros(1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class ids"):
        small_model(torch.randn(1, 3, 32, 32), labels=torch.zeros(1, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        small_model.predict_tta(torch.randn(3, 32, 32))


@pytest.mark.parametrize(
    "config_class, kwargs, field",
    [
        (DeepLabV3PlusConfig, {"output_stride": 32}, "output_stride"),
        (DeepLabV3PlusConfig, {"backbone": "not_a_timm_model"}, "backbone='not_a_timm_model': not a timm"),
        (DeepLabV3PlusConfig, {"backbone": "mixer_s16_224"}, "backbone='mixer_s16_224': a single-stride"),
        (DeepLabV3PlusConfig, {"backbone": "swin_tiny_patch4_window7_224"}, "output_stride=8: timm cannot dilate"),
        (DeepLabV3PlusConfig, {"backbone_kwargs": {"depth": "deep"}}, "backbone_kwargs"),
        (DeepLabV3PlusConfig, {"backbone_out_indices": [1]}, "backbone_out_indices"),
        (DeepLabV2Config, {"backbone": "efficientnet_b0", "backbone_out_indices": [1, 7]}, "backbone_out_indices"),
        (DeepLabV3PlusConfig, {"num_labels": 0}, "num_labels"),
        (DeepLabV3PlusConfig, {"aspp_dropout": 1.5}, "aspp_dropout"),
        (DeepLabV3PlusConfig, {"aspp_rates": [6, 12]}, "aspp_rates"),
        (DeepLabV3PlusConfig, {"aspp_channels": 0}, "aspp_channels"),
        (DeepLabV3PlusConfig, {"head_lr_multiplier": -1}, "head_lr_multiplier"),
        (DeepLabV3PlusConfig, {"id2label": {0: "a", 2: "b"}}, "id2label"),
        (DeepLabV2Config, {"classifier_rates": []}, "classifier_rates"),
        (DeepLabV2Config, {"classifier_init_std": 0}, "classifier_init_std"),
        (DeepLabV2Config, {"output_stride": 4}, "output_stride"),
    ],
)
def test_invalid_config_values_name_the_field(config_class, kwargs, field):
    # a field's own value: the strict dataclass's error; a value that cannot work with the others: a ValueError
    with pytest.raises((StrictDataclassFieldValidationError, ValueError), match=field):
        config_class(**kwargs)


def test_a_field_is_checked_when_set_too():
    config = DeepLabV3PlusConfig()
    with pytest.raises(StrictDataclassFieldValidationError, match="aspp_dropout"):
        config.aspp_dropout = 1.0
    with pytest.raises(StrictDataclassFieldValidationError, match="classifier_init_std"):
        DeepLabV2Config().classifier_init_std = 0
    with pytest.raises(StrictDataclassFieldValidationError, match="head_lr_multiplier"):
        DeepLabV2Config(head_lr_multiplier=0)  # the field DeepLabV2 redefines keeps its check


def test_allowed_values_are_listed():
    with pytest.raises(StrictDataclassFieldValidationError, match=r"expected one of \(8, 16\)"):
        DeepLabV3PlusConfig(output_stride=32)
    with pytest.raises(ValueError, match="resnet50"):
        DeepLabV2Config(backbone="not_a_model")
    with pytest.raises(ValueError, match=r"allowed values: \['deeplabv2', 'deeplabv3plus'\]"):
        build_model("pspnet")


def test_presets_and_config_round_trip(tmp_path):
    config = DeepLabV3PlusConfig.from_preset("cityscapes", backbone="resnet101", output_stride=16)
    assert config.num_labels == 19 and config.id2label[0] == "road" and config.label2id["bicycle"] == 18
    config.save_pretrained(tmp_path)
    loaded = DeepLabV3PlusConfig.from_pretrained(tmp_path)
    assert loaded.num_labels == 19 and loaded.id2label == config.id2label and loaded.backbone == "resnet101"
    assert DeepLabV2Config.from_preset("pascal_voc").id2label[15] == "person"
    assert DeepLabV3PlusConfig().num_labels == 21 and DeepLabV3PlusConfig().semantic_loss_ignore_index == 255
    with pytest.raises(ValueError, match="allowed values"):
        DeepLabV3PlusConfig.from_preset("ade20k")
    with pytest.raises(ValueError, match="num_labels must be 19"):
        DeepLabV3PlusConfig.from_preset("cityscapes", num_labels=21)


def test_fine_tuning_with_another_class_count(tmp_path):
    torch.manual_seed(6)
    model = tiny_deeplab(preset="pascal_voc")
    model.save_pretrained(tmp_path)
    tuned = DeepLabV3PlusForSemanticSegmentation.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert tuned.config.num_labels == 5 and tuned.classifier.weight.shape == (5, 256, 1, 1)
    assert torch.isfinite(tuned.classifier.weight).all() and tuned.classifier.weight.std() > 0  # freshly initialised
    assert torch.equal(tuned.backbone.conv1.weight, model.backbone.conv1.weight)
    assert torch.equal(tuned.fuse[0].conv.weight, model.fuse[0].conv.weight)
