"""Where a DeepLab backbone's initial weights come from: a timm pretrained tag, a Hub repo, a local file, or none.

`describe_backbone_weights(spec, backbone)` checks a `--backbone_weights` value without downloading anything;
`load_backbone_weights(model, spec)` loads it into a DeepLabV3+ / DeepLabV2 backbone. Hub weights come through
timm's Hub loaders, so through huggingface_hub's download and cache (`HF_HOME`, `HF_HUB_OFFLINE=1`); files go
through the model's own `load_backbone_weights(path)`. Both end in `model.load_backbone_state_dict`, which checks
every key and shape. A training-time step: this module is not part of the remote code saved next to models.

The method starts from torchvision's ImageNet ResNets, published for timm as `timm/<resnet>.tv_in1k`; any other
timm backbone starts from the timm tag or Hub repo given for it (e.g. `convnext_base.fb_in22k_ft_in1k`,
`vit_base_patch14_dinov2.lvd142m`). The weights are always loaded here, explicitly: the model config has no
"pretrained backbone" flag.
"""

import json
import os
import pickle

import timm
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from timm.models import get_pretrained_cfg, load_model_config_from_hf, load_state_dict_from_hf
from torch import nn

OPTION = "--backbone_weights"
WEIGHT_FILE_SUFFIXES = (".pth", ".safetensors", ".bin")
HUB_PREFIX = "hf-hub:"  # timm's prefix for Hub model names, accepted here too


def _timm_tag_of_hub_id(hub_id: str) -> str | None:
    """`"resnet101.tv_in1k"` for `"timm/resnet101.tv_in1k"` (a repo timm's registry publishes); else None."""
    owner, _, name = hub_id.partition("/")
    if owner != "timm" or name not in timm.list_pretrained(name):
        return None
    return name


def _known_tags(backbone: str) -> str:
    """timm's pretrained tags of `backbone`, for error messages."""
    return ", ".join(timm.list_pretrained(f"{backbone}.*")) or "none"


def _check_architecture(spec: str, architecture: str, backbone: str):
    if architecture != backbone:
        raise ValueError(
            f"{OPTION} {spec!r} holds {architecture} weights, but the model's backbone is {backbone}: give "
            f"{backbone} weights (timm's tags for it: {_known_tags(backbone)}) or make the backbone {architecture}"
        )


def _describe_timm_tag(spec: str, backbone: str) -> str:
    """The Hub id of the timm pretrained tag `spec` (`resnet101.tv_in1k`, or `tv_in1k` for `<backbone>.tv_in1k`)."""
    name = spec if "." in spec else f"{backbone}.{spec}"
    if name not in timm.list_pretrained(name):
        raise ValueError(
            f"{OPTION} {spec!r}: timm has no pretrained weights named {name!r}. "
            f"The {backbone} weights timm knows: {_known_tags(backbone)} "
            f"(`python -c \"import timm; print(timm.list_pretrained('{backbone}*'))\"` lists them). A Hub repo id "
            f"(owner/name), a local {' / '.join(WEIGHT_FILE_SUFFIXES)} file or 'none' are also accepted."
        )
    _check_architecture(spec, name.partition(".")[0], backbone)
    hub_id = get_pretrained_cfg(name).hf_hub_id
    if not hub_id:
        raise ValueError(f"{OPTION} {spec!r}: timm publishes {name} at a URL only, not on the Hub; pass a local file")
    return hub_id


def describe_backbone_weights(spec: str, backbone: str) -> dict:
    """Check a `--backbone_weights` value for a model whose backbone is the timm architecture `backbone`; downloads
    nothing.

    `spec` is one of:
    - `none`: keep the random initialisation;
    - a timm pretrained tag, `resnet101.tv_in1k`, `convnext_base.fb_in22k_ft_in1k`,
      `vit_base_patch14_dinov2.lvd142m` (its architecture must be `backbone`), or the short `tv_in1k` for
      `<backbone>.tv_in1k`;
    - a Hub repo id holding timm weights (`timm/resnet101.a1h_in1k`, any `owner/name`, optionally `@revision`);
    - a local `.pth` / `.safetensors` / `.bin` file of timm layout (for ResNets also torchvision's).

    Returns:
        `dict`: `{"spec": spec, "kind": "hub" | "file" | "none", "hub_id": Hub repo id or None, "path": absolute path
        or None}`

    Raises:
        FileNotFoundError: a weights file that does not exist.
        ValueError: an unknown tag, weights of another architecture, or a value of none of these forms.
    """
    description = {"spec": spec, "kind": "none", "hub_id": None, "path": None}
    if spec.lower() == "none":
        return description
    if spec.lower().endswith(WEIGHT_FILE_SUFFIXES):
        path = os.path.abspath(os.path.expanduser(spec))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{OPTION} file not found: {path}")
        return {**description, "kind": "file", "path": path}
    if os.path.exists(spec):
        raise ValueError(f"{OPTION} {spec!r} is a local path but not a {' / '.join(WEIGHT_FILE_SUFFIXES)} file")
    name = spec.removeprefix(HUB_PREFIX)
    if "/" not in name:
        return {**description, "kind": "hub", "hub_id": _describe_timm_tag(spec, backbone)}
    repo_id, _, revision = name.partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{OPTION} {spec!r} is neither a {' / '.join(WEIGHT_FILE_SUFFIXES)} file nor a valid Hub repo id "
            f"(owner/name[@revision]): {error}"
        ) from error
    if "@" in name and not revision:
        raise ValueError(f"{OPTION} {spec!r} has an empty revision after '@'")
    tag = _timm_tag_of_hub_id(repo_id)
    if tag is not None:
        _check_architecture(spec, tag.partition(".")[0], backbone)
    return {**description, "kind": "hub", "hub_id": name}


def _download_hub_state_dict(spec: str, hub_id: str, backbone: str) -> dict:
    """The state dict of the Hub repo `hub_id` (`owner/name[@revision]`), through timm's Hub loaders and the HF cache.

    A repo outside timm's registry must hold a timm `config.json` (as timm's `hf-hub:` models do): its architecture
    is checked before the weights are downloaded.
    """
    repo_id, _, revision = hub_id.partition("@")
    try:
        if _timm_tag_of_hub_id(repo_id) is None:
            _, architecture, _ = load_model_config_from_hf(hub_id)
            _check_architecture(spec, architecture, backbone)
        return load_state_dict_from_hf(hub_id, weights_only=True)
    except LocalEntryNotFoundError as error:
        command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        raise FileNotFoundError(
            f"{OPTION} {spec!r}: the weights of Hub repo {hub_id} are not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and could not be downloaded (HF_HUB_OFFLINE=1, or no connection to "
            f"{constants.ENDPOINT}). Fetch them where there is a connection with `{command}` into the same cache "
            f"(HF_HOME), or pass a local file: {OPTION} path/to/{backbone}.safetensors (timm layout)."
        ) from error
    except (SafetensorError, json.JSONDecodeError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        damaged = _damaged_cache_error(spec, repo_id, revision, error)
        if damaged is None:
            raise
        raise damaged from error
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        raise ValueError(
            f"{OPTION} {spec!r}: Hub repo {hub_id} cannot be used as timm weights (a timm repo holds config.json and "
            f"model.safetensors or pytorch_model.bin; a private or gated one needs `hf auth login`): {error}"
        ) from error


def _damaged_cache_error(spec: str, repo_id: str, revision: str, error: Exception) -> OSError | None:
    """The error naming the cached file of Hub repo ``repo_id`` that ``error`` (from reading it) shows is damaged,
    e.g. truncated by a full disk or a killed download, and how to fetch it again; ``None`` if no such file is
    cached (then ``error`` came from elsewhere)."""
    if isinstance(error, SafetensorError):
        filename = "model.safetensors"
    elif isinstance(error, json.JSONDecodeError):
        filename = "config.json"
    else:
        filename = "pytorch_model.bin"  # torch.load's errors on a torn zip or pickle
    cached = try_to_load_from_cache(repo_id, filename, revision=revision or None)
    if not isinstance(cached, str):
        return None
    command = f"hf download {repo_id} {filename} --force-download" + (f" --revision {revision}" if revision else "")
    return OSError(
        f"{OPTION} {spec!r}: the file {filename} of Hub repo {repo_id} in the Hugging Face cache is damaged "
        f"({type(error).__name__}: {error}); it is {os.path.realpath(cached)}. Fetch it again with `{command}` "
        f"(same HF_HOME), or delete that file and relaunch with a connection to {constants.ENDPOINT}"
    )


def load_backbone_weights(model: nn.Module, spec: str) -> dict:
    """Initialise the backbone of `model` (a DeepLabV3+ / DeepLabV2 of `stpp_hf.models`) as `spec` says.

    `spec` takes the forms of `describe_backbone_weights`. With `HF_HUB_OFFLINE=1` Hub weights come from the cache,
    and weights missing there are a `FileNotFoundError` that says how to fetch them. The classifier (`fc.*`) is
    ignored; any other missing, unexpected or wrongly shaped key is a `ValueError` naming the source.

    Returns:
        `dict`: the `describe_backbone_weights` dict of `spec`.
    """
    backbone = model.config.backbone
    description = describe_backbone_weights(spec, backbone)
    if description["kind"] == "file":
        model.load_backbone_weights(description["path"])
    elif description["kind"] == "hub":
        hub_id = description["hub_id"]
        state_dict = _download_hub_state_dict(spec, hub_id, backbone)
        model.load_backbone_state_dict(state_dict, f"{OPTION} {spec!r} (Hub repo {hub_id})")
    return description


__all__ = ["describe_backbone_weights", "load_backbone_weights"]
