"""What the EMA of the weights bought a run: its raw and its averaged weights from one checkpoint, on the test set.

    python scripts/ema_effect.py runs/fashion_mnist_long/bam_resnet56/checkpoints/best-047.ckpt

The checkpoint is read with torch's ``weights_only`` loader; ``--trust_checkpoint_code true`` unpickles it
fully, which runs any code it holds.

A Lightning checkpoint of a run with ``--model.ema_decay`` holds both ``model.*`` (the weights SGD reached)
and ``model_ema.module.*`` (their moving average, which the run validated, tested and exported). Each is
measured as ``python -m bam_zoo.evaluate`` measures a shipped weight: top-1, top-5 and top-1 with test-time flip
on the official Fashion-MNIST test set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bam_zoo.errors import BamZooError
from bam_zoo.evaluate import measure
from bam_zoo.models.convert import read_checkpoint
from bam_zoo.models.pretrained import fashion_mnist_cfg
from bam_zoo.training.checkpoint import decode_fit_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a Lightning checkpoint of a Fashion-MNIST run with EMA")
    parser.add_argument("--trust_checkpoint_code", choices=("true", "false"), default="false",
                        help="unpickle the checkpoint fully, which runs any code it holds (only for files you trust)")
    args = parser.parse_args()
    try:
        checkpoint = read_checkpoint(args.checkpoint, trust_checkpoint_code=args.trust_checkpoint_code == "true")
        runs = {label: decode_fit_checkpoint(checkpoint, str(args.checkpoint), ema) for label, ema in
                (("raw", False), ("EMA", True))}
    except BamZooError as error:
        sys.exit(f"ema_effect.py: error: {error}")
    if not runs["EMA"].ema:
        raise SystemExit(f"{args.checkpoint} holds no EMA weights (model_ema.module.*): it was trained without "
                         "--model.ema_decay, so there is nothing to compare.")
    print(f"{args.checkpoint} (epoch {checkpoint['epoch']}, step {checkpoint['global_step']})")
    print(f"{'weights':<12}{'top-1':>8}{'top-5':>8}{'flip':>8}")
    for label, run in runs.items():
        model = run.model
        model.pretrained_cfg = {**model.pretrained_cfg, **fashion_mnist_cfg(run.model_name, "run")}
        result = measure(model)
        print(f"{label:<12}{result['top1']:>8.2f}{result['top5']:>8.2f}{result['top1_flip']:>8.2f}")


if __name__ == "__main__":
    main()
