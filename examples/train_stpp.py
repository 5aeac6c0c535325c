#!/usr/bin/env python
"""Train SupOnly / ST / ST++ (Yang et al., CVPR 2022) end to end with Accelerate: ``stpp-train`` as a script.

    accelerate launch examples/train_stpp.py --output_dir runs/demo          # synthetic data, ST++
    accelerate launch examples/train_stpp.py examples/recipes/pascal-1_16-r50.yaml --data_root VOCdevkit/VOC2012 \\
        --output_dir runs/voc-1_16                                            # a paper recipe + overrides
    python examples/train_stpp.py examples/recipes/pascal-1_16-r50.yaml --data_root VOC2012 --dry_run

Options: ``python examples/train_stpp.py --help`` (they live in ``stpp_hf/training/options.py``).
Relaunching the same command in the same ``--output_dir`` resumes the run.
"""

from stpp_hf.training.cli import console_main, main  # noqa: F401  (main: for tests and notebooks)

if __name__ == "__main__":
    console_main()
