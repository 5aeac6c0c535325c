"""Push a run to a fake Hub on 127.0.0.1, then load it in fresh processes with and without stpp_hf.

Pushing and loading run in subprocesses: huggingface_hub reads `HF_ENDPOINT` when it is imported.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_hub import FakeHub, save_tiny_model
from helpers import BLOCK_STPP_HF, REPO
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file, save_file

from stpp_hf import DeepLabImageProcessor
from stpp_hf.hub import HubPushError, push_model_dir, push_run_to_hub
from stpp_hf.model_card import build_model_card
from stpp_hf.models.backbone_weights import describe_backbone_weights
from stpp_hf.training.results import RunResults

REPO_ID = "tester/deeplabv3plus-st-synthetic"
TOKEN = "hf_FakeTokenForTestsOnly0123456789"
CLASS_NAMES = ("background", "disc", "square")
# framework "st": the stage list of the trainer (stpp_hf.training.stages.build_stages("st"))
STAGES = (("suponly", "train"), ("label_all", "label"), ("retrain", "train"))

LOADER = BLOCK_STPP_HF + textwrap.dedent(
    """
    import json, sys

    mode, repo_id, revision, input_path, output_path = sys.argv[1:]
    if mode == "remote_code":
        block_stpp_hf()  # only the code files of the Hub repo can be used
    else:
        import stpp_hf
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

    trust = mode == "remote_code"
    model = AutoModelForSemanticSegmentation.from_pretrained(
        repo_id, revision=revision, trust_remote_code=trust
    ).eval()
    processor = AutoImageProcessor.from_pretrained(repo_id, revision=revision, trust_remote_code=trust)
    image = load_file(input_path)["image"].numpy()
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values).logits
    save_file({"logits": logits.contiguous(), "pixel_values": pixel_values.contiguous()}, output_path)
    segmenter = pipeline("image-segmentation", model=model, image_processor=processor)
    labels = sorted(segment["label"] for segment in segmenter(Image.fromarray(image)))
    print(json.dumps({
        "model_module": type(model).__module__,
        "processor_class": type(processor).__name__,
        "pipeline_labels": labels,
        "stpp_hf_imported": any(name.startswith("stpp_hf") for name in sys.modules),
    }))
    """
)


def tree_digest(directory: Path) -> dict[str, str]:
    """Path -> sha256 of every file under `directory` (detects any change to a run directory)."""
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished "st" run directory laid out as the trainer writes it (ARCHITECTURE.md), with real models."""
    run_dir = tmp_path_factory.mktemp("run")
    stages, models = [], {}
    for index, (name, kind) in enumerate(STAGES):
        entry = {"name": name, "kind": kind}
        if kind == "train":
            model_dir = f"stages/{index + 1}-{name}/best"
            models[name] = save_tiny_model(run_dir / model_dir, CLASS_NAMES, seed=index)
            entry.update(
                val_miou=0.41 + 0.1 * index, best_epoch=2, model_dir=model_dir,
                per_class_iou={
                    class_name: 0.3 + 0.1 * position + 0.05 * index for position, class_name in enumerate(CLASS_NAMES)
                },
            )  # fmt: skip
        else:
            entry.update(num_images=300)
        stages.append(entry)
    save_tiny_model(run_dir / "final", CLASS_NAMES, seed=len(STAGES) - 1)
    results = {
        "framework": "st", "dataset": "synthetic", "split": "synthetic/seed_0", "num_labeled": 20,
        "num_unlabeled": 300, "model": "deeplabv3plus", "backbone": "resnet18", "output_stride": 16, "epochs": 8,
        "global_batch_size": 8, "lr": 0.001, "crop_size": 96, "hardware": "1x CPU", "wall_time_s": 512.3,
        "id2label": {str(index): name for index, name in enumerate(CLASS_NAMES)},
        "stages": stages,
        "final": {
            "val_miou": 0.5234, "per_class_iou": {"background": 0.93, "disc": 0.41, "square": 0.2272},
            "model_dir": "final",
        },
        "pseudo_label_miou": {"all": 0.71},
    }  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(results))
    image = np.random.default_rng(0).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    input_path = tmp_path_factory.mktemp("inputs") / "image.safetensors"
    save_file({"image": torch.from_numpy(image)}, input_path)
    return {"run_dir": run_dir, "results": results, "models": models, "image": image, "input_path": input_path}


def hub_environment(hub: FakeHub, home: Path, token: str | None = TOKEN) -> dict:
    environment = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(REPO),
    }
    environment.pop("HF_HUB_OFFLINE", None)
    environment.pop("HF_TOKEN", None)
    if token is not None:
        environment["HF_TOKEN"] = token
    return environment


def run_python(arguments: list[str], environment: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *arguments], capture_output=True, text=True, env=environment, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def pushed(tiny_run, tmp_path_factory):
    """The tiny run pushed with examples/push_to_hub.py --push-stages to a fake Hub that requires the token."""
    home = tmp_path_factory.mktemp("hf_home")
    before = tree_digest(tiny_run["run_dir"])
    with FakeHub(token=TOKEN) as hub:
        environment = hub_environment(hub, home)
        push = run_python(
            [str(REPO / "examples/push_to_hub.py"), "--run-dir", str(tiny_run["run_dir"]), "--repo-id", REPO_ID,
             "--push-stages"],
            environment, home,
        )  # fmt: skip
        assert push.returncode == 0, push.stderr[-3000:]
        yield {**tiny_run, "hub": hub, "environment": environment, "home": home, "push": push, "before": before}


@pytest.mark.slow
def test_push_uploads_final_model_and_card_without_touching_the_run(pushed):
    hub, run_dir = pushed["hub"], pushed["run_dir"]
    assert f"{hub.url}/{REPO_ID}" in pushed["push"].stdout
    files = hub.files(REPO_ID)
    local_final = {path.name: path.read_bytes() for path in (run_dir / "final").iterdir()}
    for name, content in local_final.items():
        assert files[name] == content, name
    assert {
        "README.md",
        "modeling_deeplabv3plus.py",
        "image_processing_deeplab.py",
        "model.safetensors",
    } <= files.keys()
    assert tree_digest(run_dir) == pushed["before"]
    # the token authenticated the writes (the fake Hub refuses others) but appears in no output or file
    for text in (
        pushed["push"].stdout,
        pushed["push"].stderr,
        *(content.decode("latin-1") for content in files.values()),
    ):
        assert TOKEN not in text
    assert hub.unhandled == []


@pytest.mark.slow
def test_card_metadata_and_model_index(pushed):
    results = pushed["results"]
    card = ModelCard(pushed["hub"].files(REPO_ID)["README.md"].decode())
    data = card.data
    assert data.library_name == "transformers"
    assert {"semantic-segmentation", "semi-supervised", "stpp", "resnet18"} <= set(data.tags)
    assert data.license == "apache-2.0" and data.backbone == "resnet18"  # the package's license
    metrics = {result.metric_name: result.metric_value for result in data.eval_results}
    assert data.eval_results[0].metric_value == pytest.approx(100 * results["final"]["val_miou"], abs=0.005)
    assert metrics["val mIoU (%), stage 1 suponly"] == pytest.approx(100 * results["stages"][0]["val_miou"], abs=0.005)
    assert metrics["val mIoU (%), stage 3 retrain"] == pytest.approx(100 * results["stages"][2]["val_miou"], abs=0.005)
    assert {result.metric_type for result in data.eval_results} == {"mean_iou"}
    assert "| square | 50.00 | 60.00 | 22.72 |" in card.text  # per-class IoU: stage 1, stage 3, final
    assert "Labeled / unlabeled images | 20 / 300" in card.text
    assert "ST++: Make Self-training Work Better for Semi-supervised Semantic Segmentation" in card.text
    assert f'AutoModelForSemanticSegmentation.from_pretrained("{REPO_ID}", trust_remote_code=True)' in card.text


@pytest.mark.slow
def test_stage_branches_hold_each_stage_best_model(pushed):
    hub, run_dir = pushed["hub"], pushed["run_dir"]
    assert set(hub.repos[REPO_ID].branches) == {"main", "stage-1-suponly", "stage-3-retrain"}
    for branch, stage_index in (("stage-1-suponly", 0), ("stage-3-retrain", 2)):
        stage = pushed["results"]["stages"][stage_index]
        files = hub.files(REPO_ID, branch)
        assert files["model.safetensors"] == (run_dir / stage["model_dir"] / "model.safetensors").read_bytes()
        card = ModelCard(files["README.md"].decode())
        assert card.data.eval_results[0].metric_value == pytest.approx(100 * stage["val_miou"], abs=0.005)
        assert f'revision="{branch}"' in card.text
    suponly_weights = hub.files(REPO_ID, "stage-1-suponly")["model.safetensors"]
    assert suponly_weights != hub.files(REPO_ID)["model.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "revision", "stage"), [("remote_code", "main", "retrain"), ("package", "stage-1-suponly", "suponly")]
)
def test_pushed_model_loads_in_fresh_process(pushed, tmp_path, mode, revision, stage):
    """remote_code: stpp_hf cannot be imported, only the repo's code files; package: stpp_hf's own classes."""
    output_path = tmp_path / "logits.safetensors"
    loader = run_python(
        ["-c", LOADER, mode, REPO_ID, revision, str(pushed["input_path"]), str(output_path)],
        {**pushed["environment"], "HF_MODULES_CACHE": str(tmp_path / "modules")}, tmp_path,
    )  # fmt: skip
    assert loader.returncode == 0, loader.stderr[-3000:]
    report = json.loads(loader.stdout.strip().splitlines()[-1])
    assert report["stpp_hf_imported"] is (mode == "package")
    expected_prefix = "transformers_modules." if mode == "remote_code" else "stpp_hf."
    assert report["model_module"].startswith(expected_prefix)
    assert report["processor_class"] == "DeepLabImageProcessor"
    assert set(report["pipeline_labels"]) <= set(CLASS_NAMES) and report["pipeline_labels"]

    loaded = load_file(output_path)
    model = pushed["models"][stage]
    with torch.no_grad():
        expected = model(loaded["pixel_values"]).logits
    torch.testing.assert_close(loaded["logits"], expected, rtol=0, atol=0)
    reference_pixels = DeepLabImageProcessor()(images=pushed["image"], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(loaded["pixel_values"], reference_pixels, rtol=0, atol=0)


@pytest.mark.slow
def test_infer_script_runs_on_a_hub_repo_branch(pushed, tmp_path):
    image_path = tmp_path / "photo.png"
    Image.fromarray(pushed["image"]).save(image_path)
    infer = run_python(
        [str(REPO / "examples/infer.py"), "--model", REPO_ID, "--revision", "stage-1-suponly",
         "--images", str(image_path), "--output-dir", str(tmp_path / "out")],
        pushed["environment"], tmp_path,
    )  # fmt: skip
    assert infer.returncode == 0, infer.stderr[-3000:]
    assert f"{image_path}: " in infer.stdout + infer.stderr
    pixel_values = DeepLabImageProcessor()(images=pushed["image"], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = pushed["models"]["suponly"](pixel_values).logits.argmax(dim=1)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "photo_mask.png")), expected.numpy())
    assert (tmp_path / "out" / "photo_overlay.png").is_file()


@pytest.mark.slow
def test_failed_upload_raises_clear_error_and_leaves_run_intact(tiny_run, tmp_path):
    before = tree_digest(tiny_run["run_dir"])
    with FakeHub(fail_commits=True) as hub:
        push = run_python(
            [str(REPO / "examples/push_to_hub.py"), "--run-dir", str(tiny_run["run_dir"]), "--repo-id", REPO_ID],
            hub_environment(hub, tmp_path), tmp_path,
        )  # fmt: skip
    assert push.returncode != 0
    assert "HubPushError" in push.stderr and "HTTP 500" in push.stderr and REPO_ID in push.stderr
    assert "Nothing local was changed" in push.stderr
    assert tree_digest(tiny_run["run_dir"]) == before
    assert TOKEN not in push.stderr + push.stdout


def test_card_rendering_for_a_stage_and_bad_results(tiny_run, tmp_path):
    results = tiny_run["results"]
    card = build_model_card(results, REPO_ID, stage_index=2, license="apache-2.0")
    assert card.data.license == "apache-2.0"
    assert [result.metric_name for result in card.data.eval_results] == ["val mIoU (%), stage 3 retrain"]
    assert "stage-3-retrain" in card.text
    with pytest.raises(ValueError, match="trains no model"):
        build_model_card(results, REPO_ID, stage_index=1)

    bad_run = tmp_path / "bad_run"
    bad_run.mkdir()
    with pytest.raises(FileNotFoundError, match="results.json"):
        RunResults.read(bad_run)
    (bad_run / "results.json").write_text(json.dumps({key: value for key, value in results.items() if key != "final"}))
    with pytest.raises(ValueError, match="final"):
        RunResults.read(bad_run)


def test_push_refuses_a_directory_missing_remote_code(tiny_run, tmp_path):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_run["run_dir"] / "final", model_dir)
    (model_dir / "deeplab_common.py").unlink()  # imported by the modeling files
    with pytest.raises(FileNotFoundError, match="deeplab_common.py"):
        push_model_dir(model_dir, REPO_ID)  # fails before any request
    (model_dir / "modeling_deeplabv3plus.py").unlink()
    with pytest.raises(FileNotFoundError, match="modeling_deeplabv3plus.py"):
        push_model_dir(model_dir, REPO_ID)
    with pytest.raises(FileNotFoundError, match="config.json"):
        push_model_dir(tmp_path, REPO_ID)


@pytest.fixture
def in_process_hub(monkeypatch):
    """A fake Hub that this process's HfApi objects talk to (they read the endpoint when created)."""
    from huggingface_hub import constants

    with FakeHub(token=TOKEN) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        yield hub


def test_push_model_dir_private_branch_and_message(tiny_run, in_process_hub):
    final_dir = tiny_run["run_dir"] / "final"
    url = push_model_dir(
        final_dir, "tester/private-model", private=True, revision="experiment", commit_message="try 1", token=TOKEN
    )
    repo = in_process_hub.repos["tester/private-model"]
    assert url == f"{in_process_hub.url}/tester/private-model"
    assert repo.private and set(repo.branches) == {"main", "experiment"}
    assert repo.commit_messages[-1] == "try 1"
    files = in_process_hub.files("tester/private-model", "experiment")
    assert "README.md" not in files  # no card given
    assert files["model.safetensors"] == (final_dir / "model.safetensors").read_bytes()
    assert "model.safetensors" not in in_process_hub.files("tester/private-model")  # main untouched


def test_push_with_a_refused_token_names_the_status_not_the_token(tiny_run, in_process_hub):
    wrong_token = "hf_WrongTokenThatMustNotBeShown"
    with pytest.raises(HubPushError, match="HTTP 401") as error:
        push_model_dir(tiny_run["run_dir"] / "final", "tester/refused", token=wrong_token)
    assert wrong_token not in str(error.value) and "tester/refused@main" in str(error.value)
    assert "tester/refused" not in in_process_hub.repos


def test_card_pseudo_label_rows_name_their_teacher_and_show_the_selection_check(tiny_run):
    results = json.loads(json.dumps(tiny_run["results"]))
    results["framework"] = "stpp"
    results["pseudo_label_miou"] = {"reliable": 0.6, "unreliable": 0.7}
    results["stages"][1]["teacher_miou"] = {"reliable": 0.55, "unreliable": 0.45}
    text = build_model_card(results, REPO_ID).text
    assert "| reliable images, TTA labels of their stage's teacher | 60.00 |" in text
    assert "| unreliable images, SupOnly teacher without TTA | 45.00 |" in text


def test_card_base_model_names_the_hub_repo_of_the_backbone_weights(tiny_run, tmp_path):
    results = json.loads(json.dumps(tiny_run["results"]))
    results.pop("backbone_weights", None)
    assert "base_model" not in build_model_card(results, REPO_ID).data.to_dict()  # no resolved weights: no claim
    weights_file = tmp_path / "resnet18.pth"
    weights_file.write_bytes(b"")
    for spec, expected in (
        ("tv_in1k", "timm/resnet18.tv_in1k"),
        ("timm/resnet18.a1_in1k", "timm/resnet18.a1_in1k"),
        ("someone/resnet18-weights@v2", "someone/resnet18-weights"),  # metadata name a repo, not a revision
        (str(weights_file), None),
        ("none", None),
    ):
        results["backbone_weights"] = describe_backbone_weights(spec, results["backbone"])
        for stage_index in (None, 0):
            card = ModelCard(str(build_model_card(results, REPO_ID, stage_index=stage_index)))  # as pushed
            assert card.data.to_dict().get("base_model") == expected, spec
    results["backbone_weights"] = "tv_in1k"  # the spec alone says neither kind nor repo
    with pytest.raises(ValueError, match="backbone_weights must be the dict of describe_backbone_weights"):
        build_model_card(results, REPO_ID)


def test_card_embeds_the_selection_picture_uploaded_with_the_model(tiny_run, in_process_hub, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    results["stages"][1]["figure"] = "stages/2-label_all/selection.png"
    (run_dir / "results.json").write_text(json.dumps(results))
    with pytest.raises(FileNotFoundError, match="selection.png"):
        push_run_to_hub(run_dir, "tester/with-figure", token=TOKEN)
    assert "tester/with-figure" not in in_process_hub.repos  # checked before any request
    (run_dir / "stages" / "2-label_all").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(run_dir / "stages" / "2-label_all" / "selection.png")
    push_run_to_hub(run_dir, "tester/with-figure", token=TOKEN)
    files = in_process_hub.files("tester/with-figure")
    assert files["selection.png"] == (run_dir / "stages" / "2-label_all" / "selection.png").read_bytes()
    assert "![ST++ selection of reliable images](selection.png)" in files["README.md"].decode()
    assert "selection.png" not in build_model_card(results, REPO_ID, stage_index=0).text  # stage cards: no picture


def test_a_run_whose_val_set_lacks_a_class_renders_and_pushes(tiny_run, in_process_hub, tmp_path):
    # the trainer writes None for the IoU of a class that is neither predicted nor present in val
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    results["final"]["per_class_iou"]["square"] = None
    results["stages"][0]["per_class_iou"]["square"] = None
    (run_dir / "results.json").write_text(json.dumps(results))
    text = build_model_card(results, REPO_ID).text
    square_row = next(line for line in text.splitlines() if line.startswith("| square |"))
    assert square_row.split("|")[2].strip() == "n/a" and square_row.split("|")[-2].strip() == "n/a"
    push_run_to_hub(run_dir, "tester/absent-class", token=TOKEN)
    assert "n/a" in in_process_hub.files("tester/absent-class")["README.md"].decode()


def test_a_refused_token_says_how_to_log_in(tiny_run, in_process_hub):
    with pytest.raises(HubPushError, match="(?s)HTTP 401.*`hf auth login` \\(or set HF_TOKEN\\)") as error:
        push_model_dir(tiny_run["run_dir"] / "final", "tester/refused", token="hf_WrongToken")
    assert "once the Hub answers" not in str(error.value)


def test_an_unreachable_hub_is_one_clear_error_naming_the_endpoint(tiny_run, monkeypatch):
    import socket

    from huggingface_hub import constants

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    with pytest.raises(HubPushError, match=f"the Hub at {endpoint} cannot be reached") as error:
        push_run_to_hub(tiny_run["run_dir"], "tester/unreachable", token=TOKEN)
    assert error.value.__cause__ is None and error.value.__suppress_context__


@pytest.mark.slow
def test_push_script_on_an_unreachable_hub_prints_one_line_naming_the_endpoint(tiny_run, tmp_path):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    environment = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path),
                   "HF_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}  # fmt: skip
    environment.pop("HF_HUB_OFFLINE", None)
    push = run_python(
        [str(REPO / "examples/push_to_hub.py"), "--run-dir", str(tiny_run["run_dir"]), "--repo-id", REPO_ID],
        environment, tmp_path,
    )  # fmt: skip
    assert push.returncode != 0
    assert (
        push.stderr.strip().startswith("HubPushError: ") and f"the Hub at {endpoint} cannot be reached" in push.stderr
    )
    assert "Traceback" not in push.stderr


def test_card_shows_the_resolved_run_configuration(tiny_run):
    results = json.loads(json.dumps(tiny_run["results"]))
    results["config"] = {"global_batch_size": 8, "backbone_weights": "none", "data": {"val": {"num_images": 4}}}
    text = build_model_card(results, REPO_ID).text
    shown = text.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(shown) == results["config"]
    del results["config"]
    assert "run_config.json" not in build_model_card(results, REPO_ID).text


def run_with_pictures(tiny_run, run_dir: Path, **changes) -> dict:
    """A copy of the tiny run with confusion matrices, epoch histories, its pictures and a label_next export."""
    import shutil

    from stpp_hf.training.plots import draw_run_figures
    from stpp_hf.training.run_layout import RunLayout

    shutil.copytree(tiny_run["run_dir"], run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    matrix = [[50, 3, 1], [4, 20, 2], [0, 5, 9]]
    for stage in results["stages"]:
        if stage["kind"] == "train":
            stage["confusion_matrix"] = matrix
            stage["history"] = [{"epoch": 1, "loss": 1.0, "val_miou": 0.3}, {"epoch": 2, "loss": 0.9, "val_miou": 0.4}]
    results["final"]["confusion_matrix"] = matrix
    results.update(changes)
    results["figures"] = draw_run_figures(RunResults.from_json(results), RunLayout(run_dir))
    Image.new("RGB", (16, 8), (9, 8, 7)).save(run_dir / "label_next.png")
    results["label_next"] = {
        "csv": "label_next.csv",
        "figure": "label_next.png",
        "images": [{"id": "train_00042", "image": "JPEGImages/train_00042.jpg", "reliability": 0.125}],
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    return results


HUB_DATASET = {
    "dataset_name": "tester/shapes", "dataset_config": None, "image_column": "image", "label_column": "label",
    "train_split": "train", "val_split": "validation",
    "partition": {"num_labeled": 8, "labeled_fraction": None, "num_rows": 20, "partition_seed": 0},
}  # fmt: skip


def test_pushed_repo_holds_both_evaluation_forms_and_embeds_the_pictures(tiny_run, in_process_hub, tmp_path):
    import yaml
    from huggingface_hub import parse_eval_result_entries

    run_dir = tmp_path / "run"
    results = run_with_pictures(tiny_run, run_dir, hub_dataset=HUB_DATASET)
    push_run_to_hub(run_dir, "tester/pictures", token=TOKEN, push_stages=True)
    files = in_process_hub.files("tester/pictures")
    card = ModelCard(files["README.md"].decode())
    # model-index, as before
    indexed = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert indexed["val mIoU (%), final model"] == round(100 * results["final"]["val_miou"], 2)
    # .eval_results: the final model and each training stage, on the Hub dataset's val split
    expected = {".eval_results/final.yaml": results["final"]["val_miou"]}
    expected |= {
        f".eval_results/stage-{index + 1}-{stage['name']}.yaml": stage["val_miou"]
        for index, stage in enumerate(results["stages"])
        if stage["kind"] == "train"
    }
    assert {name for name in files if name.startswith(".eval_results/")} == set(expected)
    for name, miou in expected.items():
        (entry,) = parse_eval_result_entries(yaml.safe_load(files[name]))
        assert (entry.dataset_id, entry.task_id, entry.value) == ("tester/shapes", "validation", round(100 * miou, 2))
        assert "Hub dataset tester/shapes" in entry.notes
    branch = in_process_hub.files("tester/pictures", "stage-1-suponly")
    assert {name for name in branch if name.startswith(".eval_results/")} == {".eval_results/stage-1-suponly.yaml"}
    # the pictures, uploaded at their run-directory paths and embedded in the final card only
    pictures = [*results["figures"].values(), "label_next.png"]
    assert set(results["figures"]) == {"val_miou_per_epoch", "confusion_final", "confusion_suponly", "per_class_iou"}
    for path in pictures:
        assert files[path] == (run_dir / path).read_bytes()
        assert f"]({path})" in card.text
        assert f"]({path})" not in ModelCard(branch["README.md"].decode()).text
    assert "| 1 | train_00042 | 0.1250 |" in card.text and "not part of the method" in card.text


def test_card_names_the_final_model_and_marks_a_stage_that_lowered_val_miou(tiny_run):
    results = json.loads(json.dumps(tiny_run["results"]))
    results["stages"][2]["val_miou"] = 0.35  # re-training below SupOnly's 0.41
    text = build_model_card(results, REPO_ID).text
    assert "| stage 3 retrain | 35.00 | lower than the stage before (-6.00) |" in text
    assert "| stage 1 suponly | 41.00 |  |" in text
    note = "The final model (`final/`, on `main`) is the best-on-val model of the last stage, 3 ST (re-training)"
    assert note in text
    assert "not swapped in" in text


def test_a_local_dataset_is_named_without_claiming_a_hub_dataset(tiny_run):
    import yaml

    from stpp_hf.model_card import eval_result_files

    files = eval_result_files(RunResults.from_json(tiny_run["results"]))
    (entry,) = yaml.safe_load(files[".eval_results/final.yaml"])
    assert entry["dataset"] == {"id": "synthetic", "task_id": "val"} and "not a Hub dataset" in entry["notes"]


def test_card_shows_the_aggregate_of_the_runs_the_model_belongs_to(tiny_run, in_process_hub, tmp_path):
    import statistics

    runs = []
    for index, final in enumerate([0.50, 0.54, 0.49]):
        results = json.loads(json.dumps(tiny_run["results"]))
        results["split"], results["final"]["val_miou"] = f"split_{index}", final
        runs.append(run_with_pictures(tiny_run, tmp_path / f"run{index}", **results))
    run_dirs = [tmp_path / f"run{index}" for index in range(3)]
    push_run_to_hub(run_dirs[0], "tester/aggregate", token=TOKEN, comparison_runs=run_dirs[1:])
    files = in_process_hub.files("tester/aggregate")
    text = files["README.md"].decode()
    finals = [run["final"]["val_miou"] for run in runs]
    mean, std = 100 * statistics.mean(finals), 100 * statistics.stdev(finals)
    assert "### Over 3 splits: mean ± std" in text
    assert f"| final (st) | {mean:.2f} ± {std:.2f} | 49.00 | 54.00 | 3 |" in text
    assert "](comparison.png)" in text and files["comparison.png"].startswith(b"\x89PNG")
    other = tmp_path / "other"
    run_with_pictures(tiny_run, other, backbone="resnet50")
    with pytest.raises(ValueError, match="another backbone are not comparable"):
        push_run_to_hub(run_dirs[0], "tester/refused-aggregate", token=TOKEN, comparison_runs=[other])
    assert "tester/refused-aggregate" not in in_process_hub.repos


@pytest.mark.parametrize("damage", ["nan_in_results", "nan_in_weights"])
def test_push_refuses_a_run_with_non_finite_values_before_any_upload(tiny_run, in_process_hub, tmp_path, damage):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run_dir)
    if damage == "nan_in_results":  # as a diverged run written without strict JSON
        results = (run_dir / "results.json").read_text().replace('"val_miou": 0.5234', '"val_miou": NaN')
        (run_dir / "results.json").write_text(results)
        expected = "results.json holds NaN"
    else:
        weights = load_file(run_dir / "final" / "model.safetensors")
        next(tensor for tensor in weights.values() if tensor.is_floating_point()).fill_(float("nan"))
        save_file(weights, run_dir / "final" / "model.safetensors")
        expected = "model.safetensors holds non-finite weights in 1 of"
    with pytest.raises((ValueError, RuntimeError), match=expected):
        push_run_to_hub(run_dir, REPO_ID, token=TOKEN)
    assert in_process_hub.repos == {}
