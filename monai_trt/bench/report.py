"""`bench` reports: a markdown table (one row per mode, speed-ups against fp32 and AMP) and a PNG bar chart
(matplotlib, optional: without it the chart is skipped with a warning)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["write_markdown", "write_chart", "markdown_table"]

logger = logging.getLogger(__name__)

COLUMNS = ("mode", "status", "network ms", "s / volume", "vs fp32", "vs amp", "end to end s", "e2e metric", "build s",
           "start-up s", "peak GB", "Dice vs fp32", "HD95 vs fp32", "max abs err", "rel L2", "Dice vs labels")


def _get(row: Mapping[str, Any], *path: str) -> Any:
    value: Any = row
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _num(value: Any, fmt: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, fmt)


def _speedup(base: Any, value: Any) -> str:
    return f"{base / value:.2f}×" if base and value else "n/a"


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
    base = _get(rows, "fp32", "sliding_window", "median_s")
    amp = _get(rows, "amp", "sliding_window", "median_s")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, row in rows.items():
        sw = _get(row, "sliding_window", "median_s")
        ref = _get(row, "accuracy", "vs_fp32") or {}
        labels = _get(row, "accuracy", "vs_labels") or {}
        peak = row.get("peak_mem_bytes")
        cells = [
            f"`{name}`", row.get("status", "?"), _num(_get(row, "network", "median_s"), ".1f", 1e3),
            _num(sw, ".3f"), _speedup(base, sw), _speedup(amp, sw), _e2e(row), _metric(row),
            _num(_get(row, "build", "engine_build_s"), ".1f"), _startup(row),
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
    columns = ("Columns: *network ms* = one forward at the window batch; *s / volume* = the inferer on one volume; "
               "*end to end s* = `python -m monai.bundle run` wall time (engine modes: engines from this bench's "
               "cache); *build s* = engine build as the cache recorded it; *start-up s* = fresh process to first "
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
        bars = ax.bar(names, values, color=["#7f7f7f" if rows[n]["kind"] == "eager" else "#1f77b4" for n in names])
        for bar, name in zip(bars, names):
            ref = base[key]
            label = f"{ref / _get(rows[name], *key):.2f}×" if ref else ""
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"monai_trt bench: {results['workload'].get('name')} on "
                 f"{(results['machine'].get('gpu') or {}).get('name') or 'CPU'} (speed-up vs fp32 on the bars)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
