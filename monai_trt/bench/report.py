"""`bench` reports: speed-ups of every mode against eager fp32, AMP, the fastest eager mode and torch.compile
(also in results.json), a markdown table (one row per mode) and a PNG bar chart (matplotlib, optional: without it the
chart is skipped with a warning)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["write_markdown", "write_chart", "write_json", "markdown_table", "speedups", "add_speedups",
           "COMPILE_REFERENCE"]

logger = logging.getLogger(__name__)

COLUMNS = ("mode", "status", "network ms", "s / volume", "vs fp32", "vs best eager", "vs compile", "end to end s",
           "e2e metric", "build / compile s", "start-up s", "peak GB", "Dice vs fp32", "HD95 vs fp32", "max abs err",
           "rel L2", "Dice vs labels")
# The torch.compile row speed-ups are measured against (FACTS.md's "torch.compile fp16"); without it, the fastest
# default-mode compile row, else the fastest compile row.
COMPILE_REFERENCE = "compile_fp16"


def _get(row: Mapping[str, Any], *path: str) -> Any:
    value: Any = row
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _num(value: Any, fmt: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, fmt)


def _speedup(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _seconds(row: Mapping[str, Any]) -> float | None:
    """A measured row's s / volume (the speed-ups' measure), None for a failed or skipped one."""
    value = _get(row, "sliding_window", "median_s") if row.get("status", "ok") == "ok" else None
    return value if value else None


def _fastest(rows: Mapping[str, Mapping[str, Any]], keep: Any) -> str | None:
    timed = {n: _seconds(r) for n, r in rows.items() if keep(r) and _seconds(r) is not None}
    return min(timed, key=timed.__getitem__) if timed else None


def speedups(results: Mapping[str, Any]) -> tuple[dict[str, str | None], dict[str, dict[str, float | None]]]:
    """Reference rows (`fp32`, `amp`, `best_eager`: the fastest eager mode, `compile`: see `COMPILE_REFERENCE`) and
    per measured mode its s / volume speed-up against each (`vs_<reference>`, None without that reference)."""
    rows = results.get("modes", {})
    compile_ref = COMPILE_REFERENCE if _seconds(rows.get(COMPILE_REFERENCE, {})) else (
        _fastest(rows, lambda r: r.get("kind") == "compile" and r.get("compile_mode") == "default")
        or _fastest(rows, lambda r: r.get("kind") == "compile"))
    refs = {"fp32": "fp32" if _seconds(rows.get("fp32", {})) else None,
            "amp": "amp" if _seconds(rows.get("amp", {})) else None,
            "best_eager": _fastest(rows, lambda r: r.get("kind") == "eager"), "compile": compile_ref}
    ups = {}
    for name, row in rows.items():
        value = _seconds(row)
        if value is not None:
            ups[name] = {f"vs_{k}": (_seconds(rows[ref]) / value if ref else None) for k, ref in refs.items()}
    return refs, ups


def add_speedups(results: dict[str, Any]) -> None:
    """Store the speed-ups in `results`: `speedup_references` ({reference: mode or None}) and each measured row's
    `speedup`."""
    refs, ups = speedups(results)
    results["speedup_references"] = refs
    for name, up in ups.items():
        results["modes"][name]["speedup"] = up


def write_json(results: dict[str, Any], path: Path) -> None:
    """results.json, with the speed-ups brought up to date."""
    add_speedups(results)
    path.write_text(json.dumps(results, indent=1, default=str))


def _phase(row: Mapping[str, Any], name: str) -> str:
    phase = row.get(name)
    if not isinstance(phase, Mapping):
        return "n/a"
    if phase.get("status") == "ok":
        return ""
    return str(phase.get("status", "n/a"))


def _startup(row: Mapping[str, Any]) -> str:
    startup = row.get("startup") or {}
    if startup.get("status") != "ok":
        return _phase(row, "startup")
    text = f"{startup['first_output_s']:.1f}"
    if "overhead_vs_eager_s" in startup:
        text += f" ({startup['overhead_vs_eager_s']:+.1f} vs eager)"
    if startup.get("cache_hit") is False:
        text += " (cache miss)"
    return text


def _build(row: Mapping[str, Any]) -> str:
    build = row.get("build") or {}
    return _num(build.get("compile_s") if row.get("kind") == "compile" else build.get("engine_build_s"), ".1f")


def _e2e(row: Mapping[str, Any]) -> str:
    e2e = row.get("e2e") or {}
    if e2e.get("status") == "ok":
        return f"{e2e['wall_s']:.1f}"
    return str(e2e.get("status", "n/a"))


def _metric(row: Mapping[str, Any]) -> str:
    metric = _get(row, "e2e", "key_metric")
    return f"{metric['name']} {metric['value']:.4f}" if metric else "n/a"


def markdown_table(results: Mapping[str, Any]) -> str:
    """The comparison table: one row per mode, in the order the modes ran."""
    rows = results.get("modes", {})
    _, ups = speedups(results)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, row in rows.items():
        sw = _get(row, "sliding_window", "median_s")
        ref = _get(row, "accuracy", "vs_fp32") or {}
        labels = _get(row, "accuracy", "vs_labels") or {}
        peak = row.get("peak_mem_bytes")
        cells = [
            f"`{name}`", row.get("status", "?"), _num(_get(row, "network", "median_s"), ".1f", 1e3),
            _num(sw, ".4g"), *(_speedup(ups.get(name, {}).get(k)) for k in ("vs_fp32", "vs_best_eager", "vs_compile")),
            _e2e(row), _metric(row), _build(row), _startup(row),
            _num(peak, ".2f", 1e-9), "ref" if name == "fp32" and row.get("status") == "ok" else _num(ref.get("dice"),
                                                                                                   ".4f"),
            _num(ref.get("hd95"), ".2f"), _num(ref.get("max_abs"), ".2e"), _num(ref.get("rel_l2"), ".2e"),
            _num(labels.get("dice"), ".4f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(results: Mapping[str, Any]) -> list[str]:
    notes = []
    for name, row in results.get("modes", {}).items():
        if row.get("status") in ("error", "skipped"):
            why = row.get("error") or row.get("reason") or ""
            notes.append(f"- `{name}` {row['status']}: {why.splitlines()[0] if why else ''}"[:400])
        build = row.get("build") or {}
        if row.get("kind") == "compile" and build:
            settled = "" if build.get("stable", True) else (
                f"; the first {len(build.get('calls_s', []))} calls did not settle (the compile time may be low)")
            notes.append(f"- `{name}`: torch.compile mode {build.get('compile_mode')}, {build.get('graphs', '?')} "
                         f"graph(s), {build.get('graph_breaks', '?')} graph break(s); first call "
                         f"{_num(build.get('first_call_s'), '.1f')} s{settled}")
        calls = row.get("calls") or {}
        if calls.get("pytorch"):
            notes.append(f"- `{name}`: {calls['pytorch']} of {calls['pytorch'] + calls.get('engine', 0)} patched calls "
                         "ran in PyTorch (a shape outside the engine's range?), so its timings are partly eager")
        for phase in ("e2e", "startup"):
            info = row.get(phase)
            if isinstance(info, Mapping) and info.get("status") not in ("ok", None) and (
                    phase == "e2e" or info.get("status") != "n/a"):
                why = info.get("error") or info.get("reason") or ""
                notes.append(f"- `{name}` {'end to end' if phase == 'e2e' else 'start-up'} {info['status']}: "
                             f"{why.splitlines()[-1] if why else ''}"[:400])
    return notes


def write_markdown(results: Mapping[str, Any], path: Path) -> str:
    """Write results.md (header, table, notes) and return it."""
    machine, work, settings = results["machine"], results["workload"], results["settings"]
    versions = machine.get("versions", {})
    gpu = machine.get("gpu")
    where = (f"{gpu['name']} (driver {gpu.get('driver') or '?'}, CUDA {versions.get('cuda')})" if gpu
             else f"CPU {machine.get('cpu')} ({machine.get('cpu_count')} cores)")
    stack = ", ".join(f"{k} {versions[k]}" for k in ("torch", "monai", "onnxruntime", "tensorrt", "monai_trt")
                      if k in versions)
    eager = results.get("startup_eager") or {}
    sync = "CUDA synchronised" if gpu else "on CPU"
    header = (f"Inferer: {work.get('inferer')}; window batch {work.get('window_batch')}. Medians of "
              f"{settings['repeats']} timed repeats after {settings['warmup']} warm-up run(s), "
              f"{settings['num_volumes']} volume(s), {sync}. Accuracy: against eager fp32 on the same inputs (Dice / "
              "HD95 of the argmax masks, mean over foreground classes and volumes; largest max-abs and relative L2 "
              "error of the logits over the volumes).")
    refs, _ = speedups(results)
    rows = results.get("modes", {})

    def ref(key: str) -> str:
        name = refs.get(key)
        return f"`{name}`, {_seconds(rows[name]):.4g} s" if name else "not measured"

    columns = ("Columns: *network ms* = one forward at the window batch; *s / volume* = the inferer on one volume; "
               f"*vs fp32*, *vs best eager* (the fastest eager mode: {ref('best_eager')}), *vs compile* "
               f"(torch.compile: {ref('compile')}) = speed-up in s / volume; *end to end s* = "
               "`python -m monai.bundle run` wall time (engine modes: engines from this bench's cache); "
               "*build / compile s* = engine build as the cache recorded it, or the torch.compile time (the first "
               "calls' excess over steady calls, in a fresh Inductor cache); *start-up s* = fresh process to first "
               "network output")
    if eager.get("status") == "ok":
        columns += f" (eager: {eager['first_output_s']:.1f} s)"
    lines = [f"# monai_trt bench: {work.get('name')} ({work.get('network')})", "",
             f"{where}; {stack}; {results.get('created')}.", header, "", markdown_table(results), "", columns + "."]
    notes = _notes(results)
    if notes:
        lines += ["", "Notes:", *notes]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_chart(results: Mapping[str, Any], path: Path) -> bool:
    """Write chart.png (bars per mode: s / volume, network ms, end to end s). False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no chart.png (pip install matplotlib)")
        return False
    rows = {n: r for n, r in results.get("modes", {}).items() if r.get("status") == "ok"}
    panels = [("sliding window, s / volume", ("sliding_window", "median_s"), 1.0),
              ("network at the window batch, ms", ("network", "median_s"), 1e3),
              ("end to end, s", ("e2e", "wall_s"), 1.0)]
    panels = [p for p in panels if any(_get(r, *p[1]) is not None for r in rows.values())] or panels[:1]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    base = {p[1]: _get(rows.get("fp32", {}), *p[1]) for p in panels}
    for ax, (title, key, scale) in zip(axes[0], panels):
        names = [n for n, r in rows.items() if _get(r, *key) is not None]
        values = [_get(rows[n], *key) * scale for n in names]
        colours = {"eager": "#7f7f7f", "compile": "#ff7f0e"}
        bars = ax.bar(names, values, color=[colours.get(rows[n]["kind"], "#1f77b4") for n in names])
        for bar, name in zip(bars, names):
            ref = base[key]
            label = f"{ref / _get(rows[name], *key):.2f}×" if ref else ""
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"monai_trt bench: {results['workload'].get('name')} on "
                 f"{(results['machine'].get('gpu') or {}).get('name') or 'CPU'} (speed-up vs fp32 on the bars)\n"
                 "grey: eager PyTorch, orange: torch.compile, blue: engines", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
