"""The per-stage recipe: param groups, poly lr per optimizer step under accumulation, exact resume."""

import pytest
import torch
from helpers import tiny_deeplab
from safetensors.torch import load_file

from stpp_hf.data.normalization import normalize
from stpp_hf.metrics import SegmentationMetric
from stpp_hf.training import trainer as trainer_module
from stpp_hf.training.config import resolve_options
from stpp_hf.training.evaluation import evaluate
from stpp_hf.training.recipe import scaled_lr
from stpp_hf.training.trainer import train_stage

NUM_CLASSES = 2


def make_model():
    return tiny_deeplab(num_labels=NUM_CLASSES)


def toy_set(count, seed):
    """Training items as ``TrainTransform`` makes them: ``(uint8 [3, 32, 32], uint8 [32, 32])``."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(count):
        pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator)
        items.append((pixels, (pixels[0] > 127).to(torch.uint8)))
    return items


def toy_val_set(count, seed):
    """The same images as evaluation items, as ``EvalTransform`` makes them: ``(float32, int64)``."""
    return [(normalize(pixels), labels.long()) for pixels, labels in toy_set(count, seed)]


@pytest.fixture
def recorded_steps(monkeypatch):
    """The lr of every group at each real SGD step (the prepared optimizer skips accumulation steps)."""
    steps = []
    original = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        steps.append([group["lr"] for group in self.param_groups])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    return steps


@pytest.mark.slow
def test_poly_lr_per_optimizer_step_with_gradient_accumulation(tmp_path, recorded_steps, fresh_accelerator):
    accelerator = fresh_accelerator(gradient_accumulation_steps=2)
    config = resolve_options(
        framework="suponly", epochs=2, global_batch_size=4, lr=0.01, val_batch_size=4, channels_last=False
    )
    summary = train_stage(
        make_model, toy_set(17, 0), toy_val_set(2, 1), accelerator, tmp_path / "stage", config, 1, NUM_CLASSES
    )
    # 17 images, global batch 4 = 2 per micro-batch x 2 accumulation steps, drop_last -> 4 optimizer steps per epoch
    assert summary["steps"] == 8 and len(recorded_steps) == 8
    lr = scaled_lr(0.01, 4)
    assert summary["lr"] == pytest.approx(lr) == pytest.approx(0.01 / 16 * 4)
    for index, (backbone_lr, head_lr) in enumerate(recorded_steps):
        assert backbone_lr == pytest.approx(lr * (1 - index / 8) ** 0.9)
        assert head_lr == pytest.approx(10 * backbone_lr)
    assert len(summary["history"]) == 2 and (tmp_path / "stage" / "best" / "config.json").is_file()


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_batches_are_normalised_on_the_device(tmp_path, channels_last, fresh_accelerator):
    """uint8 items reach the model as the ImageNet-normalised float32 batch and int64 labels."""
    seen = []

    def recording_model():
        model = make_model()

        def record(module, args, kwargs):
            if module.training:
                seen.append((kwargs["pixel_values"].clone(), kwargs["labels"].clone()))

        model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    train = toy_set(4, 0)
    config = resolve_options(
        framework="suponly", epochs=1, global_batch_size=4, lr=0.01, val_batch_size=2, channels_last=channels_last
    )
    train_stage(
        recording_model, train, toy_val_set(2, 1), fresh_accelerator(), tmp_path / "stage", config, 1, NUM_CLASSES
    )
    ((pixel_values, labels),) = seen
    assert pixel_values.dtype == torch.float32 and labels.dtype == torch.int64
    # the batch is shuffled: match each row to its item
    for pixels, label in train:
        row = next(i for i in range(4) if torch.equal(labels[i], label.long()))
        assert torch.equal(pixel_values[row], normalize(pixels))


def test_the_loss_is_read_back_once_per_logging_interval_and_at_the_epoch_end(
    tmp_path, monkeypatch, fresh_accelerator
):
    """4 steps per epoch, logging_steps=3: the tracker gets the mean loss of steps 1-3 and of step 4 (the epoch's
    end), from 2 reductions instead of 4; the per-step run trains the same (same val mIoU) and logs each step."""

    def run(name, logging_steps):
        accelerator = fresh_accelerator()
        logged, reductions = [], []
        monkeypatch.setattr(accelerator, "log", lambda values, step=None: logged.append((step, values)))
        reduce = accelerator.reduce

        def counted_reduce(tensor, *args, **kwargs):
            reductions.append(tensor.shape)
            return reduce(tensor, *args, **kwargs)

        monkeypatch.setattr(accelerator, "reduce", counted_reduce)
        config = resolve_options(
            framework="suponly", epochs=1, global_batch_size=2, lr=0.01, val_batch_size=2, channels_last=False
        )
        summary = train_stage(
            make_model, toy_set(8, 0), toy_val_set(2, 1), accelerator, tmp_path / name, config, 1, NUM_CLASSES,
            logging_steps=logging_steps,
        )  # fmt: skip
        losses = {step: values["train/loss"] for step, values in logged if "train/loss" in values}
        return losses, len(reductions), summary

    every_step, every_step_reductions, reference = run("every_step", 1)
    interval, interval_reductions, summary = run("interval", 3)
    assert sorted(every_step) == [1, 2, 3, 4] and every_step_reductions == 4
    assert sorted(interval) == [3, 4] and interval_reductions == 2
    assert summary["history"][0]["val_miou"] == reference["history"][0]["val_miou"]
    assert interval[3] == pytest.approx(sum(every_step[step] for step in (1, 2, 3)) / 3, abs=1e-6)
    assert interval[4] == pytest.approx(every_step[4], abs=1e-6)
    assert summary["history"][0]["loss"] == pytest.approx(sum(every_step.values()) / 4, abs=1e-6)
    assert reference["history"][0]["loss"] == pytest.approx(sum(every_step.values()) / 4, abs=1e-6)


def test_too_small_training_set_is_a_clear_error(tmp_path, fresh_accelerator):
    accelerator = fresh_accelerator()
    config = resolve_options(framework="suponly", epochs=1, global_batch_size=8, lr=0.01)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_stage(make_model, toy_set(5, 0), toy_val_set(2, 1), accelerator, tmp_path / "s", config, 1, NUM_CLASSES)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_resume_after_a_crash_gives_the_uninterrupted_weights(tmp_path, monkeypatch, channels_last, fresh_accelerator):
    # channels_last=False caught evaluation switching the trained parameters to channels_last behind
    # the optimizer's back (fused SGD then adds momentum in the wrong layout; a resume did not)
    config = resolve_options(
        framework="suponly", epochs=3, global_batch_size=4, lr=0.02, val_batch_size=4, channels_last=channels_last
    )
    train, val = toy_set(8, 0), toy_val_set(2, 1)
    reference = train_stage(
        make_model,
        train,
        val,
        fresh_accelerator(),
        tmp_path / "uninterrupted",
        config,
        5,
        NUM_CLASSES,
        snapshot_epochs=(1, 2, 3),
    )

    original = trainer_module._save_checkpoint
    saved = []

    def crash_after_second_checkpoint(*args, **kwargs):
        original(*args, **kwargs)
        saved.append(1)
        if len(saved) == 2:
            raise KeyboardInterrupt("simulated kill")

    def train_in_resumed_dir():
        return train_stage(
            make_model, train, val, fresh_accelerator(), tmp_path / "resumed", config, 5, NUM_CLASSES,
            snapshot_epochs=(1, 2, 3),
        )  # fmt: skip

    monkeypatch.setattr(trainer_module, "_save_checkpoint", crash_after_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_in_resumed_dir()
    monkeypatch.setattr(trainer_module, "_save_checkpoint", original)
    resumed = train_in_resumed_dir()

    assert [h["val_miou"] for h in resumed["history"]] == [h["val_miou"] for h in reference["history"]]
    for relative in ("snapshots/epoch_3/model.safetensors", "best/model.safetensors"):
        expected = load_file(tmp_path / "uninterrupted" / relative)
        actual = load_file(tmp_path / "resumed" / relative)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_evaluation_leaves_the_trained_model_as_it_was(fresh_accelerator):
    torch.manual_seed(0)
    model = make_model().train()
    layouts = {name: parameter.stride() for name, parameter in model.named_parameters()}
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    # two batches through the Accelerator's autocast (a fresh context per batch)
    metrics = evaluate(model, toy_val_set(3, 2), NUM_CLASSES, accelerator=fresh_accelerator(), batch_size=2)
    assert 0.0 <= metrics["miou"] <= 1.0
    assert model.training
    assert {name: parameter.stride() for name, parameter in model.named_parameters()} == layouts
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.slow
def test_bf16_mixed_precision_runs_training_and_evaluation_under_autocast(tmp_path, fresh_accelerator):
    accelerator = fresh_accelerator(mixed_precision="bf16")
    seen = []

    def factory():
        model = make_model()
        model.classifier.register_forward_hook(
            lambda module, args, output: seen.append((module.training, output.dtype))
        )
        return model

    config = resolve_options(
        framework="suponly", epochs=1, global_batch_size=4, lr=0.01, val_batch_size=2, channels_last=False
    )
    summary = train_stage(
        factory, toy_set(8, 0), toy_val_set(3, 1), accelerator, tmp_path / "stage", config, 3, NUM_CLASSES
    )
    assert 0.0 <= summary["val_miou"] <= 1.0
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    # evaluation: the BN-folding check runs twice in fp32, then the 2 val batches run in bf16
    assert [dtype for training, dtype in seen if not training] == [torch.float32] * 2 + [torch.bfloat16] * 2
    # the weights stay fp32: autocast changes the compute dtype, not the parameters
    saved = load_file(tmp_path / "stage" / "best" / "model.safetensors")
    assert {tensor.dtype for tensor in saved.values() if tensor.is_floating_point()} == {torch.float32}


@pytest.mark.slow
def test_sliding_window_evaluation_equals_window_by_window_prediction():
    torch.manual_seed(0)
    model = make_model().eval()
    with torch.no_grad():  # larger logits: the argmax varies across the image, so windows matter
        model.classifier.weight.mul_(50)
    val = toy_val_set(3, 4)
    metrics = evaluate(model, val, NUM_CLASSES, batch_size=2, sliding_window=(16, 12))
    manual = SegmentationMetric(NUM_CLASSES)
    with torch.no_grad():
        for image, mask in val:
            manual.update(model.predict_sliding_window(image[None], window=16, stride=12).argmax(1), mask[None])
    assert metrics["miou"] == pytest.approx(manual.compute()["miou"], abs=1e-12)
    whole = evaluate(model, val, NUM_CLASSES, batch_size=2)
    assert whole["miou"] != metrics["miou"]  # the windows really were used


def _scaled_steps(optimizer, parameters, gradients):
    """One GradScaler step per entry of ``gradients`` (``{parameter: gradient}`` each), as fp16 training does."""
    scaler = torch.amp.GradScaler("cpu")
    for step_gradients in gradients:
        loss = sum((parameter * step_gradients[index]).sum() for index, parameter in enumerate(parameters))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    return scaler


def test_a_step_the_grad_scaler_skips_leaves_fused_sgd_as_plain_sgd():
    """fp16: the first step has an inf gradient and is skipped, the second is normal; fused SGD's momentum must
    not hold uninitialised memory after the skip (it did: non-finite weights)."""
    torch.manual_seed(0)
    reference = make_model()
    generator = torch.Generator().manual_seed(1)
    shapes = [parameter.shape for parameter in reference.parameters()]
    normal = [torch.randn(shape, generator=generator) for shape in shapes]
    overflow = [
        torch.full(shape, float("inf")) if index == 0 else torch.zeros(shape) for index, shape in enumerate(shapes)
    ]
    results = []
    for make_optimizer in (
        lambda model: trainer_module.build_optimizer(model, 0.01),  # fused
        lambda model: torch.optim.SGD(
            model.optimizer_param_groups(0.01), lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=False
        ),
    ):
        model = make_model()
        model.load_state_dict(reference.state_dict())
        parameters = list(model.parameters())
        scaler = _scaled_steps(make_optimizer(model), parameters, [overflow, normal])
        assert scaler.get_scale() == 65536.0 / 2  # the skipped step halved the scale
        results.append([parameter.detach().clone() for parameter in parameters])
    fused, plain = results
    for fused_parameter, plain_parameter in zip(fused, plain):
        torch.testing.assert_close(fused_parameter, plain_parameter, rtol=0, atol=1e-7)


def test_each_stage_starts_from_a_fresh_grad_scaler(tmp_path, fresh_accelerator):
    """The loss scale where one stage ended (or its checkpoint restored) is not the next stage's start."""
    accelerator = fresh_accelerator()
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what fp16 on a GPU has; accelerate refuses fp16 on a CPU
    accelerator.scaler.load_state_dict(  # a stage that ended (or was resumed) at loss scale 8
        {"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 0}
    )
    config = resolve_options(framework="suponly", epochs=1, global_batch_size=2, lr=0.01, channels_last=False)
    run = trainer_module._setup_stage(make_model, toy_set(4, 0), accelerator, tmp_path / "stage", config, 1)
    assert accelerator.scaler.get_scale() == 65536.0
    assert run.optimizer.scaler is accelerator.scaler  # the prepared optimizer steps through the new one


def test_cudnn_benchmark_is_on_for_training_only(tmp_path, fresh_accelerator):
    """Fixed-size training crops let cuDNN time its algorithms once; evaluation sees images of many sizes."""
    seen = []

    def recording_model():
        model = make_model()
        model.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append((module.training, torch.backends.cudnn.benchmark)),
            with_kwargs=True,
        )
        return model

    config = resolve_options(
        framework="suponly", epochs=1, global_batch_size=4, lr=0.01, val_batch_size=2, channels_last=False
    )
    train_stage(
        recording_model, toy_set(4, 0), toy_val_set(2, 1), fresh_accelerator(), tmp_path / "stage", config, 1, 2
    )
    assert {benchmark for training, benchmark in seen if training} == {True}
    assert {benchmark for training, benchmark in seen if not training} == {False}  # the evaluation's inference copy
    assert not torch.backends.cudnn.benchmark  # restored
