"""Official ST++ checkpoints: their module names mapped onto this package's models, the DeepLabV2 COCO init, and the
converter to a `save_pretrained` directory.

    python -m stpp_hf.convert_original --checkpoint best.pth --model deeplabv3plus --backbone resnet50 \\
        --num-labels 21 --output-dir converted/

The official state dict uses the module names `backbone` (torchvision ResNet keys), `head` (ASPP), `reduce`,
`fuse`, `classifier` (DeepLabV2: `classifier.0..3`), possibly under a DataParallel `module.` prefix.
Any unknown, missing or wrongly shaped key stops the conversion with the list of offending keys.
"""

import argparse
import os
import sys

import torch
from timm.models import clean_state_dict
from transformers import PreTrainedModel

from .models import MODEL_REGISTRY, DeepLabImageProcessor, DeepLabV2Config, DeepLabV3PlusConfig
from .models.deeplab.deeplab_common import check_state_dict_matches, read_state_dict_file

# How the official module names map onto ours, per model type: `(official prefix, our prefix)`, first match wins.
ORIGINAL_PREFIX_MAPS = {
    DeepLabV3PlusConfig.model_type: (
        ("backbone.", "backbone."),
        ("head.b0.0.", "aspp.branches.0.conv."),
        ("head.b0.1.", "aspp.branches.0.norm."),
        ("head.b1.0.", "aspp.branches.1.conv."),
        ("head.b1.1.", "aspp.branches.1.norm."),
        ("head.b2.0.", "aspp.branches.2.conv."),
        ("head.b2.1.", "aspp.branches.2.norm."),
        ("head.b3.0.", "aspp.branches.3.conv."),
        ("head.b3.1.", "aspp.branches.3.norm."),
        ("head.b4.gap.1.", "aspp.pooling.conv."),
        ("head.b4.gap.2.", "aspp.pooling.norm."),
        ("head.project.0.", "aspp.project.conv."),
        ("head.project.1.", "aspp.project.norm."),
        ("reduce.0.", "low_level_reduce.conv."),
        ("reduce.1.", "low_level_reduce.norm."),
        ("fuse.0.", "fuse.0.conv."),
        ("fuse.1.", "fuse.0.norm."),
        ("fuse.3.", "fuse.1.conv."),
        ("fuse.4.", "fuse.1.norm."),
        ("classifier.", "classifier."),
    ),
    DeepLabV2Config.model_type: (("backbone.", "backbone."), ("classifier.", "classifier.")),
}

# Class names used when --preset is not given but the class count is a known dataset's.
PRESET_BY_NUM_LABELS = {21: "pascal_voc", 19: "cityscapes"}


def convert_original_state_dict(
    model: PreTrainedModel, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename an official ST++ state dict to `model`'s keys.

    Args:
        model (`PreTrainedModel`): a DeepLabV3+ or DeepLabV2 of this package (its `config.model_type` picks the map).
        state_dict (`dict[str, torch.Tensor]`): the official network's, `module.` prefixes allowed.

    Returns:
        `dict[str, torch.Tensor]`: the same tensors under `model`'s names; a key no rule matches is a `ValueError`.
    """
    prefix_map = ORIGINAL_PREFIX_MAPS[model.config.model_type]
    renamed, unknown = {}, []
    for key, value in clean_state_dict(state_dict).items():
        for source_prefix, target_prefix in prefix_map:
            if key.startswith(source_prefix):
                renamed[target_prefix + key[len(source_prefix) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"original state dict has unknown keys: {', '.join(sorted(unknown)[:20])} ({len(unknown)} in all)"
        )
    return renamed


def load_original_state_dict(
    model: PreTrainedModel,
    state_dict: dict[str, torch.Tensor],
    what: str = "original state dict",
    assign: bool = False,
) -> None:
    """Load a state dict of the official ST++ network into `model` (strict: all keys, all shapes).

    Args:
        model (`PreTrainedModel`): a DeepLabV3+ or DeepLabV2 of this package.
        state_dict (`dict[str, torch.Tensor]`): the official network's.
        what (`str`): names the weights in errors.
        assign (`bool`): adopt the given tensors (for a model built on the meta device).
    """
    converted = convert_original_state_dict(model, state_dict)
    check_state_dict_matches(converted, model.state_dict(), what)
    model.load_state_dict(converted, assign=assign)


def load_coco_init(model: PreTrainedModel, path: str | os.PathLike, include_classifier: bool = True) -> None:
    """Initialise a DeepLabV2 from the official COCO-pretrained DeepLabV2-ResNet-101 `.pth` (backbone + classifier).

    Args:
        model (`DeepLabV2ForSemanticSegmentation`): the model to initialise.
        path (`str` or `os.PathLike`): the official file.
        include_classifier (`bool`): `False` takes only the backbone (e.g. when `num_labels` differs from the file's).
    """
    state_dict = read_state_dict_file(path, "COCO-pretrained DeepLabV2 file")
    what = f"COCO-pretrained DeepLabV2 file {os.fspath(path)}"
    if include_classifier:
        load_original_state_dict(model, state_dict, what)
        return
    converted = convert_original_state_dict(model, state_dict)
    backbone = {key[len("backbone.") :]: value for key, value in converted.items() if key.startswith("backbone.")}
    check_state_dict_matches(backbone, model.backbone.state_dict(), what)
    model.backbone.load_state_dict(backbone)


def convert_original_checkpoint(
    checkpoint: str | os.PathLike,
    model_name: str,
    backbone: str,
    num_labels: int,
    output_dir: str | os.PathLike,
    preset: str | None = None,
) -> PreTrainedModel:
    """Read an official ST++ `.pth`, load it into the matching model and write model + processor to `output_dir`.

    Args:
        checkpoint (`str` or `os.PathLike`): the official state dict.
        model_name (`str`): a `MODEL_REGISTRY` name.
        backbone (`str`): the checkpoint's ResNet ("resnet50", "resnet101").
        num_labels (`int`): the checkpoint's class count.
        output_dir (`str` or `os.PathLike`): where `save_pretrained` writes.
        preset (`str`, *optional*): class names; by default those of a known dataset with `num_labels` classes.

    Returns:
        `PreTrainedModel`: the converted model, in eval mode.
    """
    if model_name not in MODEL_REGISTRY:
        raise ValueError(f"model={model_name!r} is invalid; allowed values: {sorted(MODEL_REGISTRY)}")
    config_class, model_class = MODEL_REGISTRY[model_name]
    preset = preset or PRESET_BY_NUM_LABELS.get(num_labels)
    if preset is not None:
        config = config_class.from_preset(preset, backbone=backbone, num_labels=num_labels)
    else:
        config = config_class(backbone=backbone, num_labels=num_labels)
    state_dict = read_state_dict_file(checkpoint, "ST++ checkpoint")
    # Build without allocating or initialising weights: every tensor comes from the checkpoint.
    with torch.device("meta"):
        model = model_class(config)
    load_original_state_dict(model, state_dict, what=f"ST++ checkpoint {os.fspath(checkpoint)}", assign=True)
    model.eval()
    model.save_pretrained(output_dir)
    DeepLabImageProcessor().save_pretrained(output_dir)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert an official ST++ checkpoint to a save_pretrained directory.")
    parser.add_argument("--checkpoint", required=True, help="official ST++ .pth state dict")
    parser.add_argument("--model", required=True, choices=sorted(MODEL_REGISTRY))
    parser.add_argument("--backbone", required=True, choices=["resnet50", "resnet101"])
    parser.add_argument("--num-labels", required=True, type=int)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--preset", choices=["pascal_voc", "cityscapes"], help="class names (default: by --num-labels)"
    )
    args = parser.parse_args(argv)
    try:
        convert_original_checkpoint(
            args.checkpoint, args.model, args.backbone, args.num_labels, args.output_dir, preset=args.preset
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_dir}")
    return 0


__all__ = [
    "ORIGINAL_PREFIX_MAPS",
    "convert_original_checkpoint",
    "convert_original_state_dict",
    "load_coco_init",
    "load_original_state_dict",
]


if __name__ == "__main__":
    sys.exit(main())
