"""Converter and DeepLabV2 COCO init: a network in the official ST++ layout, converted, gives the same logits."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from stpp_hf import DeepLabV2ForSemanticSegmentation, DeepLabV3PlusForSemanticSegmentation
from stpp_hf.convert_original import load_coco_init
from stpp_hf.convert_original import main as convert_main
from stpp_hf.models import DeepLabV2Config


def conv_bn_relu(in_channels, out_channels, kernel_size=1, dilation=1):
    padding = dilation if kernel_size == 3 else 0
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(True),
    )


class OfficialLayoutBackbone(nn.Module):
    """torchvision's dilated ResNet-50 (the official backbone has the same keys and no fc); returns c1, c4."""

    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        return c1, self.layer4(self.layer3(self.layer2(c1)))


class OfficialLayoutASPPPooling(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_channels, out_channels))

    def forward(self, x):
        return F.interpolate(self.gap(x), x.shape[-2:], mode="bilinear", align_corners=True)


class OfficialLayoutASPP(nn.Module):
    def __init__(self, in_channels, rates=(12, 24, 36)):
        super().__init__()
        out_channels = in_channels // 8
        self.b0 = conv_bn_relu(in_channels, out_channels)
        self.b1, self.b2, self.b3 = (conv_bn_relu(in_channels, out_channels, 3, rate) for rate in rates)
        self.b4 = OfficialLayoutASPPPooling(in_channels, out_channels)
        self.project = nn.Sequential(*conv_bn_relu(5 * out_channels, out_channels), nn.Dropout2d(0.5))

    def forward(self, x):
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1))


class OfficialLayoutDeepLabV3Plus(nn.Module):
    """The official DeepLabV3+ structure and module names, written for this test."""

    def __init__(self, num_labels):
        super().__init__()
        self.backbone = OfficialLayoutBackbone()
        self.head = OfficialLayoutASPP(2048)
        self.reduce = conv_bn_relu(256, 48)
        self.fuse = nn.Sequential(*conv_bn_relu(304, 256, 3), *conv_bn_relu(256, 256, 3), nn.Dropout(0.1))
        self.classifier = nn.Conv2d(256, num_labels, 1)

    def forward(self, x):
        c1, c4 = self.backbone(x)
        c4 = F.interpolate(self.head(c4), c1.shape[-2:], mode="bilinear", align_corners=True)
        out = self.classifier(self.fuse(torch.cat([self.reduce(c1), c4], dim=1)))
        return F.interpolate(out, x.shape[-2:], mode="bilinear", align_corners=True)


class OfficialLayoutDeepLabV2(nn.Module):
    """The official DeepLabV2 structure: `classifier` = four dilated 3x3 convs with bias, summed."""

    def __init__(self, num_labels, backbone):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.ModuleList(nn.Conv2d(2048, num_labels, 3, padding=d, dilation=d) for d in (6, 12, 18, 24))

    def forward(self, x):
        c4 = self.backbone(x)[1]
        out = sum(classifier(c4) for classifier in self.classifier)
        return F.interpolate(out, x.shape[-2:], mode="bilinear", align_corners=True)


def randomize_batch_norm(network):
    """Random BN statistics and affine parameters, so a wrong BN mapping changes the logits."""
    generator = torch.Generator().manual_seed(0)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(count, generator=generator) * 0.1)
    return network.eval()


@pytest.fixture(scope="module")
def official_v3plus():
    torch.manual_seed(0)
    return randomize_batch_norm(OfficialLayoutDeepLabV3Plus(num_labels=5))


def test_converter_cli_round_trip_matches_official_logits(official_v3plus, tmp_path):
    checkpoint = tmp_path / "best.pth"
    # DataParallel-style prefix, as a checkpoint saved from the wrapped model would have.
    torch.save({f"module.{key}": value for key, value in official_v3plus.state_dict().items()}, checkpoint)
    output_dir = tmp_path / "converted"
    code = convert_main(
        ["--checkpoint", str(checkpoint), "--model", "deeplabv3plus", "--backbone", "resnet50",
         "--num-labels", "5", "--output-dir", str(output_dir)]
    )  # fmt: skip
    assert code == 0
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "preprocessor_config.json").is_file()
    converted = DeepLabV3PlusForSemanticSegmentation.from_pretrained(output_dir).eval()
    assert converted.config.backbone == "resnet50" and converted.config.num_labels == 5
    pixel_values = torch.randn(1, 3, 37, 45)
    with torch.no_grad():
        expected = official_v3plus(pixel_values)
        actual = converted(pixel_values).logits
    assert actual.shape == expected.shape == (1, 5, 37, 45)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_converter_lists_unknown_and_missing_keys(official_v3plus, tmp_path, capsys):
    state_dict = dict(official_v3plus.state_dict())
    state_dict["aux_head.weight"] = torch.zeros(1)
    del state_dict["reduce.0.weight"]
    checkpoint = tmp_path / "broken.pth"
    torch.save(state_dict, checkpoint)
    arguments = ["--model", "deeplabv3plus", "--backbone", "resnet50", "--num-labels", "5"]
    assert convert_main(["--checkpoint", str(checkpoint), *arguments, "--output-dir", str(tmp_path / "out")]) == 1
    message = capsys.readouterr().err
    assert "aux_head.weight" in message and "unknown keys" in message

    del state_dict["aux_head.weight"]
    torch.save(state_dict, checkpoint)
    assert convert_main(["--checkpoint", str(checkpoint), *arguments, "--output-dir", str(tmp_path / "out")]) == 1
    message = capsys.readouterr().err
    assert "missing keys" in message and "low_level_reduce.conv.weight" in message

    assert convert_main(["--checkpoint", str(tmp_path / "absent.pth"), *arguments, "--output-dir", str(tmp_path)]) == 1
    assert "absent.pth" in capsys.readouterr().err


def test_converter_rejects_wrong_class_count(official_v3plus, tmp_path, capsys):
    checkpoint = tmp_path / "best.pth"
    torch.save(official_v3plus.state_dict(), checkpoint)
    arguments = ["--model", "deeplabv3plus", "--backbone", "resnet50", "--num-labels", "21"]
    assert convert_main(["--checkpoint", str(checkpoint), *arguments, "--output-dir", str(tmp_path / "out")]) == 1
    assert "classifier.weight: (5, 256, 1, 1) vs expected (21, 256, 1, 1)" in capsys.readouterr().err


def test_deeplabv2_coco_init_matches_official_logits(official_v3plus, tmp_path):
    torch.manual_seed(1)
    # The official COCO init file is a whole DeepLabV2 state dict (backbone + classifier.0..3).
    official_v2 = randomize_batch_norm(OfficialLayoutDeepLabV2(num_labels=5, backbone=official_v3plus.backbone))
    path = tmp_path / "deeplabv2_resnet101_coco_pretrained.pth"
    torch.save(official_v2.state_dict(), path)
    model = DeepLabV2ForSemanticSegmentation(DeepLabV2Config(backbone="resnet50", num_labels=5))
    load_coco_init(model, path)
    model.eval()
    pixel_values = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, official_v2(pixel_values), atol=1e-4, rtol=0)

    # A different class count: only the backbone can be taken.
    other = DeepLabV2ForSemanticSegmentation(DeepLabV2Config(backbone="resnet50", num_labels=3))
    with pytest.raises(ValueError, match="classifier.0.weight"):
        load_coco_init(other, path)
    load_coco_init(other, path, include_classifier=False)
    torch.testing.assert_close(other.backbone.state_dict(), model.backbone.state_dict(), atol=0, rtol=0)
