#!/usr/bin/env python
"""Speed of the batched crossbar simulator (`nipa.simulator.crossbar.convert`) against two baselines,
`nipa.simulator.reference.naive_convert` with structure "original" (one product over all tiles per input bit and
slice, as the original tool computed) and "naive" (one small product per tile, input bit and slice),
and against plain float inference of the same model, in one run on one machine.

    python bench/simulator.py [--quick] [--batch N] [--device cpu|cuda] [--memory_mb MB] [--vari V]
                              [--compile on|off] [--lookup on|off] [--out results/bench/simulator.json]

Workloads: the default SmallCNN on a batch of 1x28x28 inputs; ResNet-18 (CIFAR shapes) on a batch of
3x32x32 inputs, the whole model and a representative subset of its layers (one 3x3 conv per stage,
the stem, a 1x1 stride-2 shortcut and the classifier, each fed the activation it sees in the model).
Hardware point: the original tool's default (8-bit weights and inputs, 128 rows, 5-bit ADC, 1-bit
cells, state-dependent variation 0.1, dynamic ADC range).

Every (workload, method) is measured in its own subprocess so that its peak memory is its own
(CPU: peak RSS during its forwards, sampled by a thread, minus the RSS before them, and the growth
of ru_maxrss; CUDA: torch.cuda peak allocation over the allocation before them). Each forward is
warmed up once on 2 samples, then timed `--repeats` times (median), with fewer repeats when one forward
exceeds `--budget` seconds (the JSON says how many ran). Wall and process CPU time are both recorded:
on a machine shared with other jobs the CPU-time ratio is the steadier figure.

Every simulator runs with the product memory budget main.py takes on the device (256 MB on a CPU, a
quarter of the free memory on a GPU; `--memory_mb` sets another), so peak memory is what a user sees.
`product_seconds` records the one timing per product format that chose the fast simulator's (see
`nipa.simulator.crossbar.CrossbarCore._product_dtype`); `profile_fast` the top operators of one fast forward and
the shares of products, compiled kernels and the rest.

On a CPU the fast simulator's reads run in its lookup kernel (`--lookup on`, the default everywhere:
`nipa.simulator.plane_lookup`, partial sums by table lookup with the ADC read fused, each record's
"products" says what ran) or as batched products followed by the element-wise ADC chain (`--lookup off`,
NIPA_LOOKUP=0), whose kernels run compiled (`--compile on`, as main.py with NIPA_COMPILE=1; "kernels"
says what ran) or eager (`--compile off`).

Correctness check: the timed fast and naive runs use the real cells, so their end-to-end outputs agree
only up to rare ADC level flips (a partial sum that float rounding puts on the other side of a rounding
boundary in one summation order) and, in a deep model, to the input-quantization flips that a float
rounding difference in one layer causes in the next; that difference is `raw_cells_max_rel_diff`. The
exactness check (`max_rel_diff`, per layer in `max_rel_diff_per_layer`) programs the same chip in both,
rounds the cell conductances to a 2^-10 grid, so that every partial sum is exact in float32 in either
summation order, and feeds every naive layer the input its fast twin saw: each layer must agree to float
rounding (< 1e-5).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing the package

import torch  # noqa: E402
from torch import nn  # noqa: E402
from workloads import HW_POINT, RESNET_SUBSET, LayerSubset, build_workload, first_samples  # noqa: E402

METHODS = ("plain", "fast", "original", "naive")
SNAP_BITS = 10
HW_OVERRIDES: dict[str, Any] = {}  # --vari
BUDGET: dict[str, float] = {}  # --memory_mb (default: the scripts' budget for the device)


# ---- workloads ----------------------------------------------------------------------------------


def batch_sizes(quick: bool) -> dict[str, int]:
    return {
        "smallcnn": 64 if quick else 256,
        "resnet18": 8 if quick else 16,
        "resnet18_subset": 8 if quick else 16,
    }


def prepare(method: str, model: nn.Module, snap: bool) -> nn.Module:
    from nipa.hardware.config import HWConfig
    from nipa.simulator.crossbar import convert, crossbar_cores
    from nipa.simulator.reference import naive_convert

    if method == "plain":
        return model
    hw = HWConfig(**{**HW_POINT, **HW_OVERRIDES})
    memory_mb = BUDGET.get("memory_mb") or default_budget(next(model.parameters()).device)
    if method == "fast":
        converted = convert(model, hw, seed=0, chip=0, memory_mb=memory_mb).eval()
    else:  # the baselines: the original's structure, or the naive per-(tile, bit, slice) loop
        converted = naive_convert(model, hw, seed=0, chip=0, structure=method, memory_mb=memory_mb).eval()
    if snap:
        for core in crossbar_cores(converted):
            core.conductance = torch.round(core.conductance * 2**SNAP_BITS) / 2**SNAP_BITS
    return converted


def default_budget(device: torch.device) -> float:
    """The product memory budget main.py and the other scripts take on this device (--memory_mb unset)."""
    from nipa.runtime import default_memory_mb

    return default_memory_mb(device)


def kernel_mode(method: str) -> str | None:
    """How the fast simulator's element-wise kernels ran: 'compiled', 'eager' or 'eager-fallback'."""
    if method != "fast":
        return None
    from nipa.simulator.crossbar import compile_mode

    return compile_mode()


def product_mode(method: str) -> str | None:
    """How the fast simulator's reads ran: 'lookup' (the CPU kernel), 'matmul', or both."""
    if method != "fast":
        return None
    from nipa.simulator.crossbar import product_mode as mode

    return mode()


def max_rel_diff(actual: Any, expected: Any) -> float:
    if isinstance(expected, list):
        return max(max_rel_diff(a, e) for a, e in zip(actual, expected, strict=True))
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# ---- one measurement (runs in a subprocess) -----------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def current_rss_mb() -> float | None:
    """This process's resident set size now (Linux /proc), None where unavailable."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class RssSampler:
    """Peak resident set size while a block runs, sampled every few milliseconds by a thread (torch
    releases the GIL in its kernels). Unlike ru_maxrss it is not hidden by an earlier, higher peak."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak: float | None = current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = current_rss_mb()
            if rss is not None and self.peak is not None:
                self.peak = max(self.peak, rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        rss = current_rss_mb()
        if rss is not None and self.peak is not None:
            self.peak = max(self.peak, rss)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(
    workload: str,
    method: str,
    batch: int,
    device: torch.device,
    repeats: int,
    budget: float,
    save: Path | None,
) -> dict[str, Any]:
    """Time one method on one workload; per-layer times for the layer subset."""
    model, inputs, weights = build_workload(workload, batch, device)
    start = time.perf_counter()
    runner = prepare(method, model, snap=False)
    synchronize(device)
    convert_s = time.perf_counter() - start
    gc.collect()
    rss_before, max_rss_before = current_rss_mb(), peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    runner(first_samples(inputs, 2))  # warm-up (and compilation: its memory stays with the process)
    synchronize(device)
    rss_warm = current_rss_mb()
    sampler = RssSampler().__enter__()

    layer_times: dict[str, list[float]] = {}
    if isinstance(runner, LayerSubset):

        def timed_forward() -> list[torch.Tensor]:
            outputs = []
            for name, layer, x in zip(runner.names, runner.layers.values(), inputs, strict=True):
                t0 = time.perf_counter()
                outputs.append(layer(x))
                synchronize(device)
                layer_times.setdefault(name, []).append(time.perf_counter() - t0)
            return outputs
    else:

        def timed_forward() -> torch.Tensor:
            return runner(inputs)

    times: list[float] = []
    cpu_times: list[float] = []  # CPU time of this process: less sensitive to other load than wall time
    while len(times) < repeats and (not times or sum(times) + times[-1] <= budget):
        synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        output = timed_forward()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    sampler.__exit__(None, None, None)
    result: dict[str, Any] = {
        "workload": workload,
        "method": method,
        "batch": batch,
        "weights": weights,
        "seconds": statistics.median(times),
        "seconds_all": times,
        "cpu_seconds": statistics.median(cpu_times),
        "repeats": len(times),
        "convert_seconds": convert_s,
        "kernels": kernel_mode(method),
        "products": product_mode(method),
    }
    if layer_times:
        result["layer_seconds"] = {name: statistics.median(ts) for name, ts in layer_times.items()}
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_memory_delta_mb"] = (torch.cuda.max_memory_allocated(device) - cuda_before) / 2**20
        result["memory_measure"] = (
            "torch.cuda.max_memory_allocated (delta: over the allocation before warm-up)"
        )
    else:
        result["peak_memory_mb"] = peak_rss_mb()
        result["ru_maxrss_delta_mb"] = peak_rss_mb() - max_rss_before
        if rss_before is not None and rss_warm is not None and sampler.peak is not None:
            result["peak_memory_delta_mb"] = sampler.peak - rss_before
            result["warm_up_memory_mb"] = rss_warm - rss_before
            result["memory_measure"] = (
                "peak RSS during the timed forwards (sampled every 2 ms from /proc/self/statm) minus the RSS "
                "before the warm-up on 2 samples; warm_up_memory_mb: what the warm-up left (compiled "
                "kernels' code and caches when compiled: a fixed cost per process, not per forward); "
                "ru_maxrss_delta_mb: growth of the process's ru_maxrss (hidden by earlier peaks)"
            )
        else:
            result["peak_memory_delta_mb"] = result["ru_maxrss_delta_mb"]
            result["memory_measure"] = "growth of the process's ru_maxrss over its peak before warm-up"
    if save is not None:
        torch.save([o.cpu() for o in output] if isinstance(output, list) else output.cpu(), save)
    return result


@torch.no_grad()
def exactness_check(workload: str, batch: int, device: torch.device) -> dict[str, float]:
    """Fast vs naive on the same chip with cells snapped to a dyadic grid, layer by layer (each layer of
    the naive model fed the input its fast twin saw): every layer must agree to float rounding."""
    from nipa.simulator.reference import compare_layerwise

    model, inputs, _ = build_workload(workload, batch, device)
    fast = prepare("fast", model, snap=True)
    naive = prepare("naive", model, snap=True)
    return compare_layerwise(fast, naive, inputs)


@torch.no_grad()
def oracle_check(workload: str, batch: int, device: torch.device) -> dict[str, float]:
    """Fast vs the independent float64 oracle of the tests (tests/helpers/oracle.py, written from SPEC
    section 4 alone), layer by layer on the same programmed cells (snapped as above): each mapped
    layer's output, fed the input its fast twin saw, relative to max |y|."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import oracle

    from nipa.simulator.crossbar import CrossbarConv2d, CrossbarLinear

    model, inputs, _ = build_workload(workload, batch, device)
    fast = prepare("fast", model, snap=True)
    seen: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}

    def recorder(name: str):
        return lambda module, args, out: seen.__setitem__(name, (module, args[0].detach(), out.detach()))

    hooks = [m.register_forward_hook(recorder(n)) for n, m in fast.named_modules()
             if isinstance(m, (CrossbarLinear, CrossbarConv2d))]
    try:
        fast(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    originals = dict(model.named_modules())  # the converted copy keeps the module names
    result = {}
    for name, (module, x, y) in seen.items():
        original = originals[name]
        expected = oracle.layer_forward(original.cpu(), x.cpu(), module.core.hw,
                                        columns=module.core.conductance.cpu()).y
        expected_t = torch.as_tensor(expected, dtype=torch.float64)
        result[name] = ((y.cpu().double() - expected_t).abs().max() / expected_t.abs().max()).item()
    return result


PRODUCT_OPS = ("aten::bmm", "aten::mm", "aten::_int_mm", "aten::matmul", "aten::addmm")


def op_group(op: str) -> str:
    """Where an operator's time belongs: the crossbar products, the compiled element-wise kernels (ADC
    range, quantize-weight-sum chain, bit planes), compilation, or the rest (eager element-wise work)."""
    if op in PRODUCT_OPS:
        return "products"
    if op.startswith("nipa::plane_lookup"):  # the lookup kernel: products, fused with the ADC reads
        return "lookup kernel"
    if "CompiledFxGraph" in op:
        return "compiled kernels"
    if "dynamo" in op or "compile" in op.lower() or "Dispatch" in op:
        return "compilation"
    return "other"


def profile_fast(workload: str, batch: int, device: torch.device, rows: int = 12) -> dict[str, Any]:
    """Where one fast forward spends its time (torch.profiler, self time): the top operators and the
    shares of each `op_group`. Warmed up on the full batch first, so no compilation is profiled."""
    from torch.profiler import ProfilerActivity, profile

    model, inputs, _ = build_workload(workload, batch, device)
    fast = prepare("fast", model, snap=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        fast(inputs)
        synchronize(device)
        with profile(activities=activities) as prof:
            fast(inputs)
            synchronize(device)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    groups: dict[str, float] = {}
    for e in events:
        groups[op_group(e.key)] = groups.get(op_group(e.key), 0.0) + e.self_cpu_time_total / total
    return {
        "top_ops": [
            {
                "op": e.key,
                "self_cpu_ms": e.self_cpu_time_total / 1e3,
                "share": e.self_cpu_time_total / total,
                "calls": e.count,
            }
            for e in events[:rows]
        ],
        "shares": dict(sorted(groups.items(), key=lambda item: -item[1])),
        "total_self_cpu_ms": total / 1e3,
    }


# ---- orchestration ------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu_model = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), ""
            )
    except OSError:
        cpu_model = platform.processor()
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    info["git"] = git_state()
    return info


def git_state() -> dict[str, Any]:
    """The commit and the locally modified library files (read-only git queries), for provenance."""

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    modified = git("status", "--porcelain", "--", "nipa", "models", "bench")
    return {"commit": git("rev-parse", "HEAD") or None, "modified": modified.splitlines()}


def run_worker(
    args: argparse.Namespace, workload: str, method: str, batch: int, save: Path
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        workload,
        method,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--budget",
        str(args.budget),
        "--batch",
        str(batch),
        "--save",
        str(save),
        "--compile",
        args.compile,
        "--lookup",
        args.lookup,
    ] + (["--vari", str(args.vari)] if args.vari is not None else []) + (
        ["--memory_mb", str(args.memory_mb)] if args.memory_mb is not None else [])
    env = {**os.environ, "NIPA_COMPILE": "1" if args.compile == "on" else "0",
           "NIPA_LOOKUP": "1" if args.lookup == "on" else "0"}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {workload}/{method} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for baseline in ("naive", "original"):
        if "fast" in runs and baseline in runs:
            summary[f"speedup_{baseline}_over_fast"] = runs[baseline]["seconds"] / runs["fast"]["seconds"]
            summary[f"speedup_{baseline}_over_fast_cpu_time"] = (
                runs[baseline]["cpu_seconds"] / runs["fast"]["cpu_seconds"]
            )
    if "plain" in runs:
        summary["peak_memory_bound_mb"] = 4 * runs["plain"]["peak_memory_delta_mb"] + 256
        for method in ("fast", "original", "naive"):
            if method in runs:
                summary[f"slowdown_{method}_vs_plain"] = runs[method]["seconds"] / runs["plain"]["seconds"]
    if "fast" in runs and "naive" in runs and "layer_seconds" in runs["fast"]:
        summary["per_layer"] = {
            name: {
                "fast_s": runs["fast"]["layer_seconds"][name],
                "naive_s": runs["naive"]["layer_seconds"][name],
                "plain_s": runs.get("plain", {}).get("layer_seconds", {}).get(name),
                "speedup_naive_over_fast": runs["naive"]["layer_seconds"][name]
                / runs["fast"]["layer_seconds"][name],
            }
            for name in runs["fast"]["layer_seconds"]
        }
    return summary


def _cell(runs: dict[str, Any], method: str, key: str, fmt: str) -> str:
    return format(runs[method][key], fmt) if method in runs else "-"


def _row(cells: list[str], widths: list[int]) -> str:
    pairs = enumerate(zip(cells, widths, strict=True))
    return " ".join(f"{c:>{w}s}" if i else f"{c:{w}s}" for i, (c, w) in pairs)


def print_table(results: dict[str, Any]) -> None:
    header = [
        "workload",
        "batch",
        "plain s",
        "fast s",
        "orig s",
        "naive s",
        "naive/fast",
        "orig/fast",
        "fast/plain",
        "plain MB",
        "fast MB",
        "exact diff",
        "oracle diff",
    ]
    widths = [18, 5, 9, 9, 9, 9, 10, 9, 10, 8, 8, 10, 11]
    print("\n" + _row(header, widths))
    for name, entry in results["workloads"].items():
        runs, summary = entry["runs"], entry["summary"]
        ratio = summary.get("speedup_naive_over_fast")
        original_ratio = summary.get("speedup_original_over_fast")
        slowdown = summary.get("slowdown_fast_vs_plain")
        diff = entry.get("max_rel_diff")
        oracle_diff = entry.get("oracle_max_rel_diff")
        row = [
            name,
            str(entry["batch"]),
            _cell(runs, "plain", "seconds", ".3f"),
            _cell(runs, "fast", "seconds", ".3f"),
            _cell(runs, "original", "seconds", ".3f"),
            _cell(runs, "naive", "seconds", ".3f"),
            f"{ratio:.2f}" if ratio else "-",
            f"{original_ratio:.2f}" if original_ratio else "-",
            f"{slowdown:.1f}" if slowdown else "-",
            _cell(runs, "plain", "peak_memory_delta_mb", ".0f"),
            _cell(runs, "fast", "peak_memory_delta_mb", ".0f"),
            f"{diff:.1e}" if diff is not None else "-",
            f"{oracle_diff:.1e}" if oracle_diff is not None else "-",
        ]
        print(_row(row, widths))
        for note in entry.get("notes", []):
            print(f"    note: {note}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller batches (SmallCNN 64, ResNet-18 8); the naive loop runs on the "
        "ResNet-18 layer subset only",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "simulator.json"))
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per method (median)")
    parser.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="stop repeating a method once another forward would exceed this many seconds",
    )
    parser.add_argument(
        "--workloads",
        default="smallcnn,resnet18,resnet18_subset",
        help="comma-separated subset of smallcnn,resnet18,resnet18_subset",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the profile of one fast forward")
    parser.add_argument("--lookup", choices=("on", "off"), default="on",
                        help="the fast simulator's CPU lookup kernel (nipa/simulator/plane_lookup.c; on, the "
                             "default of main.py) or batched products and the ADC chain (off, NIPA_LOOKUP=0)")
    parser.add_argument("--compile", choices=("on", "off"), default="on",
                        help="the fast simulator's element-wise kernels compiled with torch.compile (on, what "
                             "NIPA_COMPILE=1 gives main.py) or eager (off)")
    parser.add_argument("--vari", type=float, default=None,
                        help="state-dependent variation of the hardware point (default 0.1, the original's "
                             "point; 0 gives integer cells and the exact bfloat16 products)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size of every workload (default: smallcnn 256, ResNet-18 16; --quick 64 / 8)")
    parser.add_argument("--memory_mb", type=float, default=None,
                        help="product memory budget of the simulators (default: what main.py takes on the "
                             "device: 256 MB on a CPU, a quarter of the free memory on a GPU)")
    parser.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.vari is not None:
        HW_OVERRIDES["vari"] = args.vari
    if args.batch is not None and args.batch < 1:
        print(f"--batch {args.batch}: a batch holds at least 1 sample", file=sys.stderr)
        return 2
    if args.memory_mb is not None:
        if args.memory_mb <= 0:
            print(f"--memory_mb {args.memory_mb:g}: the budget must be positive", file=sys.stderr)
            return 2
        BUDGET["memory_mb"] = args.memory_mb
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if args.worker:
        workload, method = args.worker
        result = measure(
            workload,
            method,
            args.batch,
            device,
            args.repeats,
            args.budget,
            Path(args.save) if args.save else None,
        )
        print(json.dumps(result))
        return 0

    sizes = batch_sizes(args.quick)
    if args.batch is not None:
        sizes = dict.fromkeys(sizes, args.batch)
    from nipa.simulator.crossbar import product_formats

    results: dict[str, Any] = {
        "benchmark": "bench/simulator.py",
        "quick": args.quick,
        "machine": machine_info(device),
        "hw_point": {**HW_POINT, **HW_OVERRIDES},
        "memory_mb": BUDGET.get("memory_mb") or default_budget(device),
        "product_seconds": product_formats(device),
        "fast_kernels_requested": args.compile,
        "lookup_requested": args.lookup,
        "repeats_requested": args.repeats,
        "repeat_budget_s": args.budget,
        "warm_up": "one forward on 2 samples per method before timing",
        "workloads": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
            if workload not in sizes:
                raise SystemExit(f"unknown workload {workload!r}")
            batch = sizes[workload]
            methods = list(METHODS)
            notes = []
            if workload == "resnet18" and args.quick:
                methods.remove("naive")
                notes.append("--quick: naive loop not run on the whole ResNet-18; see resnet18_subset")
            if workload == "resnet18_subset":
                notes.append(
                    "layers " + ", ".join(RESNET_SUBSET) + " each fed the activation it sees in the "
                    "model (one 3x3 conv per stage, the stem, a 1x1 stride-2 shortcut, the classifier)"
                )
            runs = {}
            for method in methods:
                print(f"[{time.perf_counter() - started:7.1f}s] {workload}: {method} ...", flush=True)
                runs[method] = run_worker(
                    args, workload, method, batch, Path(tmp) / f"{workload}-{method}.pt"
                )
                if runs[method]["repeats"] < args.repeats:
                    notes.append(
                        f"{method}: {runs[method]['repeats']} timed repeat(s), one forward took "
                        f"{runs[method]['seconds_all'][0]:.1f} s (budget {args.budget:g} s)"
                    )
            entry: dict[str, Any] = {"batch": batch, "runs": runs, "summary": summarize(runs), "notes": notes}
            if "fast" in runs and "naive" in runs:
                fast_out = torch.load(Path(tmp) / f"{workload}-fast.pt", weights_only=True)
                naive_out = torch.load(Path(tmp) / f"{workload}-naive.pt", weights_only=True)
                entry["raw_cells_max_rel_diff"] = max_rel_diff(fast_out, naive_out)
                entry["raw_cells_note"] = (
                    "end-to-end outputs of the timed runs (real cells): rare ADC level flips at rounding "
                    "boundaries, then growing through later layers' input quantization"
                )
                check_batch = min(batch, {"smallcnn": 16, "resnet18": 2}.get(workload, 4))
                print(f"[{time.perf_counter() - started:7.1f}s] {workload}: exactness check ...", flush=True)
                per_layer = exactness_check(workload, check_batch, device)
                entry["max_rel_diff"] = max(per_layer.values())
                entry["max_rel_diff_per_layer"] = per_layer
                entry["exactness_check"] = (
                    f"same chip, cells snapped to a 2^-{SNAP_BITS} grid, batch {check_batch}, layer by layer "
                    "(each naive layer fed the input its fast twin saw): must agree to float rounding"
                )
            if "fast" in runs:
                oracle_batch = min(batch, {"smallcnn": 4, "resnet18": 1}.get(workload, 2))
                print(f"[{time.perf_counter() - started:7.1f}s] {workload}: oracle check ...", flush=True)
                per_layer = oracle_check(workload, oracle_batch, device)
                entry["oracle_max_rel_diff"] = max(per_layer.values())
                entry["oracle_max_rel_diff_per_layer"] = per_layer
                entry["oracle_check"] = (
                    f"the float64 oracle of tests/helpers/oracle.py (SPEC section 4 from its text alone) on "
                    f"the same snapped cells, batch {oracle_batch}, layer by layer"
                )
            results["workloads"][workload] = entry
        if not args.no_profile:
            workload = (
                "resnet18_subset"
                if "resnet18_subset" in results["workloads"]
                else next(iter(results["workloads"]), None)
            )
            if workload:
                # The profile runs in this process: the fast simulator's kernels as the workers ran them.
                os.environ["NIPA_COMPILE"] = "1" if args.compile == "on" else "0"
                os.environ["NIPA_LOOKUP"] = "1" if args.lookup == "on" else "0"
                print(
                    f"[{time.perf_counter() - started:7.1f}s] profile of one fast forward ({workload}) ...",
                    flush=True,
                )
                results["profile_fast"] = {
                    "workload": workload,
                    "batch": sizes[workload],
                    **profile_fast(workload, sizes[workload], device),
                }
    results["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["total_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
