"""Where one BAM's inference time goes: torch.profiler over bam_resnet50's first BAM, channels_last, batch 8.

    python scripts/profile_bam.py [--block 0|1|2]

Prints the operator table (self CPU time over 10 forwards). docs/performance.md quotes it.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import bam_zoo
from bam_zoo.runtime import keep_freed_memory

SHAPES = [(8, 256, 56, 56), (8, 512, 28, 28), (8, 1024, 14, 14)]  # inputs of bam_resnet50's BAMs at 224 px

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=0, choices=range(3))
    args = parser.parse_args()
    keep_freed_memory()
    model = bam_zoo.create_model("bam_resnet50").eval().to(memory_format=torch.channels_last)
    name, bam = bam_zoo.bam_modules(model)[args.block]
    x = torch.randn(SHAPES[args.block]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(5):
            bam(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                bam(x)
    print(f"{name}, input {list(x.shape)} channels_last, {torch.get_num_threads()} threads, 10 forwards:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
