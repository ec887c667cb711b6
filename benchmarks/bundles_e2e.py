"""Whole `python -m monai.bundle run` wall time, patch on (warm cache) against `--trt False`, median of N each.

For each bundle: one untimed plain run (data, imports and file caches warm), one cold run with the patch (builds,
validates, measures the speed gate: its time is reported, not compared), then N pairs of runs, off then on, on then
off, alternately (ABBA), so that drift on the machine and whatever a run leaves to the next hit both alike; the
median of the pairs' ratios is reported beside the ratio of the medians. Writes `<out>/bundles_e2e.json` and
`.md`; the events file of each warm run tells whether engines served from the cache (no build) or the gate chose
PyTorch (a run renting PyTorch before it takes its engine, runtime/rent.py, has neither: its log says so).

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


def run(bundle: str, out: Path, name: str, patch: bool, overrides: dict, env: dict, profile: bool = False,
        pyspy: str = "") -> dict:
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
    if pyspy:  # wall-time samples of every thread, idle included (py-spy starts python itself)
        cmd = [pyspy, "record", "--idle", "--threads", "--format", "raw", "--rate", "200",
               "-o", str(out / bundle / f"{name}.pyspy.txt"), "--", *cmd]
    events = out / bundle / f"{name}.events.jsonl"
    events.parent.mkdir(parents=True, exist_ok=True)
    events.unlink(missing_ok=True)
    start_epoch, start = time.time(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env, EVENTS_ENV: str(events)})
    wall = time.perf_counter() - start
    (out / bundle / f"{name}.log").write_text(done.stdout + done.stderr)
    kinds = [e.kind for e in read_events(events)]
    if profile and stats.exists():
        text = io.StringIO()
        pstats.Stats(str(stats), stream=text).sort_stats("cumulative").print_stats(45)
        (out / bundle / f"{name}.profile.txt").write_text(text.getvalue())
    row = {"name": name, "rc": done.returncode, "wall_s": round(wall, 3), "built": kinds.count("built"),
           "cache_hits": kinds.count("cache_hit"), **_phases(done.stdout + done.stderr, start_epoch, wall)}
    with open(out / bundle / "runs.jsonl", "a", encoding="utf-8") as runs:  # kept if the script is cut short
        runs.write(json.dumps(row) + "\n")
    return row


def _phases(log: str, start_epoch: float, wall: float) -> dict:
    """Where the wall time went, from the log's timestamps: before the first log line (interpreter, imports, config
    parsing), the logged part (to the evaluator's last line), and after it (finalize, interpreter exit)."""
    stamps = []
    for line in log.splitlines():
        try:
            stamps.append((time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1e3, line))
        except ValueError:
            continue
    if not stamps:
        return {}
    first = stamps[0][0]
    last = next((t for t, line in reversed(stamps) if "Engine run finished" in line), stamps[-1][0])
    return {"before_log_s": round(first - start_epoch, 3), "logged_s": round(last - first, 3),
            "after_log_s": round(start_epoch + wall - last, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--bundles", default="spheres_segmentation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--override", default="{}", help="JSON of config ids to override in every run")
    parser.add_argument("--profile", action="store_true", help="one more warm run on and off under cProfile")
    parser.add_argument("--pyspy", default="", help="path to py-spy: one more warm run on and off under it")
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
            pair = [run(bundle, out, f"off_{i}", True, {**overrides, "trt": False}, env)
                    if side == "off" else run(bundle, out, f"on_{i}", True, overrides, env)
                    for side in (("off", "on") if i % 2 == 0 else ("on", "off"))]  # ABBA: neither side always first
            rows += sorted(pair, key=lambda r: not r["name"].startswith("off_"))
        if args.profile:  # where a warm run's time goes, patch on and off (not in the medians)
            rows.append(run(bundle, out, "profile_off", True, {**overrides, "trt": False}, env, profile=True))
            rows.append(run(bundle, out, "profile_on", True, overrides, env, profile=True))
        if args.pyspy:  # the same, sampled in wall time (interpreter exit included)
            rows.append(run(bundle, out, "pyspy_off", True, {**overrides, "trt": False}, env, pyspy=args.pyspy))
            rows.append(run(bundle, out, "pyspy_on", True, overrides, env, pyspy=args.pyspy))
        off = [r["wall_s"] for r in rows if r["name"].startswith("off_")]
        on = [r["wall_s"] for r in rows if r["name"].startswith("on_") and r["name"] != "on_cold"]
        summary = {"off_median_s": statistics.median(off), "on_warm_median_s": statistics.median(on),
                   "on_cold_s": rows[1]["wall_s"], "all_ok": all(r["rc"] == 0 for r in rows),
                   "warm_runs_built": sum(r["built"] for r in rows[2:] if r["name"].startswith("on_"))}
        summary["on_over_off"] = round(summary["on_warm_median_s"] / summary["off_median_s"], 3)
        summary["paired_on_over_off_median"] = round(statistics.median(b / a for a, b in zip(off, on)), 3)
        for side in ("off", "on"):  # the medians of each phase (see _phases)
            timed = [r for r in rows if r["name"].startswith(f"{side}_") and r["name"] != "on_cold"]
            summary[f"{side}_phases_median_s"] = {
                k: statistics.median(r[k] for r in timed) for k in ("before_log_s", "logged_s", "after_log_s")
                if all(k in r for r in timed)}
        results["bundles"][bundle] = {"runs": rows, "summary": summary}
        print(bundle, json.dumps(summary), flush=True)
    (out / "bundles_e2e.json").write_text(json.dumps(results, indent=1))
    lines = ["| bundle | --trt False median s | patch on, warm cache, median s | on / off | "
             "median of pairs' on / off | cold (build) s | warm runs that built | runs that failed |",
             "|---|---|---|---|---|---|---|---|"]
    for bundle, data in results["bundles"].items():
        s = data["summary"]
        failed = [f"{r['name']} (rc {r['rc']})" for r in data["runs"] if r["rc"] != 0]
        lines.append(f"| {bundle} | {s['off_median_s']:.2f} | {s['on_warm_median_s']:.2f} | {s['on_over_off']:.3f} | "
                     f"{s['paired_on_over_off_median']:.3f} | "
                     f"{s['on_cold_s']:.1f} | {s['warm_runs_built']} | {', '.join(failed) or 'none'} |")
    (out / "bundles_e2e.md").write_text("\n".join(lines) + f"\n\nCommand: `{' '.join(results['command'])}`\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
