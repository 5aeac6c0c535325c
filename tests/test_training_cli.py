"""stpp-train options: command line, recipe files (YAML / JSON) plus overrides, validation before any data
work, the resolved run configuration, --dry_run on every shipped recipe, the relaunch check."""

import dataclasses
import json
import sys
import warnings

import pytest
from helpers import REPO

from stpp_hf.training import cli, dry_run
from stpp_hf.training.config import resolve_run_config
from stpp_hf.training.errors import ConfigError
from stpp_hf.training.options import RunArguments, parse_arguments
from stpp_hf.training.recipe import RECIPE_DEFAULTS, recipe_default
from stpp_hf.training.run_record import check_and_record_run_config, config_differences

RECIPES = sorted((REPO / "examples" / "recipes").glob("*.yaml"))


def resolve(argv, num_processes=1, device_type="cpu"):
    data, model, run, _ = parse_arguments(argv)
    return resolve_run_config(data, model, run, num_processes, device_type)


def test_options_from_yaml_json_and_command_line(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "framework: st\nepochs: 4\nbackbone: resnet34\ndataset: cityscapes\nteacher: last\n"
    )
    data, model, run, _ = parse_arguments([str(tmp_path / "run.yaml")])
    assert (run.framework, run.epochs, model.backbone, data.dataset, run.teacher) == (
        "st",
        4,
        "resnet34",
        "cityscapes",
        "last",
    )
    (tmp_path / "run.json").write_text(json.dumps({"framework": "suponly", "lr": 0.01, "split": "1_8/split_1"}))
    data, model, run, _ = parse_arguments([str(tmp_path / "run.json")])
    assert (run.framework, run.lr, data.split) == ("suponly", 0.01, "1_8/split_1")
    data, model, run, _ = parse_arguments(["--framework", "stpp", "--mixed_precision", "bf16", "--sync_bn", "true"])
    assert (run.framework, run.mixed_precision, run.sync_bn, run.channels_last) == ("stpp", "bf16", True, None)
    with pytest.raises(SystemExit):
        parse_arguments(["--framework", "fixmatch"])
    with pytest.raises(ConfigError, match="--batch_size is gone"):  # the recipe is a global batch
        parse_arguments(["--batch_size", "16"])
    (tmp_path / "bad.yaml").write_text("framework: stpp\nepochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        parse_arguments([str(tmp_path / "bad.yaml")])


def test_recipe_file_values_are_type_checked_and_overridden_by_the_command_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: three\n")
    with pytest.raises(ConfigError, match="epochs must be int, got 'three'"):
        parse_arguments([str(recipe)])
    recipe.write_text("lr: '0.1'\n")
    with pytest.raises(ConfigError, match="lr must be float"):
        parse_arguments([str(recipe)])
    recipe.write_text("framework: fixmatch\n")
    with pytest.raises(ConfigError, match="framework must be one of"):
        parse_arguments([str(recipe)])
    recipe.write_text("paper: {published_miou: 70.0, typo: 1}\n")
    with pytest.raises(ConfigError, match="paper"):
        parse_arguments([str(recipe)])
    recipe.write_text("epochs: 9\nlr: 1\nframework: st\nsync_bn: false\npaper: {published_miou: 70.0}\n")
    data, model, run, paper = parse_arguments([str(recipe), "--epochs", "3", "--output_dir", "x"])
    assert (run.epochs, run.lr, run.framework, run.sync_bn, run.output_dir) == (3, 1.0, "st", False, "x")
    assert paper == {"published_miou": 70.0}


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--epochs", "0"], "--epochs"),
        (["--crop_size", "0"], "--crop_size"),
        (["--framework", "stpp", "--epochs", "2"], "--epochs 2"),  # ST++ needs 3 distinct snapshots
        (["--global_batch_size", "16", "--per_device_batch_size", "4"], "not both"),
        (["--global_batch_size", "8", "--gradient_accumulation_steps", "3"], "--global_batch_size 8"),
        (["--lr", "0"], "--lr"),
        (["--output_stride", "4"], "--output_stride"),
        (["--coco_init", "x.pth"], "--coco_init"),
        (["--push_to_hub"], "hub_model_id"),
        (["--dataset", "cityscapes"], "--data_root"),
    ],
)
def test_bad_options_are_named_before_any_data_work(argv, option):
    with pytest.raises(ConfigError, match=option.replace("+", r"\+")):
        resolve(argv)


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="hub_model_id"):
        cli.main(["--push_to_hub", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--split or --labeled_id_path"):
        cli.main(["--data_root", str(tmp_path), "--output_dir", str(tmp_path / "run"), "--report_to", "none"])
    assert not (tmp_path / "run").exists()  # nothing was made for a refused command


def test_global_batch_lr_and_defaults_resolve_once(tmp_path):
    # the synthetic demo keeps its recipe: global batch 8 on one process, base lr 0.02 for a global batch of 16
    demo = resolve([])
    assert (demo.run.global_batch_size, demo.run.per_device_batch_size, demo.run.lr, demo.derived.scaled_lr) == (
        8,
        8,
        0.02,
        0.01,
    )
    assert (demo.model.backbone, demo.model.output_stride, demo.model.backbone_weights, demo.run.sync_bn) == (
        "resnet18",
        16,
        "none",
        False,
    )
    # an explicit lr is the base lr: scaled with the global batch like the default
    assert resolve(["--lr", "0.04", "--global_batch_size", "32"]).derived.scaled_lr == pytest.approx(0.08)
    # per-device batch instead of the global one
    two = resolve(["--per_device_batch_size", "4", "--gradient_accumulation_steps", "2"], num_processes=2)
    assert (two.run.global_batch_size, two.derived.scaled_lr) == (16, pytest.approx(0.02))
    # real data: the paper's defaults, ImageNet weights from the Hub, SyncBatchNorm on several CUDA GPUs
    real = ["--data_root", str(tmp_path), "--split", "1_16/split_0"]
    pascal = resolve(real, num_processes=4, device_type="cuda")
    run = pascal.run
    assert (run.global_batch_size, run.per_device_batch_size, pascal.derived.scaled_lr, run.epochs) == (
        16,
        4,
        0.001,
        80,
    )
    assert pascal.run.crop_size == 321
    assert (pascal.model.backbone, pascal.model.backbone_weights, pascal.model.output_stride, pascal.run.sync_bn) == (
        "resnet50",
        "resnet50.tv_in1k",
        8,
        True,
    )
    assert not resolve(real, num_processes=1, device_type="cuda").run.sync_bn
    with pytest.warns(UserWarning, match="not the method's recipe"):
        resolve([*real, "--backbone_weights", "none"])
    with pytest.warns(UserWarning, match="COCO"):
        v2 = resolve([*real, "--model", "deeplabv2"])
    assert (v2.model.backbone, v2.model.backbone_weights) == ("resnet101", "resnet101.tv_in1k")
    coco = tmp_path / "coco.pth"
    coco.write_bytes(b"")
    v2 = resolve([*real, "--model", "deeplabv2", "--coco_init", str(coco)])
    assert (v2.model.backbone_weights, v2.model.coco_init) == ("none", str(coco))
    with pytest.raises(ConfigError, match="--global_batch_size 16 is not divisible by 3 processes"):
        resolve(real, num_processes=3)
    # the Cityscapes recipe: its own base lr (for a global batch of 16), resolved at batch 16
    cityscapes = resolve(["--dataset", "cityscapes", "--data_root", str(tmp_path), "--split", "1_30/split_0"])
    assert (cityscapes.run.lr, cityscapes.derived.scaled_lr, cityscapes.run.crop_size) == (
        0.004,
        pytest.approx(0.004),
        721,
    )


def test_a_data_root_without_a_layout_is_refused_naming_the_option(tmp_path):
    from stpp_hf.training.config import resolve_options

    with pytest.raises(ConfigError, match="--dataset: name the layout of --data_root"):
        resolve_options(data_root=str(tmp_path), dataset=None)


def test_the_method_docs_state_the_recipe_defaults():
    """docs/method.md's recipe table says what ``RECIPE_DEFAULTS`` holds (its owner), and the options' help is made
    from that table."""
    rows = {}
    for line in (REPO / "docs" / "method.md").read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3:
            rows[cells[0]] = cells[1:]
    settings = {"epochs": "epochs", "base lr, for a global batch of 16": "base_lr", "crop": "crop_size",
                "resize base (long side)": "base_size"}  # fmt: skip
    for row, setting in settings.items():
        documented = [float(value) for value in rows[row]]
        assert documented == [getattr(RECIPE_DEFAULTS[kind], setting) for kind in ("pascal", "cityscapes")], row
    assert (
        f"Epochs per training stage; {recipe_default('epochs')}."
        == [option.metadata["help"] for option in dataclasses.fields(RunArguments) if option.name == "epochs"][0]
    )
    assert "80 (pascal, folder, hub), 240 (cityscapes)" in recipe_default("epochs")


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_dry_run_of_every_recipe_is_the_same_on_1_2_and_8_processes(recipe, tmp_path, capsys):
    argv = [str(recipe), "--data_root", str(tmp_path), "--dry_run"]
    summaries = []
    for processes in (1, 2, 8):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the DeepLabV2 recipes warn when their COCO file is absent
            config = resolve(argv, num_processes=processes)
        summary = dry_run.recipe_summary(config)
        assert config.run.per_device_batch_size * processes == config.run.global_batch_size == 16
        summaries.append(
            (
                config.run.global_batch_size,
                config.derived.scaled_lr,
                summary["lr"],
                summary["steps"],
                summary["total_steps"],
            )
        )
        assert summary["total_steps"] > 0
    assert summaries[0] == summaries[1] == summaries[2]
    text = dry_run.describe_recipe(config, parse_arguments(argv)[3])
    assert "for a global batch of 16" in text and "published mIoU" in text and "snapshot epochs" in text
    assert "per device x 8 processes" in text


def test_dry_run_prints_the_recipe_and_trains_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["stpp-train", "--dry_run", "--output_dir", str(tmp_path / "run")])
    with pytest.raises(SystemExit) as exited:
        cli.console_main()
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert "global batch: 8 = 8 per device x 1 processes" in printed and "backbone 0.01, head 0.1" in printed
    assert not (tmp_path / "run").exists()
    # a bad option: one line naming it, no traceback
    monkeypatch.setattr(sys, "argv", ["stpp-train", "--epochs", "0"])
    with pytest.raises(SystemExit) as exited:
        cli.console_main()
    assert exited.value.code == "stpp-train: error: --epochs must be >= 1, got 0"


def test_relaunch_differences_list_every_setting_with_both_values(tmp_path):
    saved = {**resolve([]).record(), "data": {"val": {"fingerprint": "a", "num_images": 3}}}
    new = {
        **resolve(["--synthetic_seed", "1", "--epochs", "7", "--num_workers", "2", "--output_dir", "o"]).record(),
        "data": {"val": {"fingerprint": "b", "num_images": 3}},
    }
    assert config_differences(saved, new) == [
        ("data.val.fingerprint", "a", "b"),
        ("epochs", 6, 7),
        ("synthetic.seed", 0, 1),
    ]
    # the settings alone (before the data is built) are compared without the data section
    assert config_differences(saved, resolve([]).record()) == []
    check_and_record_run_config(tmp_path, saved)
    with pytest.raises(ConfigError, match=r"synthetic.seed: 0 -> 1") as error:
        check_and_record_run_config(tmp_path, new)
    assert "epochs: 6 -> 7" in str(error.value) and "data.val.fingerprint: 'a' -> 'b'" in str(error.value)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "state.json").write_text("{}")
    with pytest.raises(ConfigError, match="older version"):
        check_and_record_run_config(tmp_path / "old", saved)


def test_relaunch_with_another_synthetic_seed_is_refused_before_the_data_is_regenerated(tmp_path):
    run = tmp_path / "run"
    common = [
        "--output_dir",
        str(run),
        "--synthetic_num_labeled",
        "4",
        "--synthetic_num_unlabeled",
        "4",
        "--synthetic_num_val",
        "2",
        "--synthetic_image_size",
        "32",
        "--report_to",
        "none",
    ]
    # stand in for a first launch killed after building its data (before training)
    original = cli.run_pipeline
    cli.run_pipeline = lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt("killed"))
    try:
        with pytest.raises(KeyboardInterrupt):
            cli.main(common)
    finally:
        cli.run_pipeline = original
    files = sorted(run.joinpath("synthetic_data").rglob("*"))
    before = {path: path.stat().st_mtime_ns for path in files}
    with pytest.raises(ConfigError, match="synthetic.seed: 0 -> 1"):
        cli.main([*common, "--synthetic_seed", "1"])
    assert {path: path.stat().st_mtime_ns for path in sorted(run.joinpath("synthetic_data").rglob("*"))} == before
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["synthetic"]["seed"] == 0 and set(saved["data"]) == {"labeled", "unlabeled", "val", "id2label"}


@pytest.mark.parametrize(
    "argv, processes",
    [
        (["--per_device_batch_size", "1"], 1),
        (["--global_batch_size", "16", "--gradient_accumulation_steps", "16"], 1),  # one GPU fitting Cityscapes
        (["--global_batch_size", "2"], 2),  # 2 CPU processes: no SyncBatchNorm
    ],
)
def test_one_image_per_device_without_syncbatchnorm_is_refused_before_the_run_directory(argv, processes, tmp_path):
    with pytest.raises(ConfigError) as refused:
        resolve(argv, num_processes=processes)
    for option in ("--per_device_batch_size", "--global_batch_size", "--gradient_accumulation_steps", "--sync_bn"):
        assert option in str(refused.value)
    assert "image-pooling BatchNorm" in str(refused.value)
    if processes == 1:  # the command itself (one process here) stops before making the run directory
        with pytest.raises(ConfigError, match="image-pooling BatchNorm"):
            cli.main([*argv, "--output_dir", str(tmp_path / "run"), "--report_to", "none"])
        assert not (tmp_path / "run").exists()


def test_one_image_per_device_works_with_syncbatchnorm_or_deeplabv2():
    assert resolve(["--global_batch_size", "2"], num_processes=2, device_type="cuda").run.sync_bn
    assert resolve(["--per_device_batch_size", "1", "--model", "deeplabv2"]).run.per_device_batch_size == 1


def test_mixed_precision_defaults_to_the_launchers(monkeypatch):
    """``accelerate launch --mixed_precision bf16`` (ACCELERATE_MIXED_PRECISION) is the run's precision unless the
    script's option says otherwise; without either it is fp32."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve([]).run.mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve([]).run.mixed_precision == "bf16"
    assert resolve(["--mixed_precision", "no"]).run.mixed_precision == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION=fp8.*--mixed_precision no"):
        resolve([])
