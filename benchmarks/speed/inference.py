"""Sliding-window inference for the ``unet3d`` section, one case per fresh interpreter.

:func:`inference_rows` runs each case (deterministic, Bayesian with several posterior
samples) through :func:`run_inference_case`, which starts a new Python process running
:func:`inference_worker`, so that the peak resident memory it reports belongs to that case
alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dwp
from unet3d import UNet3D, kernel3_layers

from .machine import OtherLoad, is_busy, reset_peak_rss, rss_mib, tune_glibc_malloc
from .settings import INFERENCE_OVERLAP

__all__ = ["INFERENCE_RESULT_TAG", "inference_rows", "inference_worker", "run_inference_case"]

#: Prefix of the result line a fresh inference process prints on stdout.
INFERENCE_RESULT_TAG = "SPEED_INFERENCE_RESULT "


def inference_worker(spec_json: str) -> None:
    """Time and measure one :func:`unet3d.inference.predict_volume` call; print a JSON line.

    Runs in a fresh interpreter (see :func:`run_inference_case`) so that the peak RSS
    belongs to this case alone (in a process that ran anything before, glibc's free lists
    would serve part of the prediction from memory already counted in the baseline): the
    model and the input are built and one window is predicted as a warm-up, the peak is
    reset to the current RSS (``/proc/self/clear_refs``), the prediction runs, and the new
    peak minus that baseline is what inference needed on top of the model and the input.

    Parameters
    ----------
    spec_json
        The case as JSON: ``seed``, ``threads``, ``tune_malloc``, ``widths``, ``bayesian``,
        ``samples``, ``volume``, ``roi`` and ``overlap``.
    """
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    if spec["tune_malloc"]:
        tune_glibc_malloc()
    from monai.inferers import sliding_window_inference  # noqa: F401  (in the baseline)

    from unet3d.inference import predict_volume

    torch.manual_seed(spec["seed"])
    model = UNet3D(widths=spec["widths"])
    if spec["bayesian"]:
        model = dwp.bayesianize(model, include=kernel3_layers(model))
    image = torch.rand(1, *spec["volume"])
    # warm-up on one window (oneDNN primitives, MONAI's lazy imports), outside the timing;
    # what it leaves resident is part of the baseline, as in any long-running predictor
    predict_volume(model, image[:, : spec["roi"], : spec["roi"], : spec["roi"]], 1)
    gc.collect()
    exact = reset_peak_rss()
    before = rss_mib()
    with OtherLoad().measure() as load:
        start = time.perf_counter()
        prediction = predict_volume(
            model,
            image,
            spec["samples"],
            roi_size=spec["roi"],
            overlap=spec["overlap"],
            seed=spec["seed"],
        )
        wall = time.perf_counter() - start
    after = rss_mib()
    peak = after["VmHWM"] if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "wall_s": wall,
        "passes": prediction.n_samples,
        "baseline_rss_mib": before["VmRSS"],
        "peak_rss_mib": peak,
        "peak_above_baseline_mib": peak - before["VmRSS"],
        "memory_method": (
            "VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS after model load"
            if exact
            else "ru_maxrss of the whole process (includes imports), minus VmRSS after model load"
        ),
        "other_processes_cores": load.cores,
        "mean_mutual_information": float(prediction.mutual_information.mean()),
    }
    print(INFERENCE_RESULT_TAG + json.dumps(result), flush=True)


def run_inference_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`inference_worker` in a fresh interpreter and return its result.

    Raises
    ------
    RuntimeError
        When the worker fails or prints no result line; the message ends with its stderr.
    """
    code = (
        "import sys; from benchmarks.speed.inference import inference_worker; "
        "inference_worker(sys.argv[1])"
    )
    # the repository root, so the worker imports this very checkout from any directory
    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(INFERENCE_RESULT_TAG)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"inference worker failed (status {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(INFERENCE_RESULT_TAG) :])


def inference_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Sliding-window inference: deterministic, then Bayesian with 1 and many samples."""
    cases = [("infer_deterministic", False, 1)] + [
        (f"infer_bayesian_{n}", True, n) for n in args.inference_samples
    ]
    rows: list[dict[str, Any]] = []
    for name, bayesian, samples in cases:
        spec = {
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "tune_malloc": not args.system_allocator,
            "widths": list(args.strategy_widths),
            "bayesian": bayesian,
            "samples": samples,
            "volume": list(args.inference_volume),
            "roi": args.inference_roi,
            "overlap": INFERENCE_OVERLAP,
        }
        print(f"[unet3d] inference {name} ...", file=sys.stderr, flush=True)
        result = run_inference_case(spec)
        wall = result["wall_s"]
        rows.append(
            {
                "section": "unet3d",
                "variant": name,
                "kind": "inference",
                "bayesian": bayesian,
                "samples": samples,
                "passes": result["passes"],
                "widths": spec["widths"],
                "volume": spec["volume"],
                "roi": spec["roi"],
                "overlap": spec["overlap"],
                "reps": 1,
                "median_s": wall,
                "iqr_s": None,
                "s_per_pass": wall / result["passes"],
                "baseline": "infer_deterministic",
                "ratio": None,  # filled in below
                "target_ratio": None,
                "met": None,
                "noisy": is_busy(result["other_processes_cores"]),
                **{k: v for k, v in result.items() if k not in ("wall_s", "passes")},
                "times_s": [wall],
            }
        )
    for row in rows:
        row["ratio"] = row["median_s"] / rows[0]["median_s"]
    return rows
