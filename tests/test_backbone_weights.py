"""Backbone weights from timm tags / Hub repos (a fake Hub on 127.0.0.1, never the network) and local files."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from fake_hub import FakeHub
from helpers import REPO, tiny_deeplab
from huggingface_hub import constants, try_to_load_from_cache
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf

from stpp_hf import build_model
from stpp_hf.models.backbone_weights import describe_backbone_weights, load_backbone_weights

TAG_REPO = "timm/resnet18.tv_in1k"  # what `--backbone_weights tv_in1k` means for a resnet18 backbone

# Runs with HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE from the environment, as a training run does.
LOAD_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    from safetensors.torch import save_file
    from stpp_hf import build_model
    from stpp_hf.models.backbone_weights import load_backbone_weights

    model = build_model("deeplabv3plus", backbone="resnet18", output_stride=16, num_labels=3)
    print(load_backbone_weights(model, sys.argv[1]))
    save_file(model.backbone.state_dict(), sys.argv[2])
    """
)


def timm_repo_files(directory: Path, architecture: str, seed: int) -> dict[str, bytes]:
    """The files of a timm weights repo (model.safetensors + config.json, as timm's `push_to_hf_hub` writes them)
    holding a randomly initialised `architecture`."""
    torch.manual_seed(seed)
    save_for_hf(timm.create_model(architecture, pretrained=False), directory, safe_serialization=True)
    return {path.name: path.read_bytes() for path in directory.iterdir()}


def assert_backbone_equals(model, reference: dict[str, torch.Tensor]):
    """Every backbone tensor of `model` equals the reference ResNet state dict's (whose classifier `fc` is unused)."""
    loaded = model.backbone.state_dict()
    assert set(loaded) == {key for key in reference if not key.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, reference[key]), key


def use_hub(monkeypatch, url: str, cache: Path, offline: bool = False):
    """Point this process's huggingface_hub at `url` with the cache `cache` (what HF_ENDPOINT / HF_HOME set
    at import)."""
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A fake Hub serving a resnet18 as timm's `timm/resnet18.tv_in1k` and a few repos to get wrong."""
    root = tmp_path_factory.mktemp("repos")
    resnet18 = timm_repo_files(root / "resnet18", "resnet18", seed=1)
    resnet34 = timm_repo_files(root / "resnet34", "resnet34", seed=2)
    with FakeHub() as hub:
        hub.add_repo(TAG_REPO, resnet18)
        hub.add_repo("someone/resnet34-weights", resnet34)
        hub.add_repo("someone/mislabelled", {**resnet34, "config.json": resnet18["config.json"]})
        hub.add_repo("someone/weights-without-config", {"model.safetensors": resnet18["model.safetensors"]})
        yield {"hub": hub, "resnet18": load_file(root / "resnet18" / "model.safetensors")}


@pytest.mark.slow
def test_a_hub_tag_downloads_once_then_loads_offline_from_the_cache(served, tmp_path, monkeypatch):
    hub, reference = served["hub"], served["resnet18"]
    home = tmp_path / "hf_home"
    environment = {
        **os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
        "PYTHONPATH": str(REPO),
    }  # fmt: skip
    environment.pop("HF_HUB_OFFLINE", None)
    environment.pop("HF_HUB_CACHE", None)
    output = tmp_path / "backbone.safetensors"
    run = subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, "tv_in1k", str(output)],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"'hub_id': '{TAG_REPO}'" in run.stdout
    downloaded = load_file(output)
    assert set(downloaded) == {key for key in reference if not key.startswith("fc.")}
    for key, value in downloaded.items():
        assert torch.equal(value, reference[key]), key
    assert hub.unhandled == []

    # HF_HUB_OFFLINE=1: the cached copy, here into a DeepLabV2 (its fallback when there is no COCO init file)
    use_hub(monkeypatch, "http://127.0.0.1:9", home / "hub", offline=True)  # nothing listens on port 9
    model = build_model("deeplabv2", backbone="resnet18", num_labels=3)
    classifier_before = [conv.weight.clone() for conv in model.classifier]
    description = load_backbone_weights(model, "resnet18.tv_in1k")
    assert description == {"spec": "resnet18.tv_in1k", "kind": "hub", "hub_id": TAG_REPO, "path": None}
    assert_backbone_equals(model, reference)
    assert all(torch.equal(conv.weight, before) for conv, before in zip(model.classifier, classifier_before))

    # offline with an empty cache: say how to get the weights, or which file to pass
    use_hub(monkeypatch, "http://127.0.0.1:9", tmp_path / "empty_cache", offline=True)
    with pytest.raises(
        FileNotFoundError, match=rf"`hf download {TAG_REPO}`.*--backbone_weights path/to/resnet18\.safetensors"
    ):
        load_backbone_weights(build_model("deeplabv2", backbone="resnet18", num_labels=3), "tv_in1k")


def test_hub_repos_of_another_architecture_or_layout_are_clear_errors(served, tmp_path, monkeypatch):
    use_hub(monkeypatch, served["hub"].url, tmp_path / "cache")
    model = tiny_deeplab(num_labels=3)
    before = {key: value.clone() for key, value in model.backbone.state_dict().items()}
    other_architecture = r"'someone/resnet34-weights' holds resnet34 weights, but the model's backbone is resnet18"
    with pytest.raises(ValueError, match=other_architecture):
        load_backbone_weights(model, "someone/resnet34-weights")
    # a config.json that names resnet18 over resnet34 tensors: the key check names the repo
    mislabelled = (
        r"'someone/mislabelled' \(Hub repo someone/mislabelled\), loaded into a resnet18 backbone, does not match"
    )
    with pytest.raises(ValueError, match=mislabelled + r" .*unexpected keys: .*layer1\.2\."):
        load_backbone_weights(model, "someone/mislabelled")
    with pytest.raises(
        ValueError, match=r"someone/weights-without-config cannot be used as timm weights .*config\.json"
    ):
        load_backbone_weights(model, "someone/weights-without-config")
    with pytest.raises(ValueError, match=r"someone/no-such-repo cannot be used as timm weights"):
        load_backbone_weights(model, "someone/no-such-repo")
    assert all(torch.equal(value, before[key]) for key, value in model.backbone.state_dict().items())
    # any owner/name repo of the right architecture loads
    other_repo = "someone/resnet18-copy"
    served["hub"].add_repo(other_repo, served["hub"].files(TAG_REPO))
    assert load_backbone_weights(model, other_repo)["hub_id"] == other_repo
    assert_backbone_equals(model, served["resnet18"])


def test_local_files_in_torchvision_and_timm_layout(tmp_path):
    torch.manual_seed(3)
    torchvision_weights = torchvision.models.resnet18(weights=None).state_dict()  # with fc.*, as the ImageNet files
    torch.save(torchvision_weights, tmp_path / "resnet18.pth")
    timm_weights = timm.create_model("resnet18", pretrained=False).state_dict()
    save_file(timm_weights, tmp_path / "resnet18.safetensors")
    torch.save({"model": timm_weights, "epoch": 3}, tmp_path / "checkpoint.bin")  # a training checkpoint
    files = {"resnet18.pth": torchvision_weights, "resnet18.safetensors": timm_weights, "checkpoint.bin": timm_weights}
    for name, reference in files.items():
        model = tiny_deeplab(num_labels=3)
        description = load_backbone_weights(model, str(tmp_path / name))
        assert description == {
            "spec": str(tmp_path / name),
            "kind": "file",
            "hub_id": None,
            "path": str(tmp_path / name),
        }
        assert_backbone_equals(model, reference)


def test_a_weights_file_of_another_architecture_is_a_clear_error(tmp_path):
    save_file(timm.create_model("resnet34", pretrained=False).state_dict(), tmp_path / "resnet34.safetensors")
    model = tiny_deeplab(num_labels=3)
    other_architecture = r"resnet34\.safetensors, loaded into a resnet18 backbone, does not match .*unexpected keys"
    with pytest.raises(ValueError, match=other_architecture):
        load_backbone_weights(model, str(tmp_path / "resnet34.safetensors"))
    small_stem = {
        **torchvision.models.resnet18().state_dict(),
        "conv1.weight": torch.zeros(64, 3, 3, 3),
    }  # a CIFAR stem
    torch.save(small_stem, tmp_path / "cifar_resnet18.pth")
    with pytest.raises(ValueError, match=r"cifar_resnet18\.pth, .*shape mismatches: conv1\.weight: \(64, 3, 3, 3\)"):
        load_backbone_weights(model, str(tmp_path / "cifar_resnet18.pth"))


def test_none_keeps_the_random_initialisation():
    torch.manual_seed(0)
    model = tiny_deeplab(num_labels=3)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert load_backbone_weights(model, "none") == {"spec": "none", "kind": "none", "hub_id": None, "path": None}
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_describe_resolves_tags_and_hub_ids_without_downloading(tmp_path, monkeypatch):
    use_hub(monkeypatch, "http://127.0.0.1:9", tmp_path / "empty_cache", offline=True)  # any request would fail
    for spec in ("tv_in1k", "resnet101.tv_in1k", "timm/resnet101.tv_in1k", "hf-hub:timm/resnet101.tv_in1k"):
        assert describe_backbone_weights(spec, "resnet101")["hub_id"] == "timm/resnet101.tv_in1k", spec
    assert describe_backbone_weights("a1h_in1k", "resnet101")["hub_id"] == "timm/resnet101.a1h_in1k"
    assert describe_backbone_weights("someone/weights@v2", "resnet50") == {
        "spec": "someone/weights@v2", "kind": "hub", "hub_id": "someone/weights@v2", "path": None,
    }  # fmt: skip


def test_describe_rejects_bad_specs_with_the_option_and_what_to_do(tmp_path):
    mismatch = r"--backbone_weights 'resnet50\.tv_in1k' holds resnet50 weights, but the model's backbone is resnet101"
    with pytest.raises(ValueError, match=mismatch):
        describe_backbone_weights("resnet50.tv_in1k", "resnet101")
    with pytest.raises(
        ValueError, match=r"--backbone_weights 'timm/resnet50\.a1_in1k' holds resnet50 weights.* resnet101"
    ):
        describe_backbone_weights("timm/resnet50.a1_in1k", "resnet101")
    unknown = (
        r"no pretrained weights named 'resnet18\.tv_in21k'.*resnet18\.tv_in1k.*timm\.list_pretrained\('resnet18\*'\)"
    )
    with pytest.raises(ValueError, match=unknown):
        describe_backbone_weights("tv_in21k", "resnet18")
    with pytest.raises(ValueError, match=r"no pretrained weights named 'resnet101\.resnet101'"):
        describe_backbone_weights("resnet101", "resnet101")  # an architecture, not weights
    with pytest.raises(FileNotFoundError, match=r"--backbone_weights file not found: .*missing\.pth"):
        describe_backbone_weights(str(tmp_path / "missing.pth"), "resnet18")
    with pytest.raises(ValueError, match=r"is a local path but not a \.pth / \.safetensors / \.bin file"):
        describe_backbone_weights(str(tmp_path), "resnet18")
    with pytest.raises(ValueError, match=r"neither a \.pth / \.safetensors / \.bin file nor a valid Hub repo id"):
        describe_backbone_weights("pretrained/nested/resnet18", "resnet18")


def test_a_truncated_file_in_the_hub_cache_is_named_with_the_command_that_fetches_it_again(
    served, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    use_hub(monkeypatch, served["hub"].url, cache)
    load_backbone_weights(tiny_deeplab(num_labels=3), "tv_in1k")  # downloads into the cache
    cached = Path(try_to_load_from_cache(TAG_REPO, "model.safetensors", cache_dir=str(cache))).resolve()
    cached.write_bytes(cached.read_bytes()[:100])  # a download or copy cut short
    use_hub(monkeypatch, "http://127.0.0.1:9", cache, offline=True)
    with pytest.raises(OSError) as error:
        load_backbone_weights(tiny_deeplab(num_labels=3), "tv_in1k")
    message = str(error.value)
    assert f"the file model.safetensors of Hub repo {TAG_REPO}" in message and str(cached) in message, message
    assert f"`hf download {TAG_REPO} model.safetensors --force-download`" in message
