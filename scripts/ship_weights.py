"""Turn a training run's export into a shipped weight: the offline mirror folder plus its sha256.

    python scripts/ship_weights.py runs/fashion_mnist/bam_resnet20/export bam_resnet20.fmnist --command "..."
    python scripts/ship_weights.py bam_resnet20.fmnist --update-card   # after editing its config.json

A run that started from a shipped weight (``--model.model_name resnet56.fmnist_long``, with or without
``--model.add_bam true``) ships with its lineage: that weight, its command and time, and the time of both. So does
a run that started from a kept run's export (``--model.pretrained_file results/seed_study/.../export``, a further
warm restart): that run's command and time from its records, chained back to the shipped weight it began from.

Writes ``checkpoints/<arch>.<tag>/`` (config.json, model.safetensors, README.md) with the tag's own
pretrained cfg (``bam_zoo.models.pretrained.fashion_mnist_cfg``). Its config.json's ``bam_zoo.details`` is
where the weight's facts are written, once: test top-1/top-5 from the run's ``metrics.json``, per class,
parameters, MACs, the run's training time and the top-1 with test-time flip it measures. Prints the
``WEIGHT_METADATA`` entry (the sha256) to paste into ``bam_zoo/models/pretrained.py``; then regenerate
MODEL_CARD.md and README's table (``python scripts/model_card.py``).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch.nn as nn
from safetensors.torch import load_file

import bam_zoo
from bam_zoo.evaluate import measure
from bam_zoo.hub import save_pretrained, write_card
from bam_zoo.models.pretrained import (
    FASHION_MNIST_TAGS, FASHION_MNIST_TWINS, fashion_mnist_cfg, sha256sum, weight_facts,
)

ROOT = Path(__file__).resolve().parents[1]


def describe_architecture(model: nn.Module, name: str) -> str:
    """One line on where the network has BAMs and how they are built, read from the built model itself."""
    bams = bam_zoo.bam_modules(model)
    if not bams:
        bam_name = next((b for b, t in FASHION_MNIST_TWINS.items() if t == name), f"bam_{name.split('.')[0]}")
        return f"`{name.split('.')[0]}`, {type(model).__name__} without attention (the plain twin of `{bam_name}`)"
    first = bams[0][1]
    dilated = [m for m in first.spatial_attn.modules() if isinstance(m, nn.Conv2d) and m.dilation[0] > 1]
    where = ", ".join(f"`{path.removesuffix('.bam')}` ({bam.channels} ch, {bam.rd_channels} hidden)"
                      for path, bam in bams)
    inserted = getattr(model, "bam_insertion", None)
    what = (f"`{inserted['base_model']}` ({type(model).__name__}) with BAM added by `bam_zoo.add_bam` (each BAM scaled "
            "by a learned gamma that starts at 0, so training starts from the plain network's function):"
            if inserted else f"`{name.split('.')[0]}`, {type(model).__name__} with")
    dilation = dilated[0].dilation[0] if dilated else "-"
    return f"{what} a BAM after {where}; {len(dilated)} 3x3 convs of dilation {dilation} in the spatial branch, " \
           f"{first.fusion} fusion"


def checkpoint_details(model: nn.Module, name: str, meta: Mapping[str, Any]) -> Dict[str, Any]:
    """The card facts of a Fashion-MNIST weight (:func:`bam_zoo.hub.render_details` keys), for its config.json."""
    return {
        "architecture": describe_architecture(model, name), "num_params": meta["num_params"],
        "macs": meta["macs"], "input_size": [1, 28, 28], "data": "Fashion-MNIST, 55,000 training images (5,000 "
        "more held out for validation, fixed seed 0), tested on the official 10,000", "recipe": meta["recipe"],
        "command": meta["command"], "epochs": meta["epochs"], "train_time_s": meta["train_time_s"],
        "train_setting": train_setting(meta["command"], meta["machines"]),
        "seed": meta["seed"], "top1": meta["top1"], "top5": meta["top5"], "per_class": meta["per_class"],
        "top1_flip": meta["top1_flip"], **lineage(meta["base_weights"], meta["train_time_s"]),
    }


def train_setting(command: str, machines: list[str]) -> str:
    """Where the run trained: this machine's CPU, or each start's machine as the seed study recorded it (a run
    can begin on a rented GPU and go on here); on the CPU, how many of its 2 cores the run had."""
    threads = "one thread, with another run on the other core" if command.startswith("OMP_NUM_THREADS=1 ") \
        else "both cores"
    if not machines:
        return f"2-core CPU ({cpu_description()}), {threads}"
    return "; then ".join(machines) + (f"; on the CPU {threads}" if any("CPU" in m for m in machines) else "")


def cpu_description() -> str:
    """This machine's CPU as ``/proc/cpuinfo`` names it, and its widest vector unit: training times depend on both."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields.get('model name') or platform.processor() or 'unknown CPU'}, {vector}"


def lineage(base: Optional[str], train_time_s: float) -> Dict[str, Any]:
    """A fine-tune's start: the weight it began from, how that was trained, and the time of all training
    together, back to the first weight when the start was itself a fine-tune (whose own record has its start)."""
    if base is None:
        return {}
    facts = start_facts(base)
    earlier = {"base_fine_tuned_from": facts["fine_tuned_from"]} if "fine_tuned_from" in facts else {}
    return {"fine_tuned_from": base, "base_command": facts["command"], "base_epochs": facts["epochs"], **earlier,
            "base_train_time_s": facts["train_time_s"], "total_train_time_s": all_training_s(facts) + train_time_s}


def all_training_s(facts: Mapping[str, Any]) -> int:
    """A weight's training time back to its first start: its own, when it was trained from scratch."""
    return facts.get("total_train_time_s", facts["train_time_s"])


def start_of(run: Mapping[str, Any]) -> Optional[str]:
    """What a run's weights began from: a kept run export it loaded (``--model.pretrained_file``), a shipped weight
    (``--model.pretrained true`` with a tag as ``model_name``), or None for a run from scratch."""
    model = run["recipe"]["model"]
    if model.get("pretrained_file"):
        return str(model["pretrained_file"])
    return run["model_name"] if model.get("pretrained") and run["model_name"] in FASHION_MNIST_TAGS else None


def start_facts(start: str) -> Dict[str, Any]:
    """How a start was trained: a shipped weight's recorded facts, or a kept run export's own records (its
    metrics.json, and the command.txt the seed study keeps beside it) chained back to where that run began."""
    if start in FASHION_MNIST_TAGS:
        return weight_facts(start)
    export = Path(start) if Path(start).is_absolute() else ROOT / start  # runs record paths from the repo root
    if not (export / "metrics.json").is_file() or not (export.parent / "command.txt").is_file():
        raise SystemExit(f"the run began from {start}, which is neither a shipped weight nor a kept run export "
                         "(metrics.json in it, command.txt beside it): its lineage cannot be recorded, nothing "
                         "shipped. Keep the start's run folder as scripts/seed_study.py does.")
    run = json.loads((export / "metrics.json").read_text())
    command = (export.parent / "command.txt").read_text().strip()  # as the study ran it: each start resumes "last"
    facts = {"command": command.removesuffix(" --ckpt_path last"), "epochs": run["epochs"],
             "train_time_s": round(run["train_wall_time_s"])}
    base = start_of(run)
    if base is None:
        return facts
    earlier = start_facts(base)
    return {**facts, "fine_tuned_from": base, "total_train_time_s": all_training_s(earlier) + facts["train_time_s"]}


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
                        help="no export_dir: rewrite a shipped weight's README.md from its config.json (after "
                             "editing its facts there), leaving the weights untouched")
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints")
    args = parser.parse_args()

    arch, tag = args.name.split(".", 1)
    if args.update_card:
        folder = args.out / args.name
        write_card(folder, num_params=weight_facts(args.name, folder)["num_params"],
                   repo_id=fashion_mnist_cfg(arch, tag)["hf_hub_id"])
        print(f"rewrote {folder}/README.md")
        return
    if args.export_dir is None or args.command is None:
        parser.error("give export_dir and --command (or --update-card for a shipped weight)")
    run = json.loads((args.export_dir / "metrics.json").read_text())
    model = bam_zoo.create_model(run["model_name"], **run["model_args"])  # as trained: a tag's fine-tune, add_bam
    built = model.pretrained_cfg["architecture"]
    if built != arch:
        raise SystemExit(f"{args.export_dir} holds a {built} ({run['model_name']} {run['model_args']}), not a {arch}.")
    model.load_state_dict(load_file(args.export_dir / "model.safetensors"), strict=True)
    base = start_of(run)  # lineage: the shipped weight or kept run export the run loaded
    cfg = fashion_mnist_cfg(arch, tag)
    model.pretrained_cfg = {**model.pretrained_cfg, **cfg, "architecture": arch, "tag": tag}
    metrics = {"top1": round(100 * run["test"]["acc1"], 2), "top5": round(100 * run["test"]["acc5"], 2)}
    measured = measure(model)  # what `python -m bam_zoo.evaluate` will measure, plus test-time flip
    if abs(measured["top1"] - metrics["top1"]) > 0.05:
        raise SystemExit(f"{args.export_dir}: the run's test top-1 {metrics['top1']} but the exported weights "
                         f"measure {measured['top1']:.2f}; export and run disagree, nothing shipped.")
    facts = {
        "dataset": "fashion_mnist", **metrics, "top1_flip": round(measured["top1_flip"], 2),
        "per_class": {k: round(100 * v, 2) for k, v in run["per_class_acc1"].items()},
        "num_params": bam_zoo.count_params(model), "macs": bam_zoo.count_macs(model, cfg["input_size"]),
        "epochs": run["epochs"], "seed": run["recipe"]["seed_everything"],
        "train_time_s": round(run["train_wall_time_s"]), "recipe": recipe_of(args.command), "command": args.command,
        "base_weights": base, "machines": (args.export_dir.parent / "machine.txt").read_text().splitlines()
        if (args.export_dir.parent / "machine.txt").is_file() else [],  # a seed-study run kept under results/
    }
    out = save_pretrained(
        model, args.out / args.name, model_name=args.name, label_names=list(cfg["label_names"]),
        metrics=metrics, dataset="fashion_mnist", recipe=run.get("recipe"),
        model_args={k: v for k, v in run["model_args"].items() if k != "add_bam"},  # the built architecture's own
        repo_id=cfg["hf_hub_id"], details=checkpoint_details(model, args.name, facts))
    metadata = {"sha256": sha256sum(out / "model.safetensors")}
    if getattr(model, "bam_insertion", None):  # the tag must rebuild the inserted network without its config.json
        metadata["model_args"] = {k: model.bam_insertion[k] for k in ("base_model", "bam_stages")}
    print(f"wrote {out}\nWEIGHT_METADATA entry:\n    {json.dumps(args.name)}: {json.dumps(metadata)},")


if __name__ == "__main__":
    main()
