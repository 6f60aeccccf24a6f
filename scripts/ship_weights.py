"""Turn a training run's export into a shipped weight: the offline mirror folder plus its metadata entry.

    python scripts/ship_weights.py runs/fashion_mnist/bam_resnet20/export bam_resnet20.fmnist

Writes ``checkpoints/<arch>.<tag>/`` (config.json, model.safetensors, README.md) with the tag's own
pretrained cfg (``bam_zoo.models.pretrained.fashion_mnist_cfg``), and prints the ``WEIGHT_METADATA`` entry to
paste into ``bam_zoo/models/pretrained.py``: test top-1/top-5 from the run's ``metrics.json``, parameters,
MACs, sha256 of the weights and the run's training time.
"""
from __future__ import annotations

import argparse
import json
import pprint
from pathlib import Path

from safetensors.torch import load_file

import bam_zoo
from bam_zoo.hub import save_pretrained
from bam_zoo.models.pretrained import fashion_mnist_cfg, sha256sum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path, help="a run's export folder (with metrics.json)")
    parser.add_argument("name", help="arch.tag, e.g. bam_resnet20.fmnist")
    parser.add_argument("--command", required=True, help="the exact command that trained the run")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "checkpoints")
    args = parser.parse_args()

    arch, tag = args.name.split(".", 1)
    run = json.loads((args.export_dir / "metrics.json").read_text())
    if run["model_name"] != arch:
        raise SystemExit(f"{args.export_dir} holds a {run['model_name']}, not a {arch}.")
    model = bam_zoo.create_model(arch, in_chans=1, num_classes=10)
    model.load_state_dict(load_file(args.export_dir / "model.safetensors"), strict=True)
    cfg = fashion_mnist_cfg(arch, tag)
    model.pretrained_cfg = {**model.pretrained_cfg, **cfg, "architecture": arch, "tag": tag}
    metrics = {"top1": round(100 * run["test"]["acc1"], 2), "top5": round(100 * run["test"]["acc5"], 2)}
    out = save_pretrained(
        model, args.out / args.name, model_name=args.name, label_names=list(cfg["label_names"]),
        metrics=metrics, dataset="fashion_mnist", recipe=run.get("recipe"), model_args=run["model_args"],
        repo_id=cfg["hf_hub_id"])
    entry = {
        "dataset": "fashion_mnist", **metrics,
        "num_params": bam_zoo.count_params(model), "macs": bam_zoo.count_macs(model, cfg["input_size"]),
        "epochs": run["epochs"], "train_time_s": round(run["train_wall_time_s"]),
        "recipe": f"configs/fashion_mnist/{arch}.yaml", "command": args.command,
        "sha256": sha256sum(out / "model.safetensors"),
    }
    print(f"wrote {out}\nWEIGHT_METADATA entry:")
    pprint.pprint({args.name: entry}, sort_dicts=False, width=110)


if __name__ == "__main__":
    main()
