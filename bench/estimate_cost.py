#!/usr/bin/env python
"""Cost of the fast estimate's forms against plain inference, in one run (issue 19's budget: 1.5x plain
inference plus one calibration pass).

    python bench/estimate_cost.py [--repeats 7] [--threads 1] [--out results/bench/estimate_cost.json]

SmallCNN on mnist5k's 1,000 test images (batch 256; needs ckpts/smallcnn_mnist5k.pt, from
`python pretrain.py --model_name smallcnn --dataset mnist5k`), at a few exploration-space points. Per
point: one evaluation of the test set by the float model ("plain") and by each form's injected model,
interleaved repeat by repeat (a busy machine slows them alike), the minimum of --repeats; and each form's
calibration pass (4 training batches), timed once. The ratios form / plain are the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing the package

import torch  # noqa: E402

from nipa.estimation.inject import (  # noqa: E402
    DEFAULT_CALIB_BATCHES,
    AdcCalibration,
    InjectionModel,
    calibration_upstream,
    inject,
)
from nipa.hardware.config import HWConfig  # noqa: E402
from nipa.simulator.evaluate import evaluate, resident_batches  # noqa: E402
from nipa.workloads.workload import Workload  # noqa: E402

POINTS = [dict(wl_weight=6, wl_input=8, subArray=128, ADCprecision=5, cellBit=3, vari=0.1),
          dict(wl_weight=4, wl_input=4, subArray=256, ADCprecision=4, cellBit=3),
          dict(wl_weight=7, wl_input=4, subArray=256, ADCprecision=5, cellBit=3),
          dict(wl_weight=8, wl_input=8, subArray=128, ADCprecision=5, cellBit=1, vari=0.1)]
FORMS = ("calibrated", "repeated", "planes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is steadiest)")
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--out", default=str(ROOT / "results" / "bench" / "estimate_cost.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    forms = args.forms.split(",")
    workload = Workload.registry_cnn("smallcnn", "mnist5k")
    model, _, data = workload.load("cpu", batch_size=256)
    data = resident_batches(data, "cpu")
    calib = workload.calibration_inputs(None, DEFAULT_CALIB_BATCHES, 256)
    rows = []
    for point in POINTS:
        hw = HWConfig(**point)
        models, calibration_s = {}, {}
        for form in forms:
            errors = InjectionModel.of(form)
            calibration = AdcCalibration(model, calib, upstream=calibration_upstream(errors))
            started = time.perf_counter()
            models[form] = inject(model, hw, errors=errors, calibration=calibration).eval()
            calibration_s[form] = time.perf_counter() - started
        times: dict[str, list[float]] = {name: [] for name in ("plain", *forms)}
        evaluate(model, data)  # warm-up
        for _ in range(args.repeats):
            for name in times:
                started = time.perf_counter()
                evaluate(model if name == "plain" else models[name], data)
                times[name].append(time.perf_counter() - started)
        plain = min(times["plain"])
        row = {"point": point, "plain_s": plain,
               "ratio": {form: min(times[form]) / plain for form in forms},
               "calibration_s": calibration_s}
        rows.append(row)
        print(f"{point}: plain {plain:.3f} s; " + ", ".join(
            f"{form} {row['ratio'][form]:.2f}x (calibration {calibration_s[form]:.1f} s)" for form in forms),
            flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or
                               platform.machine(), "threads": args.threads, "repeats": args.repeats,
                               "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
