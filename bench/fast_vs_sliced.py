#!/usr/bin/env python
"""Evaluation time of the error-injection method (`nipa.estimation.inject`, SPEC section 7) against our batched
bit-and-crossbar simulator (`nipa.simulator.crossbar.convert`) and the naive loop baseline of the simulator
benchmark (`nipa.simulator.reference.naive_convert`), in one run, same inputs, same hardware point.

    python bench/fast_vs_sliced.py [--quick] [--device cpu|cuda] [--out results/bench/fast_vs_sliced.json]

Workloads: the default SmallCNN (trained checkpoint when present) on a batch of 1x28x28 inputs;
ResNet-18 (CIFAR shapes, random weights) on a batch of 3x32x32 inputs, the whole model and a subset of
its layers (the stem, one 3x3 conv per stage, a 1x1 stride-2 shortcut, the classifier), each fed the
activation it sees in the model. Hardware point: 8-bit weights and inputs, 128 rows, 5-bit dynamic
ADC, 1-bit cells, state-dependent variation 0.1 (the simulator benchmark's point).

What is timed: one forward of a converted model on the batch (median of --repeats; the methods are
interleaved repeat by repeat so that a busy machine slows them alike; a warm-up forward first). The
one-off costs are reported apart: conversion of each method (quantize, slice, program the cells /
draw the effective weight) and the fast method's ADC calibration (read ranges measured once per
(wl_weight, subArray, cellBit, wl_input), shared by every point and draw with those).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing the package

import torch  # noqa: E402
from torch import nn  # noqa: E402
from workloads import (  # noqa: E402
    HW_POINT,
    RESNET_SUBSET,
    LayerSubset,
    build_workload,
    first_samples,
    synchronize,
)

from nipa.estimation.inject import AdcCalibration, inject  # noqa: E402
from nipa.hardware.config import HWConfig  # noqa: E402
from nipa.simulator.crossbar import convert, release_workspaces  # noqa: E402
from nipa.simulator.reference import naive_convert  # noqa: E402

METHODS = ("plain", "fast", "sliced", "naive")


def convert_method(method: str, model: nn.Module, hw: HWConfig, inputs: Any,
                   device: torch.device) -> tuple[nn.Module, dict[str, float]]:
    """The model as `method` evaluates it, and the one-off seconds it took to get there."""
    synchronize(device)
    started = time.perf_counter()
    costs: dict[str, float] = {}
    if method == "plain":
        converted = model
    elif method == "fast":
        if isinstance(model, LayerSubset):
            layers = {}
            calib_s = 0.0
            for name, layer, x in zip(model.names, model.layers.values(), inputs, strict=True):
                calibration = AdcCalibration(layer, [x])
                t0 = time.perf_counter()
                calibration.errors(hw)
                calib_s += time.perf_counter() - t0
                layers[name] = inject(layer, hw, method="calibrated", calibration=calibration)
            converted = LayerSubset(layers).eval()
        else:
            calibration = AdcCalibration(model, [inputs])
            t0 = time.perf_counter()
            calibration.errors(hw)
            calib_s = time.perf_counter() - t0
            converted = inject(model, hw, method="calibrated", calibration=calibration).eval()
        costs["calibration_s"] = calib_s
    elif method == "sliced":
        converted = _convert_any(convert, model, hw)
    else:
        converted = _convert_any(naive_convert, model, hw)
    synchronize(device)
    costs["convert_s"] = time.perf_counter() - started - costs.get("calibration_s", 0.0)
    return converted, costs


def _convert_any(fn: Callable, model: nn.Module, hw: HWConfig) -> nn.Module:
    if isinstance(model, LayerSubset):
        return LayerSubset({n: fn(layer, hw, seed=0, chip=0)
                            for n, layer in zip(model.names, model.layers.values(), strict=True)}).eval()
    return fn(model, hw, seed=0, chip=0).eval()


@torch.no_grad()
def run_workload(name: str, batch: int, device: torch.device, repeats: int, budget: float,
                 methods: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    model, inputs, weights = build_workload(name, batch, device)
    hw = HWConfig(**HW_POINT)
    runners: dict[str, nn.Module] = {}
    one_off: dict[str, dict[str, float]] = {}
    for method in methods:
        runners[method], one_off[method] = convert_method(method, model, hw, inputs, device)
        runners[method](first_samples(inputs, 2))  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    layer_times: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    outputs: dict[str, Any] = {}
    for repeat in range(repeats):
        for method in methods:
            spent = sum(times[method])
            if times[method] and spent + times[method][-1] > budget:
                continue  # this method is over its time budget: fewer repeats (recorded)
            runner = runners[method]
            synchronize(device)
            t0 = time.perf_counter()
            if isinstance(runner, LayerSubset):
                out = []
                for layer_name, layer, x in zip(runner.names, runner.layers.values(), inputs, strict=True):
                    t1 = time.perf_counter()
                    out.append(layer(x))
                    synchronize(device)
                    layer_times[method].setdefault(layer_name, []).append(time.perf_counter() - t1)
            else:
                out = runner(inputs)
            synchronize(device)
            times[method].append(time.perf_counter() - t0)
            outputs[method] = out
        log(f"  {name} repeat {repeat + 1}: " + ", ".join(
            f"{m} {times[m][-1]:.3f}s" for m in methods if len(times[m]) == repeat + 1))
    release_workspaces()
    runs = {m: {"seconds": statistics.median(times[m]), "seconds_all": times[m], "repeats": len(times[m]),
                **one_off[m]} for m in methods}
    for m in methods:
        if layer_times[m]:
            runs[m]["layer_seconds"] = {k: statistics.median(v) for k, v in layer_times[m].items()}
    entry: dict[str, Any] = {"batch": batch, "weights": weights, "runs": runs, "summary": {}}
    fast = runs["fast"]["seconds"]
    summary = entry["summary"]
    for other in ("sliced", "naive"):
        if other in runs:
            summary[f"speedup_vs_{other}"] = runs[other]["seconds"] / fast
    if "plain" in runs:
        summary["fast_vs_plain"] = fast / runs["plain"]["seconds"]
    if "layer_seconds" in runs["fast"]:
        summary["per_layer"] = {
            layer: {**{f"{m}_s": runs[m]["layer_seconds"][layer] for m in methods},
                    **{f"speedup_vs_{o}": runs[o]["layer_seconds"][layer]
                       / runs["fast"]["layer_seconds"][layer] for o in ("sliced", "naive") if o in runs}}
            for layer in runs["fast"]["layer_seconds"]}
    if "sliced" in outputs:
        # Sanity: the fast method approximates the simulator (different noise, same scale).
        a, b = outputs["fast"], outputs["sliced"]
        pairs = list(zip(a, b, strict=True)) if isinstance(a, list) else [(a, b)]
        summary["fast_vs_sliced_rel_rms_diff"] = max(
            float((x - y).pow(2).mean().sqrt() / y.pow(2).mean().sqrt()) for x, y in pairs)
    return entry


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu_model = next((line.split(":", 1)[1].strip() for line in handle
                              if line.startswith("model name")), cpu_model)
    except OSError:
        pass
    info = {"cpu_count": os.cpu_count(), "cpu_model": cpu_model, "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "python": platform.python_version(), "device": str(device),
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(results: dict[str, Any]) -> None:
    header = ["workload", "batch", "plain s", "fast s", "sliced s", "naive s", "x sliced", "x naive"]
    print("\n" + f"{header[0]:18s} " + " ".join(f"{h:>9s}" for h in header[1:]))
    for name, entry in results["workloads"].items():
        runs, summary = entry["runs"], entry["summary"]
        cells = [f"{entry['batch']:9d}"]
        cells += [f"{runs[m]['seconds']:9.4f}" if m in runs else f"{'-':>9s}" for m in METHODS]
        cells += [f"{summary[k]:9.1f}" if k in summary else f"{'-':>9s}"
                  for k in ("speedup_vs_sliced", "speedup_vs_naive")]
        print(f"{name:18s} " + " ".join(cells))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small batches (SmallCNN 64, ResNet-18 4); naive loop on the layer subset only")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "fast_vs_sliced.json"))
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per method (median)")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="a method stops repeating once another forward would exceed this many seconds")
    parser.add_argument("--workloads", default="smallcnn,resnet18,resnet18_subset",
                        help="comma-separated subset of smallcnn,resnet18,resnet18_subset")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {"smallcnn": 64 if args.quick else 256, "resnet18": 4 if args.quick else 16,
             "resnet18_subset": 4 if args.quick else 16}
    results: dict[str, Any] = {
        "benchmark": "bench/fast_vs_sliced.py", "quick": args.quick, "machine": machine_info(device),
        "hw_point": HW_POINT, "fast_method": "inject(method='calibrated'): cell-model device error in the "
        "effective weight, fake-quantized input, one F.conv2d/F.linear per layer, measured ADC error "
        "added as output noise (one scaled add from a pool drawn per draw)",
        "baselines": {"sliced": "nipa.simulator.crossbar.convert (batched bit-and-crossbar simulator)",
                      "naive": "nipa.simulator.reference.naive_convert (one product per tile, input bit and slice)",
                      "plain": "the float model"},
        "repeats_requested": args.repeats, "repeat_budget_s": args.budget,
        "timing": "median of interleaved repeats of one forward on the batch, after one warm-up forward",
        "resnet18_subset_layers": RESNET_SUBSET, "workloads": {}}
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {line}", flush=True)

    for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        if workload not in sizes:
            raise SystemExit(f"unknown workload {workload!r}; choose from {', '.join(sizes)}")
        methods = list(METHODS)
        notes = []
        if workload == "resnet18" and args.quick:
            methods.remove("naive")
            notes.append("--quick: naive loop not run on the whole ResNet-18; see resnet18_subset")
        log(f"{workload} (batch {sizes[workload]}): {', '.join(methods)}")
        entry = run_workload(workload, sizes[workload], device, args.repeats, args.budget, methods, log)
        for method, run in entry["runs"].items():
            if run["repeats"] < args.repeats:
                notes.append(f"{method}: {run['repeats']} timed repeat(s) (one forward took "
                             f"{run['seconds_all'][0]:.1f} s, budget {args.budget:g} s)")
        entry["notes"] = notes
        results["workloads"][workload] = entry
        s = entry["summary"]
        log(f"{workload}: fast {entry['runs']['fast']['seconds']:.4f}s, "
            + ", ".join(f"{k} {v:.1f}x" for k, v in s.items() if k.startswith("speedup")))
    results["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["total_seconds"] = time.perf_counter() - started
    goals = {"speedup_vs_sliced": 30.0, "speedup_vs_naive": 100.0}
    results["goals"] = {
        name: {"target": target, "met": {w: e["summary"].get(name, 0.0) >= target
                                         for w, e in results["workloads"].items() if name in e["summary"]}}
        for name, target in goals.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
