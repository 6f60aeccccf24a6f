"""Where one BAM call's time goes: the shipped bam_resnet20.fmnist's two BAMs, eval mode, channels_last, batch 32.

    python scripts/profile_bam_call.py

Prints the median time of each BAM call, then torch.profiler's per-op table for 20 calls of the first one
(docs/performance.md reads the fixed cost per call off it). A maintainer tool, like benchmark.py.
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile

import bam_zoo
from bam_zoo.runtime import keep_freed_memory


def main() -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    model = bam_zoo.create_model("bam_resnet20.fmnist", pretrained=True).eval().to(memory_format=torch.channels_last)
    calls = [(model.layer1.bam, torch.randn(32, 16, 28, 28)), (model.layer2.bam, torch.randn(32, 32, 14, 14))]
    calls = [(bam, x.contiguous(memory_format=torch.channels_last)) for bam, x in calls]
    with torch.no_grad():
        for bam, x in calls:
            for _ in range(20):
                bam(x)
            times = []
            for _ in range(201):
                start = time.perf_counter()
                bam(x)
                times.append(time.perf_counter() - start)
            print(f"BAM({x.shape[1]}) on {tuple(x.shape)}: median {1e3 * sorted(times)[100]:.3f} ms per call")
        bam, x = calls[0]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                bam(x)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
