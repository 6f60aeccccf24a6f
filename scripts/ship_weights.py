"""Turn a training run's export into a shipped weight: the offline mirror folder plus its metadata entry.

    python scripts/ship_weights.py runs/fashion_mnist/bam_resnet20/export bam_resnet20.fmnist --command "..."
    python scripts/ship_weights.py bam_resnet20.fmnist --update-card   # after editing its metadata

Writes ``checkpoints/<arch>.<tag>/`` (config.json, model.safetensors, README.md) with the tag's own
pretrained cfg (``bam_zoo.models.pretrained.fashion_mnist_cfg``), and prints the ``WEIGHT_METADATA`` entry to
paste into ``bam_zoo/models/pretrained.py``: test top-1/top-5 from the run's ``metrics.json``, parameters,
MACs, sha256 of the weights and the run's training time, and the top-1 with test-time flip it measures.
"""
from __future__ import annotations

import argparse
import json
import pprint
import shlex
from pathlib import Path

from safetensors.torch import load_file

import bam_zoo
from bam_zoo.evaluate import measure
from bam_zoo.hub import save_pretrained, write_card
from bam_zoo.model_card import checkpoint_details
from bam_zoo.models.pretrained import WEIGHT_METADATA, fashion_mnist_cfg, sha256sum


def recipe_of(command: str) -> str:
    """The config file the training command names (``--config PATH``), the recipe the card links to."""
    words = shlex.split(command)
    configs = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--config"]
    configs += [word.split("=", 1)[1] for word in words if word.startswith("--config=")]
    if len(configs) != 1:
        raise SystemExit(f"--command must name exactly one --config PATH (the recipe), got: {command!r}")
    return configs[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path, nargs="?", help="a run's export folder (with metrics.json)")
    parser.add_argument("name", help="arch.tag, e.g. bam_resnet20.fmnist")
    parser.add_argument("--command", help="the exact command that trained the run (required with export_dir)")
    parser.add_argument("--update-card", action="store_true",
                        help="no export_dir: rewrite a shipped weight's card facts (config.json, README.md) from "
                             "its WEIGHT_METADATA entry, leaving the weights untouched")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "checkpoints")
    args = parser.parse_args()

    arch, tag = args.name.split(".", 1)
    if args.update_card:
        folder = args.out / args.name
        config = json.loads((folder / "config.json").read_text())
        config["bam_zoo"]["details"] = checkpoint_details(args.name, WEIGHT_METADATA[args.name])
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        write_card(folder, num_params=WEIGHT_METADATA[args.name]["num_params"],
                   repo_id=fashion_mnist_cfg(arch, tag)["hf_hub_id"])
        print(f"rewrote {folder}/config.json and README.md")
        return
    if args.export_dir is None or args.command is None:
        parser.error("give export_dir and --command (or --update-card for a shipped weight)")
    run = json.loads((args.export_dir / "metrics.json").read_text())
    if run["model_name"] != arch:
        raise SystemExit(f"{args.export_dir} holds a {run['model_name']}, not a {arch}.")
    model = bam_zoo.create_model(arch, in_chans=1, num_classes=10)
    model.load_state_dict(load_file(args.export_dir / "model.safetensors"), strict=True)
    cfg = fashion_mnist_cfg(arch, tag)
    model.pretrained_cfg = {**model.pretrained_cfg, **cfg, "architecture": arch, "tag": tag}
    metrics = {"top1": round(100 * run["test"]["acc1"], 2), "top5": round(100 * run["test"]["acc5"], 2)}
    measured = measure(model)  # what `python -m bam_zoo.evaluate` will measure, plus test-time flip
    if abs(measured["top1"] - metrics["top1"]) > 0.05:
        raise SystemExit(f"{args.export_dir}: the run's test top-1 {metrics['top1']} but the exported weights "
                         f"measure {measured['top1']:.2f}; export and run disagree, nothing shipped.")
    entry = {
        "dataset": "fashion_mnist", **metrics, "top1_flip": round(measured["top1_flip"], 2),
        "per_class": {k: round(100 * v, 2) for k, v in run["per_class_acc1"].items()},
        "num_params": bam_zoo.count_params(model), "macs": bam_zoo.count_macs(model, cfg["input_size"]),
        "epochs": run["epochs"], "seed": run["recipe"]["seed_everything"], "train_time_s": round(run["train_wall_time_s"]),
        "recipe": recipe_of(args.command), "command": args.command,
    }
    out = save_pretrained(
        model, args.out / args.name, model_name=args.name, label_names=list(cfg["label_names"]),
        metrics=metrics, dataset="fashion_mnist", recipe=run.get("recipe"), model_args=run["model_args"],
        repo_id=cfg["hf_hub_id"], details=checkpoint_details(args.name, entry))
    entry["sha256"] = sha256sum(out / "model.safetensors")
    print(f"wrote {out}\nWEIGHT_METADATA entry:")
    pprint.pprint({args.name: entry}, sort_dicts=False, width=110)


if __name__ == "__main__":
    main()
