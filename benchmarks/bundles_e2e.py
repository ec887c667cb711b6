"""Whole `python -m monai.bundle run` wall time, patch on (warm cache) against `--trt False`, median of N each.

For each bundle: one untimed plain run (data, imports and file caches warm), one cold run with the patch (builds,
validates, measures the speed gate: its time is reported, not compared), then N rounds of (off, on) alternating, so
that drift on the machine hits both alike. Writes `<out>/bundles_e2e.json` and `.md`; the events file of each warm
run tells whether engines served from the cache (no build) or the gate chose PyTorch.

Usage (repo root): python benchmarks/bundles_e2e.py OUT [--bundles spheres_segmentation,...] [--repeats 3]
    [--override '{"key": value}'] [--profile]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai_trt.events import EVENTS_ENV, read_events  # noqa: E402 - the repo, not an installed copy


def run(bundle: str, out: Path, name: str, patch: bool, overrides: dict, env: dict, profile: bool = False) -> dict:
    root = ROOT / "bundles" / bundle
    configs = [str(root / "configs" / "inference.json")]
    if patch:
        configs.append(str(root / "configs" / "inference_trt.json"))
    stats = out / bundle / f"{name}.pstats"
    profiler = ["-m", "cProfile", "-o", str(stats)] if profile else []
    cmd = [sys.executable, *profiler, "-m", "monai.bundle", "run", "--config_file", repr(configs),
           "--bundle_root", str(root), "--output_dir", str(out / bundle / name)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else repr(value)]
    events = out / bundle / f"{name}.events.jsonl"
    events.parent.mkdir(parents=True, exist_ok=True)
    events.unlink(missing_ok=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env, EVENTS_ENV: str(events)})
    wall = time.perf_counter() - start
    (out / bundle / f"{name}.log").write_text(done.stdout + done.stderr)
    kinds = [e.kind for e in read_events(events)]
    if profile and stats.exists():
        text = io.StringIO()
        pstats.Stats(str(stats), stream=text).sort_stats("cumulative").print_stats(45)
        (out / bundle / f"{name}.profile.txt").write_text(text.getvalue())
    row = {"name": name, "rc": done.returncode, "wall_s": round(wall, 3), "built": kinds.count("built"),
           "cache_hits": kinds.count("cache_hit")}
    with open(out / bundle / "runs.jsonl", "a", encoding="utf-8") as runs:  # kept if the script is cut short
        runs.write(json.dumps(row) + "\n")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--bundles", default="spheres_segmentation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--override", default="{}", help="JSON of config ids to override in every run")
    parser.add_argument("--profile", action="store_true", help="one more warm run on and off under cProfile")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    env = {"MONAI_TRT_CACHE": str(out / "cache")}
    overrides = json.loads(args.override)
    results = {"command": [sys.executable, *sys.argv], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "repeats": args.repeats, "bundles": {}}
    for bundle in args.bundles.split(","):
        rows = [run(bundle, out, "warmup", False, overrides, env), run(bundle, out, "on_cold", True, overrides, env)]
        for i in range(args.repeats):  # `off` = the patch merged and switched off, as a user would run it
            rows.append(run(bundle, out, f"off_{i}", True, {**overrides, "trt": False}, env))
            rows.append(run(bundle, out, f"on_{i}", True, overrides, env))
        if args.profile:  # where a warm run's time goes, patch on and off (not in the medians)
            rows.append(run(bundle, out, "profile_off", True, {**overrides, "trt": False}, env, profile=True))
            rows.append(run(bundle, out, "profile_on", True, overrides, env, profile=True))
        off = [r["wall_s"] for r in rows if r["name"].startswith("off_")]
        on = [r["wall_s"] for r in rows if r["name"].startswith("on_") and r["name"] != "on_cold"]
        summary = {"off_median_s": statistics.median(off), "on_warm_median_s": statistics.median(on),
                   "on_cold_s": rows[1]["wall_s"], "all_ok": all(r["rc"] == 0 for r in rows),
                   "warm_runs_built": sum(r["built"] for r in rows[2:] if r["name"].startswith("on_"))}
        summary["on_over_off"] = round(summary["on_warm_median_s"] / summary["off_median_s"], 3)
        results["bundles"][bundle] = {"runs": rows, "summary": summary}
        print(bundle, json.dumps(summary), flush=True)
    (out / "bundles_e2e.json").write_text(json.dumps(results, indent=1))
    lines = ["| bundle | --trt False median s | patch on, warm cache, median s | on / off | cold (build) s | "
             "warm runs that built |", "|---|---|---|---|---|---|"]
    for bundle, data in results["bundles"].items():
        s = data["summary"]
        lines.append(f"| {bundle} | {s['off_median_s']:.2f} | {s['on_warm_median_s']:.2f} | {s['on_over_off']:.3f} | "
                     f"{s['on_cold_s']:.1f} | {s['warm_runs_built']} |")
    (out / "bundles_e2e.md").write_text("\n".join(lines) + f"\n\nCommand: `{' '.join(results['command'])}`\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
