"""Measurements for `bench`: synchronised timing, peak memory, accuracy against a reference, fresh-process start-up,
end-to-end bundle runs, and the machine description."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_trt.bench.startup import MARKER

__all__ = [
    "sync", "timed", "peak_memory", "reset_peak_memory", "compare_outputs_to", "summarize_accuracy", "startup_probe",
    "run_bundle", "machine_info",
]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> tuple[dict[str, Any], Any]:
    """Run `fn` `warmup` times untimed, then `repeats` times timed (synchronised). Returns ({median_s, samples_s}, last
    result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "samples_s": samples}, out


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated by PyTorch's CUDA allocator since the last reset (None on CPU)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


# -------------------------------------------------------------------------------------------------------- accuracy
def _masks(logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Class-index mask of [B, C, ...] logits (argmax; one channel: > 0) and the foreground classes."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long(), [1]
    return logits.argmax(1), list(range(1, logits.shape[1]))


def _label_mask(label: torch.Tensor) -> torch.Tensor:
    """[B, ...] class indices from a [B, 1, ...] index label or a [B, C, ...] one-hot label."""
    return label[:, 0].long() if label.shape[1] == 1 else label.argmax(1)


def _directed_hd95(a: Any, b: Any) -> tuple[Any, Any]:
    """Surface distances A->B and B->A (edge voxels; distance to the other mask's nearest edge voxel)."""
    from scipy.ndimage import binary_erosion, distance_transform_edt  # monai's own dependency here

    edge_a, edge_b = a ^ binary_erosion(a), b ^ binary_erosion(b)
    return distance_transform_edt(~edge_b)[edge_a], distance_transform_edt(~edge_a)[edge_b]


def _hd95(a: torch.Tensor, b: torch.Tensor, classes: Sequence[int]) -> list[float | None]:
    """95th-percentile Hausdorff distance (voxels) per class between [1, ...] index masks; None without foreground.

    Same definition as `monai.metrics.compute_hausdorff_distance(percentile=95)` with the Euclidean distance
    transform, computed on the masks' bounding box (MONAI's KD-tree path takes minutes on noisy 240x240x160 masks).
    """
    import numpy as np

    out: list[float | None] = []
    for c in classes:
        pa, pb = (a[0] == c).numpy(), (b[0] == c).numpy()
        if not pa.any() or not pb.any():
            out.append(None)
            continue
        nonzero = np.argwhere(pa | pb)
        lo, hi = np.maximum(nonzero.min(0) - 1, 0), nonzero.max(0) + 2
        box = tuple(slice(int(s), int(e)) for s, e in zip(lo, hi))
        d_ab, d_ba = _directed_hd95(np.pad(pa[box], 1), np.pad(pb[box], 1))
        out.append(float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))))
    return out


def compare_outputs_to(out: torch.Tensor, ref: torch.Tensor | None, label: torch.Tensor | None,
                       hd95: bool) -> dict[str, Any]:
    """One volume: Dice per foreground class (argmax masks), HD95, max abs error and relative L2 of the logits
    against `ref`; Dice/HD95 of the mask against `label` when given."""
    out = out.detach().float().cpu()
    mask, classes = _masks(out)
    result: dict[str, Any] = {}
    if ref is not None:
        ref = ref.detach().float().cpu()
        ref_mask, _ = _masks(ref)
        result["vs_ref"] = {
            "dice": [_dice(mask, ref_mask, c) for c in classes],
            "hd95": _hd95(mask, ref_mask, classes) if hd95 else None,
            "max_abs": float((out - ref).abs().max()),
            "rel_l2": float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-12)),
            "argmax_agreement": float((mask == ref_mask).float().mean()),
        }
    if label is not None:
        lab = _label_mask(label.cpu())
        if tuple(lab.shape) == tuple(mask.shape):
            result["vs_labels"] = {"dice": [_dice(mask, lab, c) for c in classes],
                                   "hd95": _hd95(mask, lab, classes) if hd95 else None}
    return result


def _dice(a: torch.Tensor, b: torch.Tensor, c: int) -> float:
    pa, pb = a == c, b == c
    total = int(pa.sum()) + int(pb.sum())
    return 1.0 if total == 0 else 2.0 * int((pa & pb).sum()) / total


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(kept) if kept else None


def summarize_accuracy(per_volume: Sequence[Mapping[str, Any]], what: str) -> dict[str, Any] | None:
    """Aggregate over volumes: mean Dice (per class and over classes), mean HD95, worst max-abs / rel-L2 / agreement."""
    rows = [v[what] for v in per_volume if what in v]
    if not rows:
        return None
    classes = len(rows[0]["dice"])
    dice_per_class = [_mean([r["dice"][c] for r in rows]) for c in range(classes)]
    summary: dict[str, Any] = {"volumes": len(rows), "dice": _mean(dice_per_class), "dice_per_class": dice_per_class}
    if rows[0]["hd95"] is None:
        summary["hd95"] = None
    else:
        summary["hd95"] = _mean([_mean(r["hd95"]) for r in rows])
    for key, pick in (("max_abs", max), ("rel_l2", max), ("argmax_agreement", min)):
        if key in rows[0]:
            summary[key] = pick(r[key] for r in rows)
    summary["per_volume"] = rows
    return summary


# ------------------------------------------------------------------------------------------------------- processes
def startup_probe(workload_spec: Mapping[str, Any], patch: Any, batch_shape: Sequence[int], env: Mapping[str, str],
                  timeout: float) -> dict[str, Any]:
    """Seconds from a fresh process's start to its first network output (cache-hit start-up when `patch` is set).

    Raises:
        RuntimeError: the probe failed (its stderr tail in the message) or printed no result.
    """
    t0 = time.time()
    spec = json.dumps({"t0": t0, "workload": workload_spec, "patch": patch, "batch_shape": list(batch_shape)})
    done = subprocess.run([sys.executable, "-m", "monai_trt.bench.startup", spec], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=timeout, check=False)
    wall = time.time() - t0
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode or not lines:
        raise RuntimeError(f"start-up probe exited with {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
    return {**json.loads(lines[-1][len(MARKER):]), "process_wall_s": wall}


def run_bundle(args: Sequence[str], env: Mapping[str, str], log_path: Path, timeout: float) -> dict[str, Any]:
    """`python -m monai.bundle run <args>`: wall seconds, exit status, its log file (stdout+stderr)."""
    command = [sys.executable, "-m", "monai.bundle", "run", *args]
    start = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                  timeout=timeout, check=False)
        rc = done.returncode
    except subprocess.TimeoutExpired:
        rc = None
    wall = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    tail = text.splitlines()[-15:]
    result: dict[str, Any] = {"status": "ok" if rc == 0 else "error", "wall_s": wall, "returncode": rc,
                              "command": command, "log": str(log_path)}
    metrics = re.findall(r"Key metric: (\S+) best value: ([-+0-9.eE]+)", text)  # the evaluator's StatsHandler
    if metrics:
        result["key_metric"] = {"name": metrics[-1][0], "value": float(metrics[-1][1])}
    if rc != 0:
        result["error"] = f"timed out after {timeout:.0f} s" if rc is None else "\n".join(tail)
    return result


# ---------------------------------------------------------------------------------------------------------- machine
def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def machine_info(device: torch.device) -> dict[str, Any]:
    """GPU, driver, CUDA/cuDNN, library versions, CPU and OS: what the numbers depend on."""
    import monai

    import monai_trt

    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "memory_bytes": int(props.total_memory), "driver": _driver()}
    versions = {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
                "monai_trt": monai_trt.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for name in ("onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript", "tensorrt", "torch_tensorrt", "triton",
                 "numpy"):
        versions[name] = _version(name)
    return {"device": str(device), "gpu": gpu, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "os": platform.platform(),
            "versions": {k: v for k, v in versions.items() if v is not None}}
