"""The inference copy of a model: BatchNorm folding and its self-check, under CUDA's default TF32 convolutions
(emulated on the CPU) and with trained-looking BatchNorm statistics."""

import pytest
import torch
from helpers import tiny_deeplab, trained_looking_batchnorm
from tf32_emulation import emulated_tf32_convolutions
from transformers.modeling_outputs import SemanticSegmenterOutput

from stpp_hf.training.inference import fold_batchnorm, inference_model, to_device_images


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return trained_looking_batchnorm(tiny_deeplab(num_labels=5))


def probe(seed=0, size=64):
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return to_device_images(image, torch.device("cpu"))


def test_the_folding_check_holds_under_tf32_convolutions(model):
    example = probe()
    with emulated_tf32_convolutions():
        folded = fold_batchnorm(model, example)  # raised "BatchNorm folding changed the logits" before
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # the probe's full fp32 was undone
        assert torch.backends.cuda.matmul.fp32_precision == "none"
        # the emulation is live: the inference itself runs in TF32, off the fp32 logits by more than 1e-4
        difference = (folded(pixel_values=example).logits - model(pixel_values=example).logits).abs().max()
    assert difference > 1e-4
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())


def test_the_folding_check_scales_with_the_logits(model):
    large = trained_looking_batchnorm(tiny_deeplab(num_labels=5))
    large.load_state_dict(model.state_dict())
    with torch.no_grad():  # logits of a few thousand: fp32 rounding of the fold alone is above 1e-4
        large.classifier.weight.mul_(3000.0)
    folded = fold_batchnorm(large, probe())
    logits, folded_logits = large(pixel_values=probe()).logits, folded(pixel_values=probe()).logits
    assert logits.abs().max() > 1000
    torch.testing.assert_close(folded_logits, logits, rtol=0, atol=1e-5 * logits.abs().max().item())


class SharedConvOutput(torch.nn.Module):
    """A conv whose output feeds its BatchNorm and a shortcut: folding the BatchNorm into it is wrong."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = torch.nn.BatchNorm2d(4)

    def forward(self, pixel_values):
        features = self.conv(pixel_values)
        return SemanticSegmenterOutput(logits=self.norm(features) + features)


def test_a_wrong_fold_is_still_caught():
    torch.manual_seed(0)
    model = trained_looking_batchnorm(SharedConvOutput())
    with pytest.raises(RuntimeError, match="a folded conv output has other users"):
        fold_batchnorm(model, probe())
    with emulated_tf32_convolutions(), pytest.raises(RuntimeError, match="other users"):
        fold_batchnorm(model, probe())


def test_syncbatchnorm_is_folded_like_batchnorm(model):
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(trained_looking_batchnorm(tiny_deeplab(num_labels=5)))
    synced.load_state_dict(model.state_dict())
    example = probe(seed=1)
    folded_synced = inference_model(synced.eval(), torch.device("cpu"), example)
    folded = inference_model(model, torch.device("cpu"), example)
    assert not any(isinstance(module, torch.nn.SyncBatchNorm) for module in folded_synced.modules())
    with torch.no_grad():
        assert torch.equal(folded_synced(pixel_values=example).logits, folded(pixel_values=example).logits)
