"""Activation checkpointing per backbone block: transformers' API, the same loss, gradients and BatchNorm
buffers as without it, and less memory saved for backward."""

import copy
import functools
import json
import subprocess
import warnings

import pytest
import torch
from helpers import REPO, assert_ok, launch_command
from test_backbones import small_model
from torch.utils.checkpoint import checkpoint

from stpp_hf import build_model
from stpp_hf.models.deeplab.checkpointing import CheckpointedBlocks
from stpp_hf.training.trainer import build_optimizer


def fresh_model(name="deeplabv3plus"):
    torch.manual_seed(0)
    return build_model(name, backbone="resnet18", output_stride=16, num_labels=3).train()


def batches(count=2):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 3, (2, 32, 32), generator=generator))
        for _ in range(count)
    ]


def train_steps(model):
    """Two SGD steps; the losses and the gradients of the last step."""
    optimizer = build_optimizer(model, lr=0.01)
    torch.manual_seed(2)  # the same dropout masks
    losses = []
    for images, labels in batches():
        optimizer.zero_grad()
        loss = model(pixel_values=images, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_training(plain, checkpointed, exact=True):
    """The same losses; the same gradients and state (weights and BatchNorm buffers) bit for bit, or
    (``exact=False``) up to float rounding."""
    plain_losses, plain_grads = train_steps(plain)
    losses, grads = train_steps(checkpointed)
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, losses))
    plain_state, state = plain.state_dict(), checkpointed.state_dict()
    assert list(plain_state) == list(state)
    for expected, actual in ((plain_grads, grads), (plain_state, state)):
        if exact:
            assert [name for name in expected if not torch.equal(expected[name], actual[name])] == []
        else:
            for name in expected:
                torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["deeplabv3plus", "deeplabv2"])
def test_checkpointing_gives_the_same_loss_gradients_and_batchnorm_buffers(name):
    plain = fresh_model(name)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    assert_same_training(plain, checkpointed)
    tracked = {b.item() for n, b in checkpointed.named_buffers() if n.endswith("num_batches_tracked")}
    assert tracked == {2}  # two steps, each counted once


def test_the_deprecated_gradient_checkpointing_api_and_the_reentrant_checkpoint_work_too():
    # the reentrant checkpoint adds the gradients reaching a stage's output (from the next stage and from the
    # head) in another order: the gradients of the stem and of layer1 move in the last bits
    plain = fresh_model()
    checkpointed = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert_same_training(plain, checkpointed, exact=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        checkpointed.gradient_checkpointing_disable()
    assert not checkpointed.is_activation_checkpointing


def naive_checkpointed_forward(stage, hidden_states):
    for block in stage:
        hidden_states = checkpoint(block, hidden_states, use_reentrant=False)
    return hidden_states


def test_naive_per_block_checkpointing_updates_the_running_statistics_twice():
    # what the block-wise recompute guards against: the same blocks checkpointed without it
    plain, naive = fresh_model(), fresh_model()
    for stage in naive.backbone.children():
        if isinstance(stage, CheckpointedBlocks):
            stage.forward = functools.partial(naive_checkpointed_forward, stage)
    train_steps(plain), train_steps(naive)
    tracked = {n: b.item() for n, b in naive.named_buffers() if n.endswith("num_batches_tracked")}
    assert tracked["backbone.layer1.0.bn1.num_batches_tracked"] == 4
    assert not torch.equal(plain.backbone.layer1[0].bn1.running_mean, naive.backbone.layer1[0].bn1.running_mean)


def test_every_backbone_block_is_checkpointed_and_the_keys_are_unchanged():
    model = fresh_model()
    stages = [child for child in model.backbone.children() if isinstance(child, CheckpointedBlocks)]
    assert len(stages) == 4 and sum(len(stage) for stage in stages) == 8  # ResNet-18: 2 blocks per stage
    assert "backbone.layer1.0.conv1.weight" in model.state_dict()
    model.activation_checkpointing_enable()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model(pixel_values=batches(1)[0][0]).logits.sum().backward()
    checkpointed_bytes = sum(saved)
    model.activation_checkpointing_disable()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model(pixel_values=batches(1)[0][0]).logits.sum().backward()
    assert checkpointed_bytes < 0.7 * sum(saved)


def saved_bytes(model, pixel_values):
    """Bytes the backbone's forward keeps for the backward pass (autograd's saved tensors)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        features = model.backbone(pixel_values)
    sum(feature.sum() for feature in features).backward()
    return sum(saved)


# ConvNeXt (LayerNorm), EfficientNet (BatchNorm in every block: the guard) through CheckpointedBlocks; the ViT
# (LayerNorm) through timm's per-block checkpointing
@pytest.mark.parametrize("family", ["convnext", "efficientnet", "vit"])
def test_other_backbones_train_bit_for_bit_the_same_with_less_memory_saved(family):
    plain = small_model("deeplabv3plus", family).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    assert_same_training(plain, checkpointed)
    tracked = {b.item() for n, b in checkpointed.named_buffers() if n.endswith("num_batches_tracked")}
    assert tracked == {2}  # the backbone's BatchNorms (EfficientNet) and the head's: two steps, each counted once
    pixel_values = batches(1)[0][0]
    assert saved_bytes(checkpointed, pixel_values) < 0.5 * saved_bytes(plain, pixel_values)
    checkpointed.activation_checkpointing_disable()
    assert not checkpointed.is_activation_checkpointing
    assert saved_bytes(checkpointed, pixel_values) == saved_bytes(plain, pixel_values)


def test_every_block_of_convnext_and_efficientnet_is_checkpointed_and_the_keys_are_unchanged():
    # convnext_atto: 2, 2, 6 and 2 blocks; efficientnet_b0: 16 blocks in 7 stages; keys as timm's feature extractor
    for family, depth, key in (
        ("convnext", 12, "backbone.stages_3.blocks.1.mlp.fc2.weight"),
        ("efficientnet", 16, "backbone.blocks.6.0.conv_pw.weight"),
    ):
        model = small_model("deeplabv3plus", family)
        stages = [module for module in model.backbone.modules() if isinstance(module, CheckpointedBlocks)]
        assert sum(len(stage) for stage in stages) == depth
        assert key in model.state_dict()


def test_checkpointing_a_backbone_it_cannot_make_exact_is_refused_naming_it():
    model = build_model("deeplabv3plus", backbone="regnetx_002", output_stride=16, num_labels=3)
    with pytest.raises(ValueError, match="backbone='regnetx_002': activation checkpointing finds no stage.*resnet50"):
        model.activation_checkpointing_enable()
    assert not model.is_activation_checkpointing
    vit = small_model("deeplabv3plus", "vit")
    with pytest.raises(ValueError, match="vit_small_patch14_dinov2.*timm's own non-reentrant checkpoint"):
        vit.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="offload are not supported"):
        vit.activation_checkpointing_enable(offload=True)
    assert not vit.is_activation_checkpointing


def test_without_gradients_or_in_eval_mode_nothing_is_recomputed():
    model = fresh_model()
    model.activation_checkpointing_enable()
    images = batches(1)[0][0]
    with torch.no_grad():
        train_logits = model(pixel_values=images).logits
    model.eval()
    eval_logits = model(pixel_values=images).logits
    assert eval_logits.requires_grad and train_logits.shape == eval_logits.shape
    assert model.backbone.layer1[0].bn1.num_batches_tracked.item() == 1  # the no_grad training forward


# One training stage of a ResNet-18 DeepLabV3+ (BatchNorm and dropout kept) without and with activation
# checkpointing, in the same process(es): the trained weights and BatchNorm buffers of every process.
STAGE_SCRIPT = """
import json, sys
import torch
from accelerate import Accelerator
from stpp_hf import build_model
from stpp_hf.training.config import resolve_options
from stpp_hf.training.trainer import train_stage

accelerator = Accelerator()
generator = torch.Generator().manual_seed(0)
pixels = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(8)]
train = [(image, (image[0] > 127).to(torch.uint8)) for image in pixels]
val = [(torch.randn(3, 32, 32, generator=generator), torch.randint(0, 2, (32, 32), generator=generator))]
states, losses = [], []
for checkpointing in (False, True):
    models = []

    def factory():
        models.append(build_model("deeplabv3plus", num_labels=2, backbone="resnet18", output_stride=16))
        return models[-1]

    config = resolve_options(
        accelerator.num_processes, framework="suponly", epochs=1, global_batch_size=4, lr=0.01,
        val_batch_size=1, channels_last=False,
        activation_checkpointing=checkpointing,
    )
    summary = train_stage(factory, train, val, accelerator, f"{sys.argv[1]}/{checkpointing}", config, 0, 2)
    losses.append(summary["history"][0]["loss"])
    states.append({name: tensor.clone() for name, tensor in models[-1].state_dict().items()})
    assert models[-1].is_activation_checkpointing == checkpointing
different = [name for name in states[0] if not torch.equal(states[0][name], states[1][name])]
print(f"RESULT{accelerator.process_index} " + json.dumps({"different": different, "losses": losses}))
accelerator.end_training()
"""


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_training_stage_ends_bit_for_bit_the_same_with_checkpointing(tmp_path, processes):
    script = tmp_path / "stage.py"
    script.write_text(STAGE_SCRIPT)
    launch, env = launch_command(script, processes)
    completed = subprocess.run(
        [*launch, str(tmp_path / "run")], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert_ok(completed)
    results = [line for line in completed.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == processes
    for line in results:
        result = json.loads(line.split(" ", 1)[1])
        assert result["different"] == [] and result["losses"][0] == result["losses"][1]


def test_the_option_reaches_the_run_config_and_a_relaunch_may_change_it():
    from stpp_hf.training.config import resolve_run_config
    from stpp_hf.training.options import parse_arguments
    from stpp_hf.training.run_record import config_differences

    def resolved(*argv):
        data, model, run, _ = parse_arguments(["--output_dir", "runs/x", *argv])
        return resolve_run_config(data, model, run)

    plain, checkpointed = resolved(), resolved("--activation_checkpointing")
    assert (plain.run.activation_checkpointing, checkpointed.run.activation_checkpointing) == (False, True)
    assert config_differences(plain.record(), checkpointed.record()) == []
