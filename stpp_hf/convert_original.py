"""Convert a checkpoint trained with the official ST++ code into a `save_pretrained` directory.

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

from .models import MODEL_REGISTRY, DeepLabImageProcessor
from .models.deeplab.deeplab_common import read_state_dict_file

# Class names used when --preset is not given but the class count is a known dataset's.
PRESET_BY_NUM_LABELS = {21: "pascal_voc", 19: "cityscapes"}


def convert_original_checkpoint(
    checkpoint: str | os.PathLike,
    model_name: str,
    backbone: str,
    num_labels: int,
    output_dir: str | os.PathLike,
    preset: str | None = None,
):
    """Read an official ST++ `.pth`, load it into the matching model and write model + processor to `output_dir`.

    Returns the converted model (eval mode).
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
    model.load_original_state_dict(state_dict, what=f"ST++ checkpoint {os.fspath(checkpoint)}", assign=True)
    model.eval()
    model.save_pretrained(output_dir)
    DeepLabImageProcessor().save_pretrained(output_dir)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
