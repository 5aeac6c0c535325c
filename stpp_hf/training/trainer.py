"""One training stage (docs/method.md §2) on Accelerate: fresh model, SGD, poly lr, val every epoch.

Everything device-, precision- and process-related goes through the ``Accelerator``: the model,
optimizer and train DataLoader are prepared (DDP, autocast, sharding), gradient accumulation uses
``accelerator.accumulate``, checkpoints use ``save_state`` / ``load_state``. The poly schedule is
computed from the optimizer-step counter (not a prepared scheduler, which would step once per
process), so it is the same whatever the number of processes or accumulation steps.

The recipe is stated as a global batch: the per-device batch is ``global / (processes x accumulation)``,
the lr ``--lr / 16 * global`` (the resolved :class:`~stpp_hf.training.config.RunConfig`'s ``derived.scaled_lr``)
and the steps per epoch ``len(train set) // global``, so one process with global batch B and N processes with
global batch B take the same steps with the same lr on the same images (:mod:`~stpp_hf.training.sampling`).
BatchNorm sees the per-device batch unless SyncBatchNorm is on.

:func:`train_stage` reads top to bottom: set up (fresh model, optimizer and loader, prepared), resume from the
epoch checkpoint, then per epoch train, validate (:mod:`~stpp_hf.training.evaluation`), save the models and the
checkpoint. What the steps share and update is one ``_StageRun``.

A loss or weights that are not finite stop the stage with a :class:`~stpp_hf.training.divergence.NonFiniteError`
before anything is saved. A stop signal (:mod:`~stpp_hf.training.preemption`) is honoured at the next optimizer
step: a step checkpoint (the same directory, with the position in the epoch) is saved, and a relaunch skips the
global batches already trained, so it ends as the uninterrupted stage would; ``save_steps`` saves one periodically.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast, set_seed
from timm.layers import convert_sync_batchnorm  # torch's converter drops the activation of timm's BatchNormAct2d

from ..data.normalization import normalize_batch
from ..disk_full import disk_full_errors, tensor_bytes
from ..file_io import (
    recover_directory,
    replace_directory,
    temporary_directory_for,
    temporary_path_for,
)
from ..log import get_logger
from ..metrics import format_per_class_iou
from ..progress import progress_bar
from .backends import cudnn_benchmark
from .config import RunConfig
from .divergence import DIVERGENCE_ADVICE, NonFiniteError, describe_nonfinite, nonfinite_tensors
from .evaluation import evaluate
from .inference import pins_memory
from .preemption import Preempted, agreed_stop_signal, signal_name, stop_at_step_boundaries
from .recipe import MOMENTUM, WEIGHT_DECAY, per_device_batch_size, poly_factor, steps_per_epoch
from .run_layout import StageLayout
from .sampling import training_loader
from .state import EpochInProgress, TrainerState

logger = get_logger(__name__)

TRAINER_STATE = "trainer_state.json"


# optimizer steps between two read-backs of the training loss (each a host sync); the last interval of an epoch
# ends with the epoch
LOGGING_STEPS = 10


def set_poly_lr(optimizer: torch.optim.Optimizer, step: int, total_steps: int) -> float:
    """Set every group's lr to its ``initial_lr`` times :func:`poly_factor`; returns the backbone lr."""
    factor = poly_factor(step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]


def build_optimizer(model: torch.nn.Module, lr: float, fused: bool = True) -> torch.optim.SGD:
    """SGD (momentum 0.9, wd 1e-4) over ``model.optimizer_param_groups(lr)`` (backbone lr, head x10).

    ``fused`` uses the single-kernel SGD update (the same update rule as the per-parameter loop, fewer kernels).
    The momentum buffers start at zero (in each parameter's memory layout) instead of at the first step: fused SGD
    allocates them uninitialised and, when a GradScaler skips that step for inf / nan gradients, returns before
    writing them, so the next step would add that memory to the weights. From zero the first step's buffer is the
    gradient itself, as the lazy start makes it.
    """
    groups = model.optimizer_param_groups(lr)
    for group in groups:
        group["initial_lr"] = group["lr"]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=fused)
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    return optimizer


def fresh_grad_scaler(accelerator: Accelerator) -> None:
    """Give ``accelerator`` (fp16) a new GradScaler of the same kind, so a stage starts from the initial loss scale
    and not from where the previous stage's scaler ended; the stage's checkpoint then saves and restores its own."""
    if accelerator.scaler is None:
        return
    handler = accelerator.scaler_handler
    kwargs = handler.to_kwargs() if handler is not None else {}
    accelerator.scaler = type(accelerator.scaler)(accelerator.device.type, **kwargs)


def _batch_tensors(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["pixel_values"], batch["labels"]
    return batch[0], batch[1]


def _save_model_dir(model: torch.nn.Module, path: Path, image_processor=None) -> None:
    """``save_pretrained`` (safetensors) into a temporary sibling, then swap it in."""
    temporary = temporary_directory_for(path)
    with disk_full_errors(path, tensor_bytes(model.state_dict()), partial=temporary):
        model.save_pretrained(temporary, safe_serialization=True)
        if image_processor is not None:
            image_processor.save_pretrained(temporary)
    replace_directory(temporary, path)


@dataclass
class _StageRun:
    """One stage in progress: the prepared training objects, where it writes, and what it has done so far.

    ``epoch`` counts finished epochs and ``step`` optimizer steps; ``history``, ``best_*`` and ``epoch`` are
    what ``trainer_state.json`` saves, so a resumed stage continues with the state the killed one had.
    ``resumed_epoch`` is the ``epoch_in_progress`` of a step checkpoint until the epoch it interrupted continues.
    """

    accelerator: Accelerator
    config: RunConfig
    stage_dir: Path
    stage_seed: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader
    lr: float
    epoch_steps: int
    logging_steps: int = LOGGING_STEPS
    inputs: dict[str, str] = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    best_miou: float = -1.0
    best_epoch: int = -1
    best_metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    resumed_epoch: EpochInProgress | None = None

    @property
    def layout(self) -> StageLayout:
        return StageLayout(self.stage_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.layout.checkpoint

    @property
    def total_steps(self) -> int:
        return self.epoch_steps * self.config.run.epochs

    @property
    def epoch_step(self) -> int:
        """Optimizer steps done in the epoch in progress."""
        return self.step - self.epoch * self.epoch_steps

    def trainer_state(self, epoch_in_progress: EpochInProgress | None = None) -> TrainerState:
        """The ``trainer_state.json`` of the finished epochs, and for a step checkpoint the ``epoch_in_progress``."""
        return TrainerState(
            epoch=self.epoch,
            best_miou=self.best_miou,
            best_epoch=self.best_epoch,
            history=self.history,
            best_metrics=self.best_metrics,
            inputs=self.inputs,
            epoch_in_progress=epoch_in_progress,
        )

    def record_epoch(self, loss: float, metrics: dict) -> bool:
        """Count the epoch just trained and validated; returns whether its val mIoU is the best so far."""
        self.epoch += 1
        self.history.append({"epoch": self.epoch, "loss": loss, "val_miou": metrics["miou"]})
        improved = metrics["miou"] > self.best_miou
        if improved:
            self.best_miou, self.best_epoch, self.best_metrics = metrics["miou"], self.epoch, metrics
        return improved

    def summary(self) -> dict:
        return {
            "val_miou": self.best_miou,
            "best_epoch": self.best_epoch,
            "per_class_iou": self.best_metrics.get("per_class_iou", {}),
            "pixel_accuracy": self.best_metrics.get("pixel_accuracy"),
            "confusion_matrix": self.best_metrics.get("confusion_matrix"),  # None from a run before it was kept
            "history": self.history,
            "lr": self.lr,
            "steps": self.total_steps,
        }


def train_stage(
    model_factory: Callable[[], torch.nn.Module],
    train_dataset,
    val_dataset: Sequence,
    accelerator: Accelerator,
    stage_dir: str | os.PathLike,
    config: RunConfig,
    stage_seed: int,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    snapshot_epochs: Sequence[int] = (),
    keep_last: bool = False,
    image_processor=None,
    log_prefix: str = "train",
    inputs: dict[str, str] | None = None,
    logging_steps: int = LOGGING_STEPS,
) -> dict:
    """Train one stage, or continue it from its last epoch checkpoint, and return its summary.

    Writes into ``stage_dir``: ``best/`` (best-val ``save_pretrained``), ``snapshots/epoch_<e>/`` for
    ``snapshot_epochs``, ``last/`` if ``keep_last``, and ``checkpoint/`` (``save_state`` + ``trainer_state.json``)
    after every epoch, from which a relaunch continues if it was written for the same ``inputs``.

    Args:
        model_factory: builds the stage's fresh model (called once, after seeding with ``stage_seed``).
        train_dataset: items ``(pixels [3, H, W] uint8, labels [H, W] uint8 or int64)`` as ``TrainTransform``
            makes them.
        val_dataset: items ``(pixel_values [3, H, W] float32, labels [H, W] int64)`` as ``EvalTransform`` makes them.
        accelerator: the run's ``Accelerator`` (processes, gradient accumulation, mixed precision, trackers).
        stage_dir: the stage's directory.
        config: the run's resolved options: epochs, global batch, lr, batch sizes, workers, evaluation window,
            memory format, checkpointing, SyncBatchNorm, step checkpoints (``run.*``, ``data.num_workers``,
            ``derived.scaled_lr``).
        stage_seed: seed of the model's initialisation; the epochs' seeds derive from it.
        num_classes: classes of the val metric.
        class_names: names of the classes in the printed and returned per-class IoU.
        snapshot_epochs: 1-based epochs whose weights are kept (ST++ selection).
        keep_last: keep the last epoch's weights in ``last/``.
        image_processor: saved next to ``best/`` and ``last/``.
        log_prefix: prefix of the tracker's metric names (``<prefix>/loss``, ``<prefix>/lr``, ``<prefix>/val_miou``).
        inputs: fingerprints of what the stage reads; a checkpoint written for other inputs is discarded.
        logging_steps: optimizer steps between two read-backs of the training loss.

    Returns:
        ``{"val_miou", "best_epoch", "per_class_iou", "pixel_accuracy", "history", "lr", "steps"}``: the best
        epoch's val metrics, ``[{"epoch", "loss", "val_miou"}]`` per epoch, the peak lr and the optimizer steps.
    """
    run = _setup_stage(model_factory, train_dataset, accelerator, Path(stage_dir), config, stage_seed)
    run.inputs, run.logging_steps = inputs or {}, logging_steps
    _resume_stage(run)
    progress = _progress(accelerator, total=run.total_steps, initial=run.step, desc=run.stage_dir.name)
    with stop_at_step_boundaries():
        while run.epoch < config.run.epochs:
            with cudnn_benchmark(True):  # fixed-size crops: cuDNN's fastest algorithms, timed once; evaluation: off
                loss = _train_epoch(run, progress, log_prefix)
            unwrapped = accelerator.unwrap_model(run.model)
            metrics = _validate(run, unwrapped, val_dataset, num_classes, class_names)
            # after _validate's broadcast of the BatchNorm buffers: every process checks what the main one saves
            _check_finite_weights(run, unwrapped)
            improved = run.record_epoch(loss, metrics)
            _report_epoch(run, metrics, log_prefix)
            if accelerator.is_main_process:
                _save_models(run, unwrapped, improved, snapshot_epochs, keep_last, image_processor)
            _save_checkpoint(accelerator, run.checkpoint_dir, run.trainer_state())
            stop_signal = agreed_stop_signal(accelerator.num_processes)
            if stop_signal:
                raise Preempted(_stopped_message(run, stop_signal))
    progress.close()
    accelerator.free_memory()
    return run.summary()


def _setup_stage(
    model_factory: Callable[[], torch.nn.Module],
    train_dataset,
    accelerator: Accelerator,
    stage_dir: Path,
    config: RunConfig,
    stage_seed: int,
) -> _StageRun:
    """Recover the stage's directories from a kill mid-swap, then build and prepare model, optimizer and loader."""
    if accelerator.is_main_process:
        stage_dir.mkdir(parents=True, exist_ok=True)
        layout = StageLayout(stage_dir)
        for directory in (layout.checkpoint, layout.best, layout.last):
            recover_directory(directory)
    accelerator.wait_for_everyone()

    set_seed(stage_seed)  # same fresh init on every process and on every relaunch
    model = model_factory()
    run_options = config.run
    if run_options.activation_checkpointing:
        model.activation_checkpointing_enable()
    if (
        run_options.sync_bn
        and accelerator.distributed_type == DistributedType.MULTI_GPU
        and accelerator.device.type == "cuda"
    ):
        model = convert_sync_batchnorm(model)
    if run_options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    global_batch, accumulation = run_options.global_batch_size, accelerator.gradient_accumulation_steps
    per_device = per_device_batch_size(global_batch, accelerator.num_processes, accumulation)
    epoch_steps = steps_per_epoch(len(train_dataset), global_batch)
    if epoch_steps == 0:
        raise ValueError(
            f"the training set of {stage_dir.name} has {len(train_dataset)} images, fewer than one global batch "
            f"({global_batch}): lower --global_batch_size"
        )
    lr = config.derived.scaled_lr
    optimizer = build_optimizer(model, lr)
    fresh_grad_scaler(accelerator)  # before prepare: the prepared optimizer steps through it
    pin_memory = pins_memory(accelerator.device)
    loader = training_loader(train_dataset, global_batch, per_device, config.data.num_workers, pin_memory)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    assert len(loader) == epoch_steps * accumulation, (len(loader), epoch_steps, accumulation)
    return _StageRun(accelerator, config, stage_dir, stage_seed, model, optimizer, loader, lr, epoch_steps)


def _resume_stage(run: _StageRun) -> None:
    """Load the stage's checkpoint into ``run`` if there is one written for ``run.inputs``."""
    saved = _read_trainer_state(run.checkpoint_dir)
    if saved is None:
        return
    if saved.inputs != run.inputs:
        logger.warning(
            "%s: the epoch checkpoint was written for other inputs: training from the start", run.stage_dir.name
        )
        return
    try:
        run.accelerator.load_state(str(run.checkpoint_dir))
    except Exception as error:  # safetensors / torch raise many types for a torn file
        raise ValueError(
            f"cannot load the epoch checkpoint {run.checkpoint_dir} ({type(error).__name__}: {error}); "
            f"{_restart_stage_advice(run.checkpoint_dir)}"
        ) from error
    run.epoch, run.best_miou, run.best_epoch = saved.epoch, saved.best_miou, saved.best_epoch
    run.history, run.best_metrics = saved.history, saved.best_metrics
    run.step = run.epoch * run.epoch_steps
    run.resumed_epoch = saved.epoch_in_progress
    if run.resumed_epoch is not None:
        run.step += run.resumed_epoch.epoch_step
        logger.info(
            "%s: resuming epoch %d after step %d of %d (best mIoU %.4f)",
            run.stage_dir.name, run.epoch + 1, run.epoch_step, run.epoch_steps, run.best_miou,
        )  # fmt: skip
        return
    logger.info("%s: resuming after epoch %d (best mIoU %.4f)", run.stage_dir.name, run.epoch, run.best_miou)


def _train_epoch(run: _StageRun, progress, log_prefix: str) -> float:
    """Train epoch ``run.epoch`` (0-based); returns its mean global-batch loss.

    The loss stays on the device and is read back once per ``logging_steps`` optimizer steps and at the end of
    the epoch: the tracker gets ``<prefix>/loss``, the mean global-batch loss of the steps since the last read,
    and a loss that is not finite raises :class:`NonFiniteError`. An epoch resumed from a step checkpoint skips
    the global batches it trained and continues with the accumulators and generator states the checkpoint saved.
    After each optimizer step, a stop signal or ``save_steps`` saves a step checkpoint (a signal then raises
    :class:`Preempted`).
    """
    accelerator, run_options = run.accelerator, run.config.run
    accumulation = accelerator.gradient_accumulation_steps
    # Seeds derived from (stage, epoch) make a resumed epoch replay the interrupted one exactly.
    epoch_seed = (run.stage_seed * 1000 + run.epoch) % 2**31
    run.loader.set_epoch(epoch_seed)
    resumed, run.resumed_epoch = run.resumed_epoch, None
    loss_sum = torch.zeros((), device=accelerator.device)  # this process's micro-batch losses since the last read
    if resumed is None:
        set_seed(epoch_seed, device_specific=True)
        batches, interval_steps, epoch_loss_sum = run.loader, 0, 0.0
    else:  # the generators are those the step checkpoint saved
        batches = _resumed_batches(accelerator.skip_first_batches(run.loader, resumed.epoch_step * accumulation))
        loss_sums = resumed.loss_sums
        if len(loss_sums) == accelerator.num_processes:
            loss_sum += loss_sums[accelerator.process_index]
        elif accelerator.is_main_process:  # another process count: the interval's loss sum as a whole
            loss_sum += sum(loss_sums)
        interval_steps, epoch_loss_sum = resumed.interval_steps, resumed.epoch_loss_sum
    first_nonfinite_step = torch.full((), -1, device=accelerator.device)  # on the device: no sync per step
    run.model.train()
    for batch in batches:
        pixels, labels = _batch_tensors(batch)
        # training items are uint8 (a quarter of the bytes through the loader); normalise on the device
        images, labels = normalize_batch(pixels), labels.long()
        if run_options.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(run.model):
            current_lr = set_poly_lr(run.optimizer, run.step, run.total_steps)
            loss = run.model(pixel_values=images, labels=labels).loss
            accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        loss_sum += loss
        first_nonfinite_step = torch.where(
            torch.isfinite(loss) | (first_nonfinite_step >= 0), first_nonfinite_step, run.step
        )
        if not accelerator.sync_gradients:
            continue
        run.step += 1
        interval_steps += 1
        progress.update(1)
        if interval_steps == run.logging_steps or run.step % run.epoch_steps == 0:
            # the mean over the interval's global batches, each the mean of its micro-batches and processes
            interval_loss = accelerator.reduce(loss_sum / (accumulation * interval_steps), reduction="mean").item()
            if not math.isfinite(interval_loss):  # the same on every process: all raise
                raise _diverged(run, _nonfinite_steps(run, first_nonfinite_step), f"the loss is {interval_loss}")
            epoch_loss_sum += interval_loss * interval_steps
            progress.set_postfix(loss=f"{interval_loss:.3f}", lr=f"{current_lr:.2e}", refresh=False)
            accelerator.log({f"{log_prefix}/loss": interval_loss, f"{log_prefix}/lr": current_lr}, step=run.step)
            loss_sum.zero_()
            interval_steps = 0
        stop_signal = agreed_stop_signal(accelerator.num_processes)
        save_steps = run_options.save_steps
        periodic = save_steps and run.step % save_steps == 0 and run.epoch_step < run.epoch_steps
        if stop_signal or periodic:
            nonfinite_steps = _nonfinite_steps(run, first_nonfinite_step)  # losses since the last read-back
            if nonfinite_steps:
                raise _diverged(run, nonfinite_steps, "the loss is not finite")
            _check_finite_weights(run, accelerator.unwrap_model(run.model))
            epoch_in_progress = EpochInProgress(
                epoch_step=run.epoch_step,
                interval_steps=interval_steps,
                loss_sums=accelerator.gather(loss_sum[None]).tolist(),
                epoch_loss_sum=epoch_loss_sum,
            )
            _save_checkpoint(accelerator, run.checkpoint_dir, run.trainer_state(epoch_in_progress))
        if stop_signal:
            raise Preempted(_stopped_message(run, stop_signal))
    return epoch_loss_sum / run.epoch_steps


def _resumed_batches(loader):
    """``loader``'s batches with the process's CPU generator left as it was: starting a DataLoader iterator draws
    from it, which the interrupted epoch did at its start and the step checkpoint's generator state includes."""
    generator_state = torch.get_rng_state()
    batches = iter(loader)
    first = next(batches, None)  # the DataLoader's iterator starts here
    torch.set_rng_state(generator_state)
    if first is not None:
        yield first
        yield from batches


def _nonfinite_steps(run: _StageRun, first_nonfinite_step: torch.Tensor) -> list[int]:
    """The first step (0-based) of each process whose loss was not finite, for those that had one (a collective:
    every process gets the same list)."""
    return [step for step in run.accelerator.gather(first_nonfinite_step[None]).tolist() if step >= 0]


def _diverged(run: _StageRun, steps: list[int], problem: str) -> NonFiniteError:
    """The error of a non-finite loss first seen at ``steps``: the stage, epoch and step, what is kept, what to try."""
    if steps:
        step = min(steps) + 1
        where = f"step {step - run.epoch * run.epoch_steps} of {run.epoch_steps} (stage step {step})"
    else:
        where = f"one of the steps up to {run.epoch_step} of {run.epoch_steps}"
    return NonFiniteError(
        f"[{run.stage_dir.name}] training diverged: {problem} at epoch {run.epoch + 1}, {where}. "
        f"{_kept_checkpoint(run)}; {DIVERGENCE_ADVICE}"
    )


def _check_finite_weights(run: _StageRun, unwrapped: torch.nn.Module) -> None:
    """Raise :class:`NonFiniteError` on every process before a save when a parameter or buffer of any process is
    not finite (BatchNorm buffers differ between processes inside an epoch)."""
    state = unwrapped.state_dict()
    bad = nonfinite_tensors(state)
    counts = run.accelerator.gather(torch.tensor([len(bad)], device=run.accelerator.device))
    if counts.any():
        bad = bad or ["those of another process"]
        raise NonFiniteError(
            f"[{run.stage_dir.name}] training diverged: the weights after epoch {run.epoch + 1}, step "
            f"{run.epoch_step} of {run.epoch_steps} hold non-finite values in {describe_nonfinite(bad, len(state))}. "
            f"{_kept_checkpoint(run)}; {DIVERGENCE_ADVICE}"
        )


def _kept_checkpoint(run: _StageRun) -> str:
    if (run.checkpoint_dir / TRAINER_STATE).is_file():
        return f"Nothing of this epoch was saved: the last good checkpoint {run.checkpoint_dir} is kept"
    return "Nothing of this stage was saved"


def _stopped_message(run: _StageRun, stop_signal: int) -> str:
    """The line a stopped stage prints: what stopped it, where, what was saved."""
    return (
        f"[{run.stage_dir.name}] stopped by {signal_name(stop_signal)} after epoch {run.epoch + 1} step "
        f"{run.epoch_step} of {run.epoch_steps}; checkpoint saved in {run.checkpoint_dir}"
    )


def _validate(
    run: _StageRun,
    unwrapped: torch.nn.Module,
    val_dataset: Sequence,
    num_classes: int,
    class_names: Sequence[str] | None,
) -> dict:
    """The val metrics of the weights the main process saves (:func:`~stpp_hf.training.evaluation.evaluate`)."""
    # DDP copies BatchNorm running stats from the main process only at the start of a forward, so
    # after the last step each process holds its own; evaluate the ones the main process saves.
    broadcast(list(unwrapped.buffers()), from_process=0)
    config = run.config
    return evaluate(
        unwrapped,
        val_dataset,
        num_classes,
        class_names,
        run.accelerator,
        config.run.val_batch_size,
        config.sliding_window_stride,
        config.data.num_workers,
    )


def _report_epoch(run: _StageRun, metrics: dict, log_prefix: str) -> None:
    """The epoch's val mIoU and loss to the trackers and, with the per-class IoU, to the console."""
    loss = run.history[-1]["loss"]
    run.accelerator.log({f"{log_prefix}/val_miou": metrics["miou"], f"{log_prefix}/epoch_loss": loss}, step=run.step)
    run.accelerator.print(
        f"[{run.stage_dir.name}] epoch {run.epoch}/{run.config.run.epochs} loss {loss:.4f} "
        f"val mIoU {100 * metrics['miou']:.2f} (best {100 * run.best_miou:.2f})\n"
        f"    {format_per_class_iou(metrics['per_class_iou'])}"
    )


def _save_models(
    run: _StageRun,
    unwrapped: torch.nn.Module,
    improved: bool,
    snapshot_epochs: Sequence[int],
    keep_last: bool,
    image_processor,
) -> None:
    """The ``save_pretrained`` directories of the epoch just finished: ``best/``, its snapshot, ``last/``."""
    if improved:
        _save_model_dir(unwrapped, run.layout.best, image_processor)
    if run.epoch in snapshot_epochs:
        _save_model_dir(unwrapped, run.layout.snapshot(run.epoch))
    if keep_last and run.epoch == run.config.run.epochs:
        _save_model_dir(unwrapped, run.layout.last, image_processor)


def _restart_stage_advice(checkpoint_dir: Path) -> str:
    return (
        f"delete {checkpoint_dir} to restart stage {checkpoint_dir.parent.name} from its first epoch "
        "(finished stages are kept)"
    )


def _read_trainer_state(checkpoint_dir: Path) -> TrainerState | None:
    """``checkpoint_dir/trainer_state.json`` (``None`` without one); a torn or malformed one is an error
    that names it and says how to restart only this stage."""
    path = checkpoint_dir / TRAINER_STATE
    return TrainerState.read(path, _restart_stage_advice(checkpoint_dir)) if path.is_file() else None


def _save_checkpoint(accelerator, checkpoint_dir: Path, trainer_state: TrainerState) -> None:
    """``accelerator.save_state`` + ``trainer_state.json`` into a temporary dir, swapped in atomically."""
    # Every process writes its RNG state into the same directory: the main process creates it.
    if accelerator.is_main_process:
        temporary_directory_for(checkpoint_dir)
    accelerator.wait_for_everyone()
    temporary = temporary_path_for(checkpoint_dir)
    with disk_full_errors(checkpoint_dir, partial=temporary):
        accelerator.save_state(str(temporary), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trainer_state.write(temporary / TRAINER_STATE)
        replace_directory(temporary, checkpoint_dir)
    accelerator.wait_for_everyone()


def _progress(accelerator, **kwargs):
    return progress_bar(disable=not accelerator.is_local_main_process, dynamic_ncols=True, **kwargs)
