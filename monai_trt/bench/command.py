"""`python -m monai_trt bench`: PyTorch (eager fp32, tf32, AMP, fp16; torch.compile default and reduce-overhead)
against every available engine × precision, side by side, on this machine, in one run: network latency at the window
batch, sliding-window time per volume with speed-ups against fp32, the fastest eager mode and torch.compile, the
end-to-end bundle run, engine build and compile time, cache-hit start-up, peak GPU memory and accuracy against PyTorch
fp32 (and labels).

Writes `results.json`, `results.md` and `chart.png` into `--out`. Each mode runs in turn in this process (engines
through `monai_trt.apply` itself with a fresh cache per mode, torch.compile in a fresh Inductor cache per mode, so
that builds and compiles are measured); start-up and end-to-end runs are fresh processes (see `startup.py`). A mode
that fails is recorded with its error and the bench goes on.
"""

from __future__ import annotations

import ast
import json as jsonlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

from monai_trt.bench.measure import machine_info
from monai_trt.bench.modes import plan_modes
from monai_trt.bench.report import write_chart, write_json, write_markdown
from monai_trt.bench.run import Clock, run_modes
from monai_trt.bench.workload import bundle_workload, w1_settings, w1_workload
from monai_trt.bundle.load import BundleSource, bundle_command
from monai_trt.console import Progress, cli_logging, is_interactive
from monai_trt.errors import UsageError
from monai_trt.patch.spec import parse_switch

__all__ = ["bench", "SCHEMA"]

SCHEMA = "monai_trt.bench.command/1"


def _device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except RuntimeError as err:
        raise UsageError(f"--device {device!r} is not a torch device (e.g. cuda, cuda:1, cpu): {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    if dev.type not in ("cuda", "cpu"):
        raise UsageError(f"--device {device}: only cuda and cpu are supported")
    return dev


def _count(value: Any, name: str, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UsageError(f"--{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_options(bundle_root: Any, workload: Any, workload_args: Any, config_file: Any, override: dict[str, Any],
                   device: Any, modes: Any, methods: Any, precisions: Any
                   ) -> tuple[dict[str, Any] | None, torch.device, list[Any]]:
    """Validate the subject and mode options before any work: (W1 settings or None, device, modes)."""
    if (bundle_root is None) == (workload is None):
        raise UsageError("give either --bundle_root <bundle> or --workload w1")
    if workload is not None and str(workload).lower() != "w1":
        raise UsageError(f"--workload {workload!r} unknown; built-in workloads: w1")
    if workload_args is not None and workload is None:
        raise UsageError("--workload_args applies to --workload w1 only")
    if workload is not None and (override or config_file is not None):
        raise UsageError(f"config options {sorted(override) or ['config_file']} apply to --bundle_root only")
    if not parse_switch(True):
        raise UsageError("environment variable MONAI_TRT switches monai_trt off; unset it to benchmark engines")
    if isinstance(workload_args, str):
        try:
            workload_args = ast.literal_eval(workload_args)
        except (ValueError, SyntaxError) as err:
            raise UsageError(f"--workload_args {workload_args!r} is not a dict literal: {err}") from err
    if workload_args is not None and not isinstance(workload_args, dict):
        raise UsageError(f"--workload_args must be a dict, got {workload_args!r}")
    w1 = w1_settings(workload_args) if workload is not None else None
    dev = _device(device)
    plan = plan_modes(dev, modes, methods, precisions)
    if not plan:
        raise UsageError("no mode left to run (check --modes)")
    return w1, dev, plan


@bundle_command
def bench(
    source: BundleSource,
    workload: str | None = None,
    out: str = "bench_results",
    modes: Any = None,
    methods: Any = None,
    precisions: Any = None,
    device: str | None = None,
    repeats: int = 5,
    warmup: int = 2,
    num_volumes: int = 1,
    hd95: bool = True,
    skip_e2e: bool = False,
    skip_startup: bool = False,
    budget: float | None = None,
    workload_args: Any = None,
    json: bool = False,
    quiet: bool = False,
    verbose: bool = False,
    **override: Any,
) -> None:
    """Benchmark PyTorch (eager fp32 / tf32 / AMP / fp16, torch.compile) against every available engine × precision.

    Per mode: network latency at the sliding-window batch, sliding-window seconds per volume (speed-ups against fp32,
    the fastest eager mode and torch.compile), the bundle end to end (`monai.bundle run`, NIfTI in → mask out), engine
    build or torch.compile time, engine cache-hit start-up (fresh process to first network output, next to eager's),
    peak GPU memory, and accuracy against PyTorch fp32 (Dice, HD95, max abs / relative L2 error of the logits; against
    the labels too when the dataset has them). Medians over --repeats after --warmup
    untimed runs, CUDA synchronised. Writes results.json, results.md and chart.png into --out; prints the table.

    Args:
        workload: instead of a bundle (--bundle_root), a built-in workload: `w1` (SwinUNETR feature 48, 1->2 channels,
            240x240x160 volume, ROI 96^3, sw_batch 8, overlap 0.5; random seeded weights and volume).
        out: output folder (engine caches per mode and end-to-end outputs go under it too).
        modes: only these modes, e.g. "fp32,amp,eager_fp16,aoti_fp16,compile_fp16,compile_fp16_ro" (method names
            select all their precisions; "eager", "compile", "engines" select groups; "compile_<precision>_ma"
            (max-autotune) runs only when named). Default: all but max-autotune on CUDA; no tf32, eager_fp16 and
            compile modes on CPU.
        methods: engine methods (default: every method available on the device; see `monai_trt info`).
        precisions: engine precisions (default fp32,fp16 on CUDA, fp32 on CPU) and torch.compile precisions (default
            fp16 on CUDA, fp32 on CPU).
        device: cuda, cuda:N or cpu (default: cuda when available; for a bundle, overrides its `device` id).
        repeats: timed repeats (medians are reported, raw samples kept in the JSON).
        warmup: untimed runs before timing.
        num_volumes: volumes from the dataset (W1: random volumes) per repeat.
        hd95: compute HD95 (can be slow on large volumes on CPU).
        skip_e2e: do not run the bundle end to end.
        skip_startup: do not measure start-up in fresh processes.
        budget: seconds; once spent, remaining modes and phases are skipped (a running build or compile is not
            interrupted).
        workload_args: W1 settings to change, e.g. "{'feature_size': 12, 'shape': [64, 64, 64]}" (keys:
            feature_size, in_channels, out_channels, shape, roi, sw_batch, overlap, seed, window_size, depths).
        json: print results.json instead of the table.
        quiet: no progress lines on stderr.
        verbose: show monai_trt's INFO logs.
        override: bundle config ids to override, as in `monai.bundle run` (also passed to the end-to-end runs).
    """
    progress = Progress(enabled=not quiet and is_interactive(sys.stderr))

    def note(line: str) -> None:
        if progress.enabled:
            progress.note(line)
        elif not quiet:  # per-phase timing lines also in scripts and logs (a GPU run is long)
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    w1, dev, plan = _check_options(source.bundle_root, workload, workload_args, source.config_file, override, device,
                                   modes, methods, precisions)
    repeats, warmup = _count(repeats, "repeats", 1), _count(warmup, "warmup", 0)
    num_volumes = _count(num_volumes, "num_volumes", 1)
    if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0):
        raise UsageError(f"--budget must be a positive number of seconds, got {budget!r}")
    folder = Path(out).expanduser().absolute()
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"repeats": repeats, "warmup": warmup, "num_volumes": num_volumes, "hd95": bool(hd95),
                "skip_e2e": bool(skip_e2e), "skip_startup": bool(skip_startup), "budget_s": budget,
                "modes": [m.name for m in plan]}
    with cli_logging(verbose), progress:
        clock = Clock(budget, note)
        clock.log(f"modes: {', '.join(m.name + (' (skipped)' if m.skip else '') for m in plan)}")
        if workload is not None:
            work = w1_workload(w1, dev, num_volumes)
        else:
            if device is not None:
                override = {**override, "device": f"$torch.device('{dev}')"}
            work = bundle_workload(source, override, num_volumes)
        if work.device.type != dev.type:  # the bundle's own `device` decides where it runs
            plan = plan_modes(work.device, modes, methods, precisions)
            settings["modes"] = [m.name for m in plan]
        clock.log(f"workload {work.name}: {type(work.network).__name__} on {work.device}, window batch "
                  f"{work.batch_shape}, {len(work.volumes)} volume(s) {list(work.volumes[0].shape)}")
        results: dict[str, Any] = {
            "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": [sys.executable, "-m", "monai_trt", *sys.argv[1:]] if Path(sys.argv[0]).name in (
                "__main__.py", "monai-trt", "monai_trt") else None,
            "machine": machine_info(work.device), "workload": {**work.description, "window_batch": work.batch_shape},
            "settings": settings,
            "reference": "fp32", "modes": {},
        }
        run_modes(work, plan, folder, settings, clock, results)
        results["total_s"] = clock.elapsed()
        write_json(results, folder / "results.json")
        markdown = write_markdown(results, folder / "results.md")
        chart = write_chart(results, folder / "chart.png")
        clock.log(f"done in {clock.elapsed():.0f} s: {folder / 'results.json'}, results.md"
                  + (", chart.png" if chart else " (no chart: matplotlib is not installed)"))
    if json:
        print(jsonlib.dumps(results, indent=1, default=str))
    else:
        print(markdown)
    failed = [name for name, row in results["modes"].items() if row.get("status") == "error"]
    if failed:
        raise UsageError(f"{len(failed)} mode(s) failed: {', '.join(failed)} (errors in {folder / 'results.json'})")
