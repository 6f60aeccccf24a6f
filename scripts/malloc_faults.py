"""Inference time and page faults per forward of resnet50 and bam_resnet50 (channels_last, batch 8), under the
allocator settings this process starts with (glibc's stock ones unless the environment changes them).

    python scripts/malloc_faults.py
    python scripts/malloc_faults.py --first-touch   # what one page-faulted tensor costs against a reused one

Prints, for each network run alone and then interleaved with the other, the median time (ms) and the memory
faulted in per forward (MiB, from getrusage's minor faults). Run it a few times: both numbers depend on the
process's allocation history. docs/performance.md quotes it.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time

import timm
import torch

import bam_zoo


def main() -> None:
    cl = torch.channels_last
    nets = {"resnet50": timm.create_model("resnet50"), "bam_resnet50": bam_zoo.create_model("bam_resnet50")}
    nets = {k: v.eval().to(memory_format=cl) for k, v in nets.items()}
    x = torch.randn(8, 3, 224, 224).to(memory_format=cl)

    def run(net: torch.nn.Module) -> tuple[float, float]:
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        with torch.no_grad():
            net(x)
        return (time.perf_counter() - start) * 1e3, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) * (
            resource.getpagesize() / 2**20)

    for net in nets.values():
        run(net), run(net)
    for mode in ("alone", "interleaved"):
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in nets}
        order = [name for name in nets for _ in range(7)] if mode == "alone" else list(nets) * 7
        for name in order:
            results[name].append(run(nets[name]))
        print(mode + ": " + ", ".join(f"{name} {statistics.median(t for t, _ in r):.1f} ms, "
                                      f"{statistics.median(f for _, f in r):.0f} MiB faulted" for name, r in results.items()))



def first_touch_cost(numel: int = 3_200_000, rounds: int = 8) -> tuple[float, float]:
    """(ms to fill a fresh tensor, ms to fill it again): the price of a page fault per tensor, measured."""
    fresh, reused, keep = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        t = torch.empty(numel)
        t.fill_(1.0)
        fresh.append(time.perf_counter() - start)
        start = time.perf_counter()
        t.fill_(2.0)
        reused.append(time.perf_counter() - start)
        keep.append(t)  # kept alive, so the next tensor needs new memory
    return statistics.median(fresh) * 1e3, statistics.median(reused) * 1e3


if __name__ == "__main__":
    if sys.argv[1:] == ["--first-touch"]:
        first, again = first_touch_cost()
        print(f"filling a fresh 12.8 MB float32 tensor: {first:.2f} ms; filling it again: {again:.2f} ms "
              f"(median of 8; the difference is page faults on first touch)")
    else:
        main()
