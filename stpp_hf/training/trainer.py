"""One training stage (docs/method.md §2) on Accelerate: fresh model, SGD, poly lr, val every epoch.

Everything device-, precision- and process-related goes through the ``Accelerator``: the model,
optimizer and train DataLoader are prepared (DDP, autocast, sharding), gradient accumulation uses
``accelerator.accumulate``, checkpoints use ``save_state`` / ``load_state``. The poly schedule is
computed from the optimizer-step counter (not a prepared scheduler, which would step once per
process), so it is the same whatever the number of processes or accumulation steps.

The recipe is stated as a global batch: the per-device batch is ``global / (processes x accumulation)``,
the lr ``base_lr / 16 * global`` and the steps per epoch ``len(train set) // global``, so one process
with global batch B and N processes with global batch B take the same steps with the same lr on the
same images (:mod:`~stpp_hf.training.sampling`). BatchNorm sees the per-device batch unless SyncBatchNorm is on.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate.utils import DistributedType, broadcast, set_seed

from ..data.normalization import normalize_batch
from ..metrics import SegmentationMetric, format_per_class_iou
from ..progress import progress_bar
from .config import per_device_batch_size
from .distributed import rank_and_world_size
from .inference import autocast, inference_model, same_size_batches, shard_indices, to_device_images
from .sampling import training_loader
from .state import (
    atomic_write_json,
    recover_directory,
    replace_directory,
    temporary_directory_for,
    temporary_path_for,
)

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.json"
BEST_DIR = "best"
LAST_DIR = "last"
SNAPSHOT_DIR = "snapshots"
POLY_POWER = 0.9
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
REFERENCE_BATCH_SIZE = 16


@dataclass
class StageHyperParameters:
    """The per-stage recipe.

    Attributes:
        epochs: epochs ``E`` of the stage.
        global_batch_size: images per optimizer step over all processes and accumulation steps.
        base_lr: lr for a global batch of 16; scaled linearly with the global batch.
        val_batch_size: images per evaluation forward pass (same-size images only are stacked).
        num_workers: DataLoader workers for training (the batches do not depend on it).
        seed: run seed; each stage derives its own seeds from it so a resume replays them.
        sliding_window: ``(window, stride)`` for sliding-window evaluation of large images, or ``None``.
        channels_last: run the convolutions in channels_last memory format (same math, faster kernels).
        sync_batchnorm: convert BatchNorm to SyncBatchNorm when running on several CUDA GPUs
            (ignored elsewhere: SyncBatchNorm needs CUDA).
    """

    epochs: int
    global_batch_size: int
    base_lr: float
    val_batch_size: int = 1
    num_workers: int = 0
    seed: int = 0
    sliding_window: tuple[int, int] | None = None
    channels_last: bool = True
    sync_batchnorm: bool = False


def scaled_lr(base_lr: float, global_batch_size: int) -> float:
    """``base_lr / 16 * global_batch_size``: the peak lr of the backbone group."""
    return base_lr / REFERENCE_BATCH_SIZE * global_batch_size


def steps_per_epoch(num_items: int, global_batch_size: int) -> int:
    """Optimizer steps of one epoch over ``num_items`` training items (drop_last)."""
    return num_items // global_batch_size


def poly_factor(step: int, total_steps: int) -> float:
    """``(1 - step / total)^0.9``: the factor of the lr used for optimizer step ``step`` (0-based)."""
    return (1.0 - step / total_steps) ** POLY_POWER


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int) -> float:
    """Set every group's lr to its ``initial_lr`` times :func:`poly_factor`; returns the backbone lr."""
    factor = poly_factor(step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def build_optimizer(model: torch.nn.Module, lr: float, fused: bool = True) -> torch.optim.SGD:
    """SGD (momentum 0.9, wd 1e-4) over ``model.optimizer_param_groups(lr)`` (backbone lr, head x10).

    ``fused`` uses the single-kernel SGD update (same update rule; about 3x faster than the
    per-parameter loop on CPU for a ResNet-18 DeepLabV3+).
    """
    groups = model.optimizer_param_groups(lr)
    for group in groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=fused)


def _batch_tensors(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["pixel_values"], batch["labels"]
    return batch[0], batch[1]


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module, images: torch.Tensor, sliding_window: tuple[int, int] | None
) -> torch.Tensor:
    """Logits ``[B, C, H, W]`` for ``images`` ``[B, 3, H, W]``, whole image or sliding window."""
    if sliding_window is not None:
        window, stride = sliding_window
        return model.predict_sliding_window(images, window=window, stride=stride)
    return model(pixel_values=images).logits


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Sequence,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    accelerator=None,
    batch_size: int = 1,
    sliding_window: tuple[int, int] | None = None,
) -> dict:
    """Val mIoU over ``dataset[i] = (image [3,H,W], mask [H,W])``, each process on its own shard.

    Returns :meth:`SegmentationMetric.compute`'s dictionary (identical on every process).
    """
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    rank, world = rank_and_world_size(accelerator)
    metric = SegmentationMetric(num_classes, class_names)
    folded = None  # an inference copy: the model under training keeps its mode and memory layout
    for _, images, masks in same_size_batches(dataset, shard_indices(len(dataset), rank, world), batch_size):
        if folded is None:
            folded = inference_model(model, device, images[:1])
        with autocast(accelerator):
            logits = predict_logits(folded, to_device_images(images, device), sliding_window)
        metric.update(logits.argmax(dim=1).cpu(), masks)
    return metric.compute(accelerator)


def _save_model_dir(model: torch.nn.Module, path: Path, image_processor=None) -> None:
    """``save_pretrained`` (safetensors) into a temporary sibling, then swap it in."""
    temporary = temporary_directory_for(path)
    model.save_pretrained(temporary, safe_serialization=True)
    if image_processor is not None:
        image_processor.save_pretrained(temporary)
    replace_directory(temporary, path)


def train_stage(
    model_factory: Callable[[], torch.nn.Module],
    train_dataset,
    val_dataset: Sequence,
    accelerator,
    stage_dir: str | os.PathLike,
    hparams: StageHyperParameters,
    stage_seed: int,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    snapshot_epochs: Sequence[int] = (),
    keep_last: bool = False,
    image_processor=None,
    log_prefix: str = "train",
    inputs: dict[str, str] | None = None,
) -> dict:
    """Train one stage and return its summary (best epoch and val metrics, mIoU history).

    ``train_dataset`` items are :class:`~stpp_hf.data.TrainTransform`'s ``(pixels [3, H, W] uint8,
    labels [H, W] uint8 or int64)``; ``val_dataset`` items are ``EvalTransform``'s (float32, int64).

    Writes into ``stage_dir``: ``best/`` (best-val ``save_pretrained``), ``snapshots/epoch_<e>/`` for
    ``snapshot_epochs`` (1-based), ``last/`` if ``keep_last``, and ``checkpoint/`` (``save_state`` +
    ``trainer_state.json``) after every epoch, from which a relaunch continues if it was written for
    the same ``inputs`` (fingerprints of what the stage reads; a checkpoint of other inputs is discarded).
    """
    stage_dir = Path(stage_dir)
    checkpoint_dir = stage_dir / CHECKPOINT_DIR
    if accelerator.is_main_process:
        stage_dir.mkdir(parents=True, exist_ok=True)
        for directory in (checkpoint_dir, stage_dir / BEST_DIR, stage_dir / LAST_DIR):
            recover_directory(directory)
    accelerator.wait_for_everyone()

    set_seed(stage_seed)  # same fresh init on every process and on every relaunch
    model = model_factory()
    if (
        hparams.sync_batchnorm
        and accelerator.distributed_type == DistributedType.MULTI_GPU
        and accelerator.device.type == "cuda"
    ):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if hparams.channels_last:
        model = model.to(memory_format=torch.channels_last)
    accumulation = accelerator.gradient_accumulation_steps
    per_device = per_device_batch_size(hparams.global_batch_size, accelerator.num_processes, accumulation)
    epoch_steps = steps_per_epoch(len(train_dataset), hparams.global_batch_size)
    if epoch_steps == 0:
        raise ValueError(
            f"the training set of {stage_dir.name} has {len(train_dataset)} images, fewer than one global batch "
            f"({hparams.global_batch_size}): lower --global_batch_size"
        )
    lr = scaled_lr(hparams.base_lr, hparams.global_batch_size)
    optimizer = build_optimizer(model, lr)
    loader = training_loader(train_dataset, hparams.global_batch_size, per_device, hparams.num_workers)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    assert len(loader) == epoch_steps * accumulation, (len(loader), epoch_steps, accumulation)
    total_steps = epoch_steps * hparams.epochs

    start_epoch, best_miou, best_epoch, history = 0, -1.0, -1, []
    best_metrics: dict = {}
    saved = _read_trainer_state(checkpoint_dir)
    if saved is not None and saved.get("inputs", {}) != (inputs or {}):
        logger.warning(
            "%s: the epoch checkpoint was written for other inputs: training from the start", stage_dir.name
        )
        saved = None
    if saved is not None:
        try:
            accelerator.load_state(str(checkpoint_dir))
        except Exception as error:  # safetensors / torch raise many types for a torn file
            raise ValueError(
                f"cannot load the epoch checkpoint {checkpoint_dir} ({type(error).__name__}: {error}); "
                f"{_restart_stage_advice(checkpoint_dir)}"
            ) from error
        start_epoch, best_miou, best_epoch = saved["epoch"], saved["best_miou"], saved["best_epoch"]
        history, best_metrics = saved["history"], saved["best_metrics"]
        logger.info("%s: resuming after epoch %d (best mIoU %.4f)", stage_dir.name, start_epoch, best_miou)

    step = start_epoch * epoch_steps
    progress = _progress(accelerator, total=total_steps, initial=step, desc=stage_dir.name)
    for epoch in range(start_epoch, hparams.epochs):
        # Seeds derived from (stage, epoch) make a resumed epoch replay the interrupted one exactly.
        epoch_seed = (stage_seed * 1000 + epoch) % 2**31
        set_seed(epoch_seed, device_specific=True)
        loader.set_epoch(epoch_seed)
        model.train()
        running_loss, step_loss = (
            torch.zeros((), device=accelerator.device),
            torch.zeros((), device=accelerator.device),
        )
        for batch in loader:
            pixels, labels = _batch_tensors(batch)
            # training items are uint8 (a quarter of the bytes through the loader); normalise on the device
            images, labels = normalize_batch(pixels), labels.long()
            if hparams.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                current_lr = set_poly_lr(optimizer, step, total_steps)
                loss = model(pixel_values=images, labels=labels).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach()
            if accelerator.sync_gradients:
                # the loss of the global batch: mean over its micro-batches and processes
                global_loss = accelerator.reduce(step_loss / accumulation, reduction="mean").item()
                running_loss += global_loss
                step_loss.zero_()
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{global_loss:.3f}", lr=f"{current_lr:.2e}", refresh=False)
                accelerator.log({f"{log_prefix}/loss": global_loss, f"{log_prefix}/lr": current_lr}, step=step)

        unwrapped = accelerator.unwrap_model(model)
        # DDP copies BatchNorm running stats from the main process only at the start of a forward, so
        # after the last step each process holds its own; evaluate the ones the main process saves.
        broadcast(list(unwrapped.buffers()), from_process=0)
        metrics = evaluate(
            unwrapped,
            val_dataset,
            num_classes,
            class_names,
            accelerator,
            hparams.val_batch_size,
            hparams.sliding_window,
        )
        history.append({"epoch": epoch + 1, "loss": running_loss.item() / epoch_steps, "val_miou": metrics["miou"]})
        accelerator.log(
            {f"{log_prefix}/val_miou": metrics["miou"], f"{log_prefix}/epoch_loss": history[-1]["loss"]}, step=step
        )
        accelerator.print(
            f"[{stage_dir.name}] epoch {epoch + 1}/{hparams.epochs} loss {history[-1]['loss']:.4f} "
            f"val mIoU {100 * metrics['miou']:.2f} (best {100 * max(best_miou, metrics['miou']):.2f})\n"
            f"    {format_per_class_iou(metrics['per_class_iou'])}"
        )
        improved = metrics["miou"] > best_miou
        if improved:
            best_miou, best_epoch, best_metrics = metrics["miou"], epoch + 1, metrics
        if accelerator.is_main_process:
            if improved:
                _save_model_dir(unwrapped, stage_dir / BEST_DIR, image_processor)
            if epoch + 1 in snapshot_epochs:
                _save_model_dir(unwrapped, stage_dir / SNAPSHOT_DIR / f"epoch_{epoch + 1}")
            if keep_last and epoch + 1 == hparams.epochs:
                _save_model_dir(unwrapped, stage_dir / LAST_DIR, image_processor)
        _save_checkpoint(
            accelerator,
            checkpoint_dir,
            {
                "epoch": epoch + 1,
                "best_miou": best_miou,
                "best_epoch": best_epoch,
                "history": history,
                "best_metrics": best_metrics,
                "inputs": inputs or {},
            },
        )
    progress.close()
    accelerator.free_memory()
    return {
        "val_miou": best_miou,
        "best_epoch": best_epoch,
        "per_class_iou": best_metrics.get("per_class_iou", {}),
        "pixel_accuracy": best_metrics.get("pixel_accuracy"),
        "history": history,
        "lr": lr,
        "steps": total_steps,
    }


def _restart_stage_advice(checkpoint_dir: Path) -> str:
    return (
        f"delete {checkpoint_dir} to restart stage {checkpoint_dir.parent.name} from its first epoch "
        "(finished stages are kept)"
    )


TRAINER_STATE_FIELDS = {
    "epoch": int,
    "best_miou": (int, float),
    "best_epoch": int,
    "history": list,
    "best_metrics": dict,
}


def _read_trainer_state(checkpoint_dir: Path) -> dict | None:
    """``checkpoint_dir/trainer_state.json`` (``None`` without one); a torn or malformed one is an error
    that names it and says how to restart only this stage."""
    path = checkpoint_dir / TRAINER_STATE
    if not path.is_file():
        return None
    advice = _restart_stage_advice(checkpoint_dir)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {advice}") from error
    wrong = [
        key
        for key, kind in TRAINER_STATE_FIELDS.items()
        if not isinstance(saved, dict) or not isinstance(saved.get(key), kind)
    ]
    if wrong:
        raise ValueError(f"{path} lacks or has malformed fields {wrong}; {advice}")
    return saved


def _save_checkpoint(accelerator, checkpoint_dir: Path, trainer_state: dict) -> None:
    """``accelerator.save_state`` + ``trainer_state.json`` into a temporary dir, swapped in atomically."""
    # Every process writes its RNG state into the same directory: the main process creates it.
    if accelerator.is_main_process:
        temporary_directory_for(checkpoint_dir)
    accelerator.wait_for_everyone()
    temporary = temporary_path_for(checkpoint_dir)
    accelerator.save_state(str(temporary), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(temporary / TRAINER_STATE, trainer_state)
        replace_directory(temporary, checkpoint_dir)
    accelerator.wait_for_everyone()


def _progress(accelerator, **kwargs):
    return progress_bar(disable=not accelerator.is_local_main_process, dynamic_ncols=True, **kwargs)
