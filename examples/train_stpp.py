#!/usr/bin/env python
"""Train SupOnly / ST / ST++ (Yang et al., CVPR 2022) end to end with Accelerate.

    accelerate launch examples/train_stpp.py --output_dir runs/demo          # synthetic data, ST++
    accelerate launch examples/train_stpp.py --dataset pascal --data_root VOC2012 \\
        --split 1_16/split_0 --backbone resnet50 --pretrained_backbone resnet50.pth --output_dir runs/voc
    python examples/train_stpp.py config.yaml                                 # options from YAML / JSON

Relaunching the same command in the same ``--output_dir`` resumes the run.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
import transformers
from transformers import HfArgumentParser

from stpp_hf import MODEL_REGISTRY, DeepLabImageProcessor, build_model
from stpp_hf.data import load_source, make_synthetic_dataset, read_split, shipped_split_files
from stpp_hf.training.pipeline import RunData, RunSettings, lock_run, results_table, run_pipeline
from stpp_hf.training.trainer import StageHyperParameters

logger = logging.getLogger("train_stpp")

# spec section 2; "synthetic" is the built-in dataset used when no --data_root is given
DATASET_DEFAULTS = {
    "pascal": dict(epochs=80, lr=0.001, crop_size=321, base_size=400, val_batch_size=1, preset="pascal_voc"),
    "cityscapes": dict(epochs=240, lr=0.004, crop_size=721, base_size=2048, val_batch_size=4, preset="cityscapes"),
    "folder": dict(epochs=80, lr=0.001, crop_size=321, base_size=400, val_batch_size=1, preset=None),
    # small images, a ResNet-18 from scratch at output stride 16 and 6 epochs: minutes on 2 CPU cores
    "synthetic": dict(epochs=6, lr=0.02, crop_size=48, base_size=64, val_batch_size=25, preset=None),
}


@dataclass
class DataArguments:
    dataset: Literal["pascal", "cityscapes", "folder"] = field(
        default="pascal", metadata={"help": "Dataset layout. Without --data_root the built-in synthetic dataset is generated."}
    )
    data_root: Optional[str] = field(default=None, metadata={"help": "Dataset root; omit to run on synthetic data."})
    split: Optional[str] = field(
        default=None, metadata={"help": "Shipped partition, e.g. '1_16/split_0' (pascal) or '1_30/split_0' (cityscapes)."}
    )
    labeled_id_path: Optional[str] = field(default=None, metadata={"help": "Split file of labeled images."})
    unlabeled_id_path: Optional[str] = field(default=None, metadata={"help": "Split file of unlabeled images."})
    val_id_path: Optional[str] = field(default=None, metadata={"help": "Split file of val images."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the generated synthetic dataset."})
    synthetic_num_labeled: int = 20
    # several hundred unlabeled images make the ST++ gain clear; 100 val images keep its noise low
    synthetic_num_unlabeled: int = 300
    synthetic_num_val: int = 100
    synthetic_image_size: int = field(default=64, metadata={"help": "Side of the synthetic images (64 keeps the demo fast)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers per process."})


@dataclass
class ModelArguments:
    model: Literal["deeplabv3plus", "deeplabv2"] = "deeplabv3plus"
    backbone: Optional[str] = field(default=None, metadata={"help": "timm ResNet (default resnet50; resnet18 on synthetic data)."})
    output_stride: Optional[int] = field(default=None, metadata={"help": "8 (spec) or 16 (default on synthetic data)."})
    pretrained_backbone: Optional[str] = field(default=None, metadata={"help": "ImageNet backbone .pth (torchvision layout)."})
    coco_init: Optional[str] = field(default=None, metadata={"help": "DeepLabV2 COCO init checkpoint (.pth)."})


@dataclass
class RunArguments:
    output_dir: str = field(default="runs/stpp", metadata={"help": "Run directory; relaunching in it resumes."})
    framework: Literal["suponly", "st", "stpp"] = "stpp"
    teacher: Literal["best", "last"] = field(
        default="best", metadata={"help": "Pseudo labels from the best-on-val model (reference) or the last epoch."}
    )
    epochs: Optional[int] = None
    batch_size: int = field(default=16, metadata={"help": "Per-device batch (8 on synthetic data)."})
    lr: Optional[float] = field(default=None, metadata={"help": "Base lr for a global batch of 16."})
    crop_size: Optional[int] = None
    base_size: Optional[int] = None
    val_batch_size: Optional[int] = None
    inference_batch_size: int = field(default=8, metadata={"help": "Images per batch in selection / pseudo-labeling."})
    sliding_window: Optional[int] = field(default=None, metadata={"help": "Evaluate with this window (stride 2/3 of it)."})
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm (multi-GPU CUDA only)."})
    channels_last: Optional[bool] = field(
        default=None, metadata={"help": "channels_last convolutions in training (default: on CUDA only; slower on CPU here)."}
    )
    seed: int = 0
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_private: bool = False
    push_stage_branches: bool = False


def parse_arguments(argv=None) -> tuple[DataArguments, ModelArguments, RunArguments]:
    parser = HfArgumentParser((DataArguments, ModelArguments, RunArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


def _labeled_sources(data_args: DataArguments, output_dir: Path, accelerator):
    """``(labeled, unlabeled, val, id2label, palette, dataset_name)`` from the arguments."""
    if data_args.data_root is None:
        with accelerator.main_process_first():
            synthetic = make_synthetic_dataset(
                output_dir / "synthetic_data",
                seed=data_args.synthetic_seed,
                num_labeled=data_args.synthetic_num_labeled,
                num_unlabeled=data_args.synthetic_num_unlabeled,
                num_val=data_args.synthetic_num_val,
                image_size=data_args.synthetic_image_size,
            )
        files = synthetic.split_files
        root, name, dataset = synthetic.root, "synthetic", "pascal"
        id2label, palette = synthetic.id2label, synthetic.palette
    else:
        root, name, dataset = data_args.data_root, data_args.dataset, data_args.dataset
        files = _split_files(data_args)
        id2label, palette = None, None
    sources = {}
    with accelerator.main_process_first():  # the main process builds the Arrow caches, the others reuse them
        for part in ("labeled", "unlabeled", "val"):
            sources[part] = load_source(
                dataset, root, files[part], require_masks=part != "unlabeled", cache_dir=output_dir / "datasets_cache"
            )
    sources["unlabeled_entries"] = read_split(files["unlabeled"])
    return sources, id2label, palette, name


def _split_files(data_args: DataArguments) -> dict:
    given = {"labeled": data_args.labeled_id_path, "unlabeled": data_args.unlabeled_id_path, "val": data_args.val_id_path}
    if data_args.split is not None:
        shipped = shipped_split_files(data_args.dataset, data_args.split)
        given = {part: given[part] or shipped[part] for part in given}
    missing = [f"--{part}_id_path" for part, path in given.items() if path is None]
    if missing:
        raise ValueError(f"with --data_root, give --split or {' and '.join(missing)}")
    return given


def main(argv=None) -> dict:
    data_args, model_args, run_args = parse_arguments(argv)
    if run_args.push_to_hub and run_args.hub_model_id is None:
        raise ValueError("--push_to_hub needs --hub_model_id")
    output_dir = Path(run_args.output_dir)
    synthetic = data_args.data_root is None
    defaults = DATASET_DEFAULTS["synthetic" if synthetic else data_args.dataset]
    accelerator = Accelerator(
        mixed_precision=run_args.mixed_precision,
        gradient_accumulation_steps=run_args.gradient_accumulation_steps,
        log_with=None if run_args.report_to == "none" else run_args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=run_args.seed),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, format="%(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    transformers.utils.logging.disable_progress_bar()  # per-shard bars on every save / load
    lock_run(accelerator, output_dir)  # before the data work, which may regenerate files in the run directory

    sources, id2label, palette, dataset_name = _labeled_sources(data_args, output_dir, accelerator)
    backbone = model_args.backbone or ("resnet18" if synthetic else "resnet50")
    output_stride = model_args.output_stride or (16 if synthetic else 8)
    config_kwargs = dict(backbone=backbone, output_stride=output_stride)
    model_config_class = MODEL_REGISTRY[model_args.model][0]
    if id2label is not None:
        config_kwargs.update(num_labels=len(id2label), id2label=id2label)
        probe_config = model_config_class(**config_kwargs)
    else:
        probe_config = model_config_class.from_preset(defaults["preset"], **config_kwargs)
        config_kwargs.update(num_labels=probe_config.num_labels, id2label=dict(probe_config.id2label))
    id2label = {int(k): v for k, v in probe_config.id2label.items()}

    def model_factory():
        model = build_model(model_args.model, **config_kwargs)
        if model_args.pretrained_backbone:
            model.load_backbone_weights(model_args.pretrained_backbone)
        if model_args.coco_init:
            model.load_coco_init(model_args.coco_init)
        return model

    epochs = run_args.epochs or defaults["epochs"]
    window = run_args.sliding_window
    hparams = StageHyperParameters(
        epochs=epochs,
        per_device_batch_size=8 if synthetic and run_args.batch_size == 16 else run_args.batch_size,
        base_lr=run_args.lr or defaults["lr"],
        val_batch_size=run_args.val_batch_size or defaults["val_batch_size"],
        num_workers=data_args.num_workers,
        seed=run_args.seed,
        sliding_window=None if window is None else (window, max(1, 2 * window // 3)),
        channels_last=accelerator.device.type == "cuda" if run_args.channels_last is None else run_args.channels_last,
        sync_batchnorm=run_args.sync_bn,
    )
    data = RunData(
        labeled=sources["labeled"],
        unlabeled=sources["unlabeled"],
        val=sources["val"],
        id2label=id2label,
        unlabeled_entries=sources["unlabeled_entries"],
        palette=palette,
        base_size=run_args.base_size or defaults["base_size"],
        crop_size=run_args.crop_size or defaults["crop_size"],
    )
    metadata = {
        "dataset": dataset_name,
        "split": data_args.split or ("synthetic" if synthetic else "custom"),
        "model": model_args.model,
        "backbone": backbone,
        "output_stride": output_stride,
        "epochs": epochs,
        "batch_size": hparams.per_device_batch_size * accelerator.num_processes * run_args.gradient_accumulation_steps,
        "lr": hparams.base_lr,
        "crop_size": data.crop_size,
        "pretrained_backbone": model_args.pretrained_backbone is not None,
    }
    settings = RunSettings(
        run_dir=output_dir,
        framework=run_args.framework,
        hparams=hparams,
        model_factory=model_factory,
        model_class=MODEL_REGISTRY[model_args.model][1],
        image_processor=DeepLabImageProcessor(),
        teacher=run_args.teacher,
        inference_batch_size=run_args.inference_batch_size,
        metadata=metadata,
    )
    if run_args.report_to != "none":
        tracked = {**asdict(run_args), **asdict(model_args), "dataset": dataset_name}
        # TensorBoard's hparams accept only scalars and strings
        accelerator.init_trackers("stpp", config={key: value for key, value in tracked.items() if value is not None})
    results = run_pipeline(accelerator, data, settings)
    accelerator.end_training()
    if accelerator.is_main_process:
        print(results_table(results))
        print(f"run directory: {output_dir} (final model in {output_dir / 'final'})")
        if run_args.push_to_hub:
            from stpp_hf.hub import HubPushError, push_run_to_hub

            try:
                url = push_run_to_hub(output_dir, run_args.hub_model_id, private=run_args.hub_private, push_stages=run_args.push_stage_branches)
            except HubPushError as error:
                raise SystemExit(
                    f"HubPushError: {error}\nThe run is complete in {output_dir}; push it later with "
                    f"python examples/push_to_hub.py --run-dir {output_dir} --repo-id {run_args.hub_model_id}"
                ) from None
            print(f"pushed to {url}")
    return results


if __name__ == "__main__":
    main()
