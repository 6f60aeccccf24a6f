"""What BAM costs: latency and peak memory of ``bam_X`` against its plain twin ``X``, measured side by side.

Run ``python scripts/benchmark.py`` (all cases) or pick cases, e.g.
``python scripts/benchmark.py --case train-resnet50 --case train-resnet20 --repeats 3``.

Why it is built this way:

* Shared, noisy CPUs: both models live in one process and their runs are *interleaved* (plain, BAM, BAM,
  plain, ...), so a burst of load from elsewhere hits both. Each measurement is the median over ``--runs``
  timed runs after ``--warmup`` untimed ones, and the ratio reported is the median of the per-round ratios
  (a round times each model once, back to back). ``--repeats`` redoes the whole measurement and reports
  the median of the repeats' ratios.
* Peak memory on CPU: there is no ``torch.cuda.max_memory_allocated`` for CPU, so one extra run per model
  is recorded with ``torch.profiler`` (``profile_memory=True``), which logs every allocation and free of
  PyTorch's CPU allocator. Summing those in time order gives the step's peak on top of what was live
  before it (parameters, buffers, optimizer state, the batch), which is added back. Memory that oneDNN
  allocates outside PyTorch's allocator (primitive scratchpads) is not seen, for either model.
* Inference compares ``fuse_for_inference(bam_X)`` (BAM's branch BatchNorms folded; the backbone untouched)
  with the plain ``X``; ``--no-fuse`` measures the unfused BAM model.
* ``block-*`` cases time one BAM alone against its own definition (the same module with the CPU speed layer
  switched off: the standard ops that run on every other device).
* ``ship-*`` cases time the shipped Fashion-MNIST weights (``bam_resnet20.fmnist`` / ``resnet20.fmnist``,
  ``bam_resnet56.fmnist_long`` / ``resnet56.fmnist_long``) in eval mode, unfused, at batch 500 (as
  ``python -m bam_zoo.evaluate`` runs them) and 32.
* ``*+bam`` cases time a timm network with BAM inserted (``create_model(name, add_bam=True)``) against the same
  network; the ``MAC x`` column is BAM's share of the multiply-accumulates, the floor of the time ratio.
* ``--ablate`` switches each component of the CPU speed layer off in turn (``bam_zoo.layers.bam_cpu.COMPONENTS``,
  and ``layer``: all of it) and prints each one's gain per case, each from its own interleaved A/B against the
  BAM model with everything on. ``--compile`` runs both models through ``torch.compile``.
* ``pipeline`` measures the real Fashion-MNIST training loop (``FashionMNISTDataModule``'s loader and batch
  augmentation, then the training step) against the same steps on a ready-made batch.
* Allocator: by default the benchmark runs as ``cli.py`` trains, with glibc keeping freed memory
  (:func:`bam_zoo.runtime.keep_freed_memory`). With glibc's stock settings (``--malloc default``) each step
  re-faults a history-dependent share of its tensors, which moves both models by 10-25% and their ratio by
  several points from run to run.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

import bam_zoo

from bam_zoo.analysis import count_macs
from bam_zoo.fuse import fuse_for_inference
from bam_zoo.layers import BAM
from bam_zoo.layers.bam_cpu import (
    COMPONENTS, components_off, disable_cpu_fast_path, native_kernels_available)
from bam_zoo.runtime import keep_freed_memory
from bam_zoo.training.data import FashionMNISTDataModule

__all__ = ["Case", "CASES", "QUICK_CASES", "Result", "run_case", "Ablation", "run_ablation", "peak_memory", "main"]


@dataclass(frozen=True)
class Case:
    """One comparison: a baseline model and a BAM model, one input size, inference or a training step.

    Attributes:
        name: Case name on the command line.
        baseline: Name of the plain model (``bam_zoo.create_model``), or ``"block"`` for BAM's definition
            (:func:`reference_bam`).
        candidate: Name of the BAM model, ``"<plain>+bam"`` for the plain model with BAM inserted
            (``create_model(plain, add_bam=True)``), or ``"block"`` for one BAM module.
        mode: ``"infer"`` (eval, no grad) or ``"train"`` (forward, backward, SGD step).
        input_shape: Batch shape N x C x H x W.
        model_kwargs: Extra ``create_model`` arguments (``in_chans``, ``num_classes``, ``pretrained``).
        fuse: Fold BAM's branch BatchNorms for inference (``False``: the model as a user loads it).
    """
    name: str
    baseline: str
    candidate: str
    mode: str
    input_shape: Tuple[int, int, int, int]
    model_kwargs: Dict[str, int] = field(default_factory=dict)
    fuse: bool = True


_FMNIST = dict(in_chans=1, num_classes=10)
_SHIPPED = dict(pretrained=True)


def _shipped_cases(quick: bool = False) -> List[Case]:
    """The shipped Fashion-MNIST weights against their plain twins, in eval mode and unfused, as
    ``python -m bam_zoo.evaluate`` runs them (batch 500) and as a small batch (32)."""
    pairs = (("resnet20.fmnist", "bam_resnet20.fmnist"), ("resnet56.fmnist_long", "bam_resnet56.fmnist_long"))
    return [Case(f"ship-{plain.split('.')[0]}-b{n}", plain, bam, "infer", (2 if quick else n, 1, 28, 28), _SHIPPED,
                 fuse=False) for plain, bam in pairs for n in (500, 32)]


def _inserted_cases(quick: bool = False) -> List[Case]:
    """timm networks with BAM inserted by ``add_bam`` (identity start: the gamma-scaled gate) against the same
    networks: ImageNet-size inference (224 px, batch 8) and training (112 px, batch 16)."""
    infer, train = ((1, 3, 64, 64), (2, 3, 64, 64)) if quick else ((8, 3, 224, 224), (16, 3, 112, 112))
    return [Case(f"{mode}-{name}+bam", name, f"{name}+bam", mode, shape)
            for name in ("convnext_atto", "regnetx_002") for mode, shape in (("infer", infer), ("train", train))]



# (name, plain, BAM, mode, full-size input, tiny input for ``--quick``, create_model arguments)
_MODEL_CASES = [
    ("infer-resnet50", "resnet50", "bam_resnet50", "infer", (8, 3, 224, 224), (1, 3, 64, 64), {}),
    ("train-resnet50", "resnet50", "bam_resnet50", "train", (16, 3, 112, 112), (2, 3, 64, 64), {}),
    ("infer-resnet18", "resnet18", "bam_resnet18", "infer", (8, 3, 224, 224), (1, 3, 64, 64), {}),
    ("train-resnet18", "resnet18", "bam_resnet18", "train", (16, 3, 224, 224), (2, 3, 64, 64), {}),
    ("infer-resnet20", "resnet20", "bam_resnet20", "infer", (256, 1, 28, 28), (8, 1, 28, 28), _FMNIST),
    ("train-resnet20", "resnet20", "bam_resnet20", "train", (128, 1, 28, 28), (8, 1, 28, 28), _FMNIST),  # the recipe's
    # The block alone, at ResNet-50's first BAM (stage 1 output at 224 px, batch 8).
    ("block-infer", "block", "block", "infer", (8, 256, 56, 56), (2, 32, 16, 16), {}),
    ("block-train", "block", "block", "train", (8, 256, 56, 56), (2, 32, 16, 16), {}),
]


def _cases(quick: bool) -> Dict[str, Case]:
    model_cases = [Case(name, plain, bam, mode, tiny if quick else full, kwargs)
                   for name, plain, bam, mode, full, tiny, kwargs in _MODEL_CASES]
    return {c.name: c for c in model_cases + _shipped_cases(quick) + _inserted_cases(quick)}


CASES: Dict[str, Case] = _cases(quick=False)
# Tiny sizes for the smoke test (``--quick``): the same code paths in a few seconds.
QUICK_CASES: Dict[str, Case] = _cases(quick=True)

# The cases the targets name: the ablation's default.
ABLATION_CASES = ("train-resnet20", "infer-resnet50", "train-resnet50", "ship-resnet20-b500", "ship-resnet20-b32",
                  "ship-resnet56-b500", "ship-resnet56-b32")


def reference_bam(bam: BAM) -> BAM:
    """A copy of ``bam`` that runs its definition (``layers/bam.py``, standard ops) instead of the CPU speed layer:
    what the block cases compare the speed layer against, with identical weights."""
    return disable_cpu_fast_path(copy.deepcopy(bam))


MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _build_pair(case: Case, fuse: bool, memory_format: str = "contiguous") -> Tuple[nn.Module, nn.Module]:
    """(baseline, candidate) models with the same random weights wherever they share structure."""
    torch.manual_seed(0)
    if case.candidate == "block":
        candidate: nn.Module = BAM(case.input_shape[1])
        baseline: nn.Module = reference_bam(candidate)
    else:
        baseline = bam_zoo.create_model(case.baseline, **case.model_kwargs)
        name, inserted, _ = case.candidate.partition("+bam")
        candidate = bam_zoo.create_model(name, add_bam=bool(inserted), **case.model_kwargs)
    if case.mode == "infer":
        baseline.eval()
        candidate.eval()
        if fuse and case.fuse:
            fuse_for_inference(candidate)
    else:
        baseline.train()
        candidate.train()
    fmt = MEMORY_FORMATS[memory_format]
    return baseline.to(memory_format=fmt), candidate.to(memory_format=fmt)


def _make_step(model: nn.Module, case: Case, memory_format: str = "contiguous") -> Callable[[], None]:
    """A closure running one inference call or one full training step on a fixed batch."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.input_shape, generator=g).contiguous(memory_format=MEMORY_FORMATS[memory_format])
    if case.mode == "infer":
        def infer() -> None:
            with torch.no_grad():
                model(x)
        return infer

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if case.candidate == "block":
        target = torch.randn(case.input_shape, generator=g)

        def loss_fn(out: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(out, target)
    else:
        num_classes = case.model_kwargs.get("num_classes", 1000)
        target = torch.randint(0, num_classes, (case.input_shape[0],), generator=g)

        def loss_fn(out: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out, target)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()
        optimizer.step()
    train_step.optimizer = optimizer  # type: ignore[attr-defined]
    return train_step


def _state_bytes(model: nn.Module, step: Callable[[], None]) -> int:
    """Bytes live before a step starts: parameters, buffers, optimizer state (the batch is the same for both)."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    optimizer: Optional[torch.optim.Optimizer] = getattr(step, "optimizer", None)
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def peak_memory(step: Callable[[], None]) -> int:
    """Peak bytes allocated by PyTorch's CPU allocator during one call of ``step``, above the starting level.

    Integrates the allocation/free events that ``torch.profiler`` records with ``profile_memory=True``
    in time order and returns the running sum's maximum.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events: List[Tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


@dataclass
class Result:
    """Medians for one case; times in milliseconds, memory in MiB."""
    case: str
    baseline_ms: float
    candidate_ms: float
    time_ratio: float
    baseline_mib: float
    candidate_mib: float
    mem_ratio: float
    repeat_ratios: List[float]
    mac_ratio: Optional[float] = None  # BAM's MACs / plain's (model cases): the floor of the time ratio


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(baseline: Callable[[], None], candidate: Callable[[], None], runs: int, warmup: int
                 ) -> Tuple[List[float], List[float]]:
    """Time both closures round by round, alternating which goes first to cancel order effects."""
    for _ in range(warmup):
        baseline()
        candidate()
    base_t, cand_t = [], []
    for i in range(runs):
        if i % 2 == 0:
            base_t.append(_timed(baseline))
            cand_t.append(_timed(candidate))
        else:
            cand_t.append(_timed(candidate))
            base_t.append(_timed(baseline))
    return base_t, cand_t


def run_case(case: Case, runs: int = 7, warmup: int = 2, repeats: int = 1, fuse: bool = True,
             memory_format: str = "contiguous", compiled: bool = False) -> Result:
    """Measure one case: ``repeats`` interleaved measurements of ``runs`` rounds each, then peak memory.

    Args:
        case: What to compare.
        runs: Timed rounds per measurement (each times both models once).
        warmup: Untimed rounds first (oneDNN primitive creation, allocator warm-up).
        repeats: Independent measurements; the reported ratio is the median of their ratios.
        fuse: Fold BAM's branch BatchNorms for inference cases (:func:`bam_zoo.fuse.fuse_for_inference`).
        memory_format: ``"contiguous"`` or ``"channels_last"``, for both models and the batch.
        compiled: Run both models through ``torch.compile`` (inductor; BAM is one opaque op in the graph); the
            warm-up rounds include the compilation.
    """
    baseline_model, candidate_model = _build_pair(case, fuse, memory_format)
    mac_ratio = None
    if case.candidate != "block":
        image = case.input_shape[1:]
        mac_ratio = count_macs(candidate_model, image) / count_macs(baseline_model, image)
    if compiled:
        baseline_model, candidate_model = torch.compile(baseline_model), torch.compile(candidate_model)
    baseline = _make_step(baseline_model, case, memory_format)
    candidate = _make_step(candidate_model, case, memory_format)
    ratios, base_ms, cand_ms = [], [], []
    for _ in range(repeats):
        base_t, cand_t = _interleaved(baseline, candidate, runs, warmup)
        ratios.append(statistics.median(c / b for b, c in zip(base_t, cand_t)))
        base_ms.append(statistics.median(base_t) * 1e3)
        cand_ms.append(statistics.median(cand_t) * 1e3)
    # Memory is deterministic; step once more (warm) and record.
    base_mem = peak_memory(baseline) + _state_bytes(baseline_model, baseline)
    cand_mem = peak_memory(candidate) + _state_bytes(candidate_model, candidate)
    name = case.name + ("/cl" if memory_format == "channels_last" else "")
    return Result(name, statistics.median(base_ms), statistics.median(cand_ms), statistics.median(ratios),
                  base_mem / 2 ** 20, cand_mem / 2 ** 20, cand_mem / base_mem, ratios, mac_ratio)


# Which components a case can exercise (the others do nothing there, and print as "-").
def _applies(component: str, case: Case, memory_format: str) -> bool:
    if component in ("node", "chain"):
        return case.mode == "train"
    if component == "pool_reduce":
        return case.mode == "train" and memory_format == "channels_last"
    return True


ABLATION_COLUMNS = ("layer",) + COMPONENTS  # "layer": the whole speed layer (disable_cpu_fast_path)


@dataclass
class Ablation:
    """One case's ablation: BAM / plain with everything on, and each component's gain (time without it / time with
    it - 1; None where it does not apply), medians of per-round ratios."""
    case: str
    ratio: float
    gains: Dict[str, Optional[float]]


def _switched_off(component: str, model: nn.Module, step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with one component of the speed layer off (``"layer"``: all of it) for the call."""
    def run() -> None:
        if component == "layer":
            disable_cpu_fast_path(model)
            try:
                step()
            finally:
                disable_cpu_fast_path(model, False)
        else:
            with components_off(component):
                step()
    return run


def run_ablation(case: Case, runs: int = 7, warmup: int = 2, fuse: bool = True,
                 memory_format: str = "contiguous", columns: Sequence[str] = ABLATION_COLUMNS) -> Ablation:
    """BAM / plain, then each component's gain as its own interleaved A/B (everything on, then that component off,
    alternating which goes first), on one pair of models."""
    baseline_model, candidate_model = _build_pair(case, fuse, memory_format)
    candidate = _make_step(candidate_model, case, memory_format)
    base_t, cand_t = _interleaved(_make_step(baseline_model, case, memory_format), candidate, runs, warmup)
    gains: Dict[str, Optional[float]] = {}
    for component in columns:
        if not _applies(component, case, memory_format):
            gains[component] = None
            continue
        on_t, off_t = _interleaved(candidate, _switched_off(component, candidate_model, candidate), runs, warmup)
        gains[component] = statistics.median(off / on for on, off in zip(on_t, off_t)) - 1
    name = case.name + ("/cl" if memory_format == "channels_last" else "")
    return Ablation(name, statistics.median(c / b for b, c in zip(base_t, cand_t)), gains)


def _format_ablation(rows: Sequence[Ablation]) -> str:
    columns = list(rows[0].gains) if rows else list(ABLATION_COLUMNS)
    lines = [f"{'case':<20} {'BAM/plain':>9} " + " ".join(f"{c:>11}" for c in columns)]
    for r in rows:
        cells = [f"{100 * g:+10.1f}%" if g is not None else f"{'-':>11}" for g in r.gains.values()]
        lines.append(f"{r.case:<20} {r.ratio:9.3f} " + " ".join(cells))
    return "\n".join(lines)


def run_pipeline(runs: int = 5, steps: int = 4, batch_size: int = 128, model_name: str = "bam_resnet20",
                 limit_train: Optional[int] = None, memory_format: str = "channels_last"
                 ) -> Tuple[float, float, float]:
    """Fashion-MNIST end to end: images/s of (loader + augmentation + step) against (step on a ready batch).

    The loop is what training runs: ``FashionMNISTDataModule.train_dataloader()`` batches, augmented with the
    DataModule's ``train_augment`` (what ``on_after_batch_transfer`` applies in training), then one SGD step.
    The two loops alternate in chunks of ``steps`` steps, ``runs`` times.

    Returns:
        (end-to-end images/s, pure-step images/s, median per-round throughput ratio end-to-end / pure).
    """
    dm = FashionMNISTDataModule(batch_size=batch_size, limit_train=limit_train)
    dm.setup("fit")
    torch.manual_seed(0)
    fmt = MEMORY_FORMATS[memory_format]
    model = bam_zoo.create_model(model_name, in_chans=dm.in_chans, num_classes=dm.num_classes).train()
    model.to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.contiguous(memory_format=fmt)), y).backward()  # as ImageClassifier does
        optimizer.step()

    def batches():
        while True:
            for x, y in dm.train_dataloader():
                yield x, y

    stream = batches()
    ready_x, ready_y = next(stream)
    ready_x = dm.train_augment(ready_x)

    def end_to_end() -> None:
        for _ in range(steps):
            x, y = next(stream)
            step(dm.train_augment(x), y)

    def pure() -> None:
        for _ in range(steps):
            step(ready_x, ready_y)

    pure_t, e2e_t = _interleaved(pure, end_to_end, runs, warmup=1)
    images = steps * batch_size
    e2e_ips = images / statistics.median(e2e_t)
    pure_ips = images / statistics.median(pure_t)
    return e2e_ips, pure_ips, statistics.median(p / e for p, e in zip(pure_t, e2e_t))


def _native_status() -> str:
    """Whether BAM runs its compiled kernels here (they decide part of the numbers)."""
    if not native_kernels_available():
        return "not loaded (ATen fallback; build them with `pip install --no-build-isolation -e .`)"
    return "loaded"


def _format(results: Sequence[Result]) -> str:
    lines = [
        f"{'case':<26} {'plain ms':>9} {'BAM ms':>9} {'time x':>7} {'MAC x':>6} {'plain MiB':>10} {'BAM MiB':>9} "
        f"{'mem x':>6}  repeats",
    ]
    for r in results:
        reps = " ".join(f"{x:.3f}" for x in r.repeat_ratios)
        macs = "-" if r.mac_ratio is None else f"{r.mac_ratio:.3f}"
        lines.append(f"{r.case:<26} {r.baseline_ms:9.1f} {r.candidate_ms:9.1f} {r.time_ratio:7.3f} {macs:>6} "
                     f"{r.baseline_mib:10.1f} {r.candidate_mib:9.1f} {r.mem_ratio:6.3f}  {reps}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Union[Result, Ablation]]:
    """Command line entry point; prints the ratio (or ablation) table and returns its rows."""
    parser = argparse.ArgumentParser(prog="python scripts/benchmark.py", description=__doc__.split("\n")[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES) + ["pipeline"],
                        help="case to run (repeatable); default: all model and block cases")
    parser.add_argument("--runs", type=int, default=7, help="timed interleaved rounds per measurement (>= 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    parser.add_argument("--repeats", type=int, default=1, help="independent measurements; median of ratios")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-fuse", action="store_true", help="do not fold BAM's BatchNorms for inference")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few runs (smoke test)")
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="'keep' (as cli.py trains): glibc keeps freed memory for reuse instead of returning it "
                             "to the OS (bam_zoo.runtime.keep_freed_memory); 'default': glibc's stock behaviour, "
                             "where page faults on re-allocated tensors add several percent of drift")
    parser.add_argument("--memory-format", choices=["contiguous", "channels_last", "both"], default="both",
                        help="memory format of both models and the batch (default: both, one row each)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both models (inductor), to measure compiled BAM over compiled plain")
    parser.add_argument("--ablate", action="store_true",
                        help="each component of the CPU speed layer off in turn (and the whole layer: 'layer'); "
                             "prints its gain, time without it / time with it - 1, per case (default cases: "
                             f"{', '.join(ABLATION_CASES)})")
    parser.add_argument("--component", action="append", choices=ABLATION_COLUMNS,
                        help="with --ablate: only these components (repeatable; default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.malloc == "keep" and not keep_freed_memory():
        parser.error("--malloc keep needs glibc (and BAM_ZOO_MALLOC unset); use --malloc default here")
    table = QUICK_CASES if args.quick else CASES
    runs, warmup = (max(1, min(args.runs, 2)), 1) if args.quick else (args.runs, args.warmup)
    if not args.quick and runs < 5:
        parser.error("--runs must be >= 5 for a median that means something (use --quick for a smoke test)")
    names = args.case or (list(ABLATION_CASES) if args.ablate else list(table))
    formats = ["contiguous", "channels_last"] if args.memory_format == "both" else [args.memory_format]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {runs} interleaved rounds "
          f"after {warmup} warm-up, {args.repeats} repeat(s); ratio = BAM / plain in the same memory format "
          f"(case/cl: channels_last)", flush=True)
    print(f"bam_zoo compiled kernels: {_native_status()}; malloc: {args.malloc}", flush=True)
    if args.ablate:
        rows: List[Ablation] = []
        print("gain of each component = time with it off / time with everything on - 1 (BAM model only)")
        for name in (n for n in names if n != "pipeline"):
            for fmt in formats:
                rows.append(run_ablation(table[name], runs, warmup, fuse=not args.no_fuse, memory_format=fmt,
                                         columns=args.component or ABLATION_COLUMNS))
                print(_format_ablation(rows).splitlines()[-1] if len(rows) > 1 else _format_ablation(rows),
                      flush=True)
        return rows
    results = []
    for name in names:
        if name == "pipeline":
            continue
        for fmt in formats:
            results.append(run_case(table[name], runs, warmup, args.repeats, fuse=not args.no_fuse,
                                    memory_format=fmt, compiled=args.compile))
            print(_format(results[-1:]).splitlines()[-1] if len(results) > 1 else _format(results), flush=True)
    if "pipeline" in names:
        # The zoo recipe: configs/fashion_mnist/*.yaml, batch 128, channels_last, 55k training images per epoch.
        steps_per_epoch = -(-55_000 // 128)
        for model_name in ("bam_resnet20", "resnet20"):
            e2e, pure, ratio = run_pipeline(
                runs=runs, steps=1 if args.quick else 4, batch_size=16 if args.quick else 128,
                model_name=model_name, limit_train=256 if args.quick else None)
            batch = 16 if args.quick else 128
            print(f"pipeline ({model_name}, Fashion-MNIST, channels_last, batch {batch}): end-to-end {e2e:.0f} img/s, "
                  f"pure step {pure:.0f} img/s, data pipeline cost {100 * (1 - ratio):.1f}%; one training epoch "
                  f"of the zoo recipe ({steps_per_epoch} steps of 128) ~ {steps_per_epoch * 128 / e2e:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
