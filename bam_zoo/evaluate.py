"""Check the zoo: load shipped weights by name and measure them on the official Fashion-MNIST test set.

    python -m bam_zoo.evaluate                     # every shipped Fashion-MNIST weight
    python -m bam_zoo.evaluate bam_resnet20.fmnist # one of them

Weights come through the path users take (``bam_zoo.create_model(name, pretrained=True)``). It exits non-zero
when a measurement (top-1, top-1 with test-time flip, or a class's top-1) disagrees with the weight's record.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torchmetrics.classification import MulticlassAccuracy

import bam_zoo
from bam_zoo.models.pretrained import FASHION_MNIST_TAGS, WEIGHT_METADATA, weight_facts
from bam_zoo.training.data import FashionMNISTDataModule

__all__ = ["evaluate", "measure", "main"]


def evaluate(name: str, root: Optional[str] = None, batch_size: int = 500) -> Dict[str, float]:
    """Top-1/top-5, flip top-1 and per-class top-1 (percent) of pretrained ``name`` on the Fashion-MNIST test set.

    Args:
        name: A pretrained tag, e.g. ``"bam_resnet20.fmnist"``.
        root: Folder with the Fashion-MNIST IDX files (default: Debian's dataset-fashion-mnist).
        batch_size: Evaluation batch size.
    """
    return measure(bam_zoo.create_model(name, pretrained=True), root=root, batch_size=batch_size)


@torch.no_grad()
def measure(model: torch.nn.Module, root: Optional[str] = None, batch_size: int = 500,
            memory_format: torch.memory_format = torch.channels_last) -> Dict[str, float]:
    """:func:`evaluate` for a built Fashion-MNIST model (its ``pretrained_cfg`` gives mean, std and label names).

    The model runs in ``memory_format`` (channels_last is the faster on the CPU) and is handed back contiguous.
    """
    cfg = model.pretrained_cfg
    data = FashionMNISTDataModule(root=root, val_size=0)
    data.setup("test")
    images, labels = data.test_set.tensors
    mean, std = (torch.tensor(cfg[key]).view(1, -1, 1, 1) for key in ("mean", "std"))
    accuracy = functools.partial(MulticlassAccuracy, len(cfg["label_names"]), average="micro")
    top1, top5, flip, per_class = accuracy(), accuracy(top_k=5), accuracy(), accuracy(average=None)
    model.eval().to(memory_format=memory_format)
    start = time.perf_counter()
    try:
        for x, y in zip(((images.float() / 255 - mean) / std).split(batch_size), labels.split(batch_size)):
            x = x.contiguous(memory_format=memory_format)
            logits = model(x)
            for metric in (top1, top5, per_class):
                metric.update(logits, y)
            flip.update(logits.softmax(1) + model(x.flip(3)).softmax(1), y)  # crop-and-flip recipes train on mirrors
    finally:
        model.to(memory_format=torch.contiguous_format)
    seconds = time.perf_counter() - start
    n = len(labels)
    return {
        **{key: round(100.0 * metric.compute().item(), 4) for key, metric in
           (("top1", top1), ("top5", top5), ("top1_flip", flip))}, "images": n,
        "per_class": dict(zip(cfg["label_names"], (round(100.0 * a, 2) for a in per_class.compute().tolist()))),
        "params": bam_zoo.count_params(model), "macs": bam_zoo.count_macs(model, cfg["input_size"]),
        "images_per_s": 2 * n / seconds,  # two forwards per image (as is and flipped)
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bam_zoo.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="pretrained tags (default: every shipped Fashion-MNIST weight)")
    parser.add_argument("--root", default=None, help="Fashion-MNIST folder (default: Debian's package)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="allowed |measured - recorded| top-1, flip top-1 and per-class top-1, in points "
                             "(default 0.05)")
    args = parser.parse_args(argv)
    names: List[str] = args.names or list(FASHION_MNIST_TAGS)
    others = [n for n in WEIGHT_METADATA if n not in FASHION_MNIST_TAGS]
    refused = [n for n in names if n in others]
    if refused:
        parser.error(f"{', '.join(refused)}: not Fashion-MNIST weights; this measures only those "
                     f"({', '.join(FASHION_MNIST_TAGS)}).")
    if not names:
        print("No Fashion-MNIST weights are registered yet: nothing to evaluate.", file=sys.stderr)
        return 1
    width = max(map(len, names)) + 2
    print(f"{'model':<{width}}{'params':>10}{'MMACs':>9}{'top-1':>9}{'top-5':>9}{'flip':>9}{'recorded':>10}{'img/s':>9}"
          f"   (img/s: channels_last, batch 500, {torch.get_num_threads()} threads)")
    failures = []
    for name in names:
        result = evaluate(name, root=args.root)
        record = weight_facts(name)
        recorded = record.get("top1")
        print(f"{name:<{width}}{result['params'] / 1e6:>9.3f}M{result['macs'] / 1e6:>9.2f}{result['top1']:>9.2f}"
              f"{result['top5']:>9.2f}{result['top1_flip']:>9.2f}"
              f"{f'{recorded:.2f}' if recorded is not None else '-':>10}"
              f"{result['images_per_s']:>9.0f}")
        failures += [f"{name}: measured {what} {result[key]:.2f} but its metadata records {record[key]}"
                     for key, what in (("top1", "top-1"), ("top1_flip", "flip top-1"))
                     if key in record and abs(result[key] - record[key]) > args.tolerance]
        failures += [f"{name}: measured {label} top-1 {value:.2f} but its metadata records {record['per_class'][label]}"
                     for label, value in result["per_class"].items()
                     if "per_class" in record and abs(value - record["per_class"][label]) > args.tolerance]
    for name in others if not args.names else ():
        print(f"not measured: {name} ({WEIGHT_METADATA[name]['dataset']}, not on this machine)")
    for failure in failures:
        print(f"MISMATCH {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
