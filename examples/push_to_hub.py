"""Push a finished stpp_hf run (or any save_pretrained directory) to the Hugging Face Hub with a model card.

    python examples/push_to_hub.py --run-dir runs/stpp --repo-id you/deeplabv3plus-stpp-pascal --push-stages
    python examples/push_to_hub.py --model-dir runs/stpp/final --repo-id you/my-model --revision experiment
    python examples/push_to_hub.py --run-dir runs/stpp --pseudo-labels-repo you/stpp-pseudo-labels   # a dataset repo
    python examples/push_to_hub.py --run-dir runs/seed0 --repo-id you/model --compare-runs runs/seed1 runs/seed2

The token comes from huggingface_hub's usual sources (`HF_TOKEN`, `hf auth login`); it is never printed.
"""

import argparse

from stpp_hf.hub import HubPushError, push_model_dir, push_run_to_hub
from stpp_hf.model_card import DEFAULT_LICENSE


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="Run directory of examples/train_stpp.py (pushes final/ with a card).")
    source.add_argument("--model-dir", help="Any save_pretrained directory (pushed without a card).")
    parser.add_argument("--repo-id", help="Hub model repo, 'user/name' (created if needed).")
    parser.add_argument(
        "--pseudo-labels-repo",
        help="Also (or only) push the run's pseudo labels to this Hub dataset repo (with --run-dir).",
    )
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--revision", default=None, help="Branch to push to (default main).")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument(
        "--push-stages", action="store_true", help="Also push each stage's best model to branch stage-<n>-<name>."
    )
    parser.add_argument(
        "--license", default=DEFAULT_LICENSE, help="License metadata of the model card (with --run-dir)."
    )
    parser.add_argument(
        "--compare-runs",
        nargs="+",
        default=None,
        metavar="RUN_DIR",
        help="Other runs (seeds, splits) of this model: the card shows the mean ± std of them and --run-dir.",
    )
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.repo_id is None and args.pseudo_labels_repo is None:
        raise SystemExit("give --repo-id (the model) and/or --pseudo-labels-repo (the pseudo labels, with --run-dir)")
    if args.pseudo_labels_repo is not None and args.run_dir is None:
        raise SystemExit("--pseudo-labels-repo needs --run-dir (the pseudo labels of a finished run)")
    if args.compare_runs and args.run_dir is None:
        raise SystemExit("--compare-runs needs --run-dir (the run the pushed model comes from)")
    if args.push_stages and args.run_dir is None:
        raise SystemExit("--push-stages needs --run-dir (a model directory has no stages)")
    try:
        url = push(args)
    except HubPushError as error:  # one clear message (status or endpoint, and what to do), no traceback
        raise SystemExit(f"HubPushError: {error}") from None
    if url is not None:
        print(f"pushed to {url}")
    return url


def push(args: argparse.Namespace) -> str | None:
    """Push the pseudo labels (if asked), then the model; the model repo's URL, or None with no --repo-id."""
    if args.pseudo_labels_repo is not None:
        from stpp_hf.hub_pseudo_labels import push_pseudo_labels

        print(
            "pushed pseudo labels to "
            f"{push_pseudo_labels(args.run_dir, args.pseudo_labels_repo, private=args.private)}"
        )
        if args.repo_id is None:
            return None
    if args.run_dir is not None:
        return push_run_to_hub(
            args.run_dir, args.repo_id, private=args.private, revision=args.revision,
            commit_message=args.commit_message, push_stages=args.push_stages, license=args.license,
            comparison_runs=args.compare_runs,
        )  # fmt: skip
    return push_model_dir(
        args.model_dir, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message
    )


if __name__ == "__main__":
    main()
