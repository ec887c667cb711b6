"""`python -m monai_trt <command>` (or `monai-trt`): build, ls, verify, plan, clean, info, bench, convert.

Each command is a plain function whose signature is its command line (fire), with the config conventions of
`python -m monai.bundle run`::

    python -m monai_trt build --bundle_root bundles/spheres_segmentation \\
        --config_file "['configs/inference.json','configs/inference_trt.json']"
    python -m monai_trt ls [--json]
    python -m monai_trt verify --bundle_root <dir> [--config_file ...]
    python -m monai_trt plan --bundle_root <dir> [--config_file ...]   (`submodule: auto`: the plan and time shares)
    python -m monai_trt clean [--max_size 2GB | --all] [--yes]
    python -m monai_trt info [--json]
    python -m monai_trt bench --bundle_root <dir> | --workload w1 [--out DIR] [--modes ...]
    python -m monai_trt convert <bundle_root> [--out FILE] [--method keep|auto|...]

Results go to stdout (tables, or JSON with `--json`); progress and warnings go to stderr. Progress is shown on a
terminal only; `--quiet` hides it there too. A failed build or verification exits with status 1.
"""

from __future__ import annotations

import json as jsonlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import monai_trt
from monai_trt.bundle.load import BundleSource, bundle_command, load_bundle
from monai_trt.cache.inventory import clean_cache, engine_table, format_size, parse_size, scan
from monai_trt.console import Progress, cli_logging, is_interactive
from monai_trt.errors import MonaiTrtError, UsageError
from monai_trt.patch.spec import default_cache_dir

__all__ = ["build", "ls", "verify", "plan", "clean", "info", "convert", "main"]


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "-"


def _shapes(meta: Any) -> str:
    """`x:[1-4,1,64,64,64]` from an entry's first profile (min-max where they differ)."""
    io = meta.get("io") or {}
    parts = []
    for name, inp in zip(io.get("names", []), (io.get("profiles") or [[]])[0]):
        dims = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in zip(inp[0], inp[2])]
        parts.append(f"{name}:[{','.join(dims)}]")
    return " ".join(parts)


def _progress(quiet: bool | None) -> Progress:
    """Progress on stderr when it is a terminal (or `--noquiet`), never with `--quiet`."""
    return Progress(enabled=is_interactive(sys.stderr) if quiet is None else not quiet)


@bundle_command
def build(
    source: BundleSource,
    batch: Any = None,
    spatial_shape: Any = None,
    json: bool = False,
    quiet: bool | None = None,
    verbose: bool = False,
    **override: Any,
) -> None:
    """Build every engine the bundle's trt_patch describes, without data, into the cache a run will use.

    The network is parsed from the configs, gets the weights the run's CheckpointLoader would load, is patched, and
    is called once per shape the run will use: batch = dynamic_batchsize opt (any batch in range gives the same
    key; without dynamic_batchsize: --batch, else the inferer's sw_batch_size, else 1) and channels / spatial shape /
    dtype from metadata network_data_format; entries with input_profiles are called at each profile's opt shapes.

    Args:
        batch: batch size (or list of sizes) to call the network with; must lie in every dynamic_batchsize range.
        spatial_shape: override of network_data_format spatial_shape, e.g. "[96,96,96]".
        json: print the result as JSON.
        quiet: no progress display (default: shown only on a terminal).
        verbose: show monai_trt's INFO logs.
        override: other config ids to override, as in `monai.bundle run` (e.g. --device "\\$torch.device('cpu')").
    """
    progress = _progress(quiet)
    start = time.perf_counter()
    with cli_logging(verbose), progress:
        bundle = load_bundle(source, override)
        progress.note(f"bundle {bundle.name}: {type(bundle.network).__name__}, {len(bundle.patch)} patch "
                      f"entr{'y' if len(bundle.patch) == 1 else 'ies'}, weights {bundle.weights or 'from config'}")
        from monai_trt.bundle.build import build_engines  # imports the exporters

        engines, failures = build_engines(bundle, batch, spatial_shape, lambda d: progress.note(f"calling {d}"))
    if json:
        print(jsonlib.dumps({
            "bundle": bundle.name, "failures": failures, "seconds": round(time.perf_counter() - start, 3),
            "engines": [{"label": e.label, "submodule": e.meta.get("submodule"), "key": e.key, "path": str(e.path),
                         "built": e.built, "method": e.meta.get("method"), "precision": e.meta.get("precision"),
                         "build_seconds": e.meta.get("build_seconds")} for e in engines],
        }, indent=1))
    else:
        rows = [("built" if e.built else "cached", e.key[:12], e.meta.get("submodule") or "<network>",
                 e.meta.get("method"), e.meta.get("precision"), _shapes(e.meta),
                 f"{e.meta.get('build_seconds', 0):.1f} s" if e.built else "-") for e in engines]
        print(_table(rows, ("STATE", "KEY", "SUBMODULE", "METHOD", "PREC", "INPUTS", "BUILD")))
        roots = sorted({str(e.path.parent.parent) for e in engines})
        print(f"{len(engines)} engine(s) ready ({sum(e.built for e in engines)} built) in {', '.join(roots) or '-'}; "
              f"{time.perf_counter() - start:.1f} s")
    if failures:
        raise UsageError("some engines were not built:\n  " + "\n  ".join(failures))


def ls(cache_dir: str | None = None, json: bool = False) -> None:
    """List the cache: network/submodule, method, precision, size, created, last used, hits, loadable here.

    Args:
        cache_dir: cache root (default: env MONAI_TRT_CACHE, else ~/.cache/monai_trt).
        json: print JSON (one object per entry) for scripts.
    """
    root = Path(cache_dir or default_cache_dir()).expanduser()
    with cli_logging(verbose=False):
        entries = scan(root)
    if json:
        print(jsonlib.dumps({"cache": str(root), "entries": [e.to_json() for e in entries]}, indent=1))
        return
    print(f"cache {root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
          f"{format_size(sum(e.size for e in entries))}")
    if not entries:
        return
    rows = [(e.key[:12], e.network, e.meta.get("method", "?"), e.meta.get("precision", "?"), _shapes(e.meta),
             format_size(e.size), _when(e.created), _when(e.last_used), e.hits, "yes" if e.loadable else e.status)
            for e in entries]
    print(_table(rows, ("KEY", "NETWORK/SUBMODULE", "METHOD", "PREC", "INPUTS", "SIZE", "CREATED", "LAST USED",
                        "HITS", "LOADABLE")))
    for entry in (e for e in entries if not e.loadable):
        print(f"  {entry.key[:12]}: {entry.status}: {entry.reason}")


@bundle_command
def verify(
    source: BundleSource,
    cache_dir: str | None = None,
    tolerance: float | None = None,
    seed: int = 0,
    json: bool = False,
    quiet: bool | None = None,
    verbose: bool = False,
    **override: Any,
) -> None:
    """Check each cache entry of the bundle's network that is loadable here against PyTorch on random inputs.

    Inputs follow the entry's recorded spec (names, dtypes, min/opt/max shapes of its profile); the measure is the
    largest relative L2 error of the outputs, judged by the per-precision tolerance the runtime uses.

    Args:
        cache_dir: cache root to check (default: the patch entries' paths).
        tolerance: relative L2 error allowed (default: 1e-3 fp32, 1e-2 tf32, 3e-2 fp16, 6e-2 bf16).
        seed: seed of the random inputs.
        json: print JSON.
    """
    progress = _progress(quiet)
    with cli_logging(verbose), progress:
        bundle = load_bundle(source, override)
        from monai_trt.bundle.build import verify_entries  # imports the exporters

        roots = [cache_dir] if cache_dir else sorted({e.path for e in bundle.patch}) or [default_cache_dir()]
        progress.note(f"verifying the entries of {bundle.name} in {', '.join(roots)}")
        verdicts, others = verify_entries(bundle.network, roots, tolerance, seed)
    failed = [v for v in verdicts if v.outcome == "fail"]
    if json:
        print(jsonlib.dumps({"bundle": bundle.name, "other_entries": others, "entries": [
            {"key": v.info.key, "outcome": v.outcome, "detail": v.detail, "network": v.info.network,
             "method": v.info.meta.get("method"), "precision": v.info.meta.get("precision"),
             "errors": [{"shapes": s, "rel_l2": err} for s, err in v.errors]} for v in verdicts]}, indent=1))
    else:
        rows = []
        for v in verdicts:
            measure = "; ".join(f"{' '.join(map(str, s))}: {err:.2e}" for s, err in v.errors) or "-"
            rows.append((v.outcome.upper(), v.info.key[:12], v.info.network, v.info.meta.get("method", "?"),
                         v.info.meta.get("precision", "?"), measure, v.detail))
        print(_table(rows, ("RESULT", "KEY", "NETWORK/SUBMODULE", "METHOD", "PREC", "MAX REL L2 (per shape)", "")))
        counts = {o: sum(v.outcome == o for v in verdicts) for o in ("pass", "fail", "skip")}
        print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped; "
              f"{others} entr{'y' if others == 1 else 'ies'} of other networks not checked")
    if failed:
        raise UsageError(f"{len(failed)} engine(s) disagree with PyTorch")
    if not any(v.outcome == "pass" for v in verdicts):
        raise UsageError(f"nothing was verified: no entry in {', '.join(roots)} was built for this network with these "
                       "weights and loads here (run `build` first)")


@bundle_command
def plan(
    source: BundleSource,
    batch: Any = None,
    spatial_shape: Any = None,
    json: bool = False,
    quiet: bool | None = None,
    verbose: bool = False,
    **override: Any,
) -> None:
    """Show the plan of each `submodule: auto` patch entry: the module tree with what became an engine, what stayed
    in PyTorch and why, the speed-up the gate measured, and each part's share of its search root's PyTorch time.

    The network is driven as `build` drives it (once per shape the run will use, random inputs from metadata
    network_data_format), so the search runs now and is remembered in the cache, or a remembered plan is read; then
    it is run once more in plain PyTorch with forward hooks to measure the shares. Args as for `build`.
    """
    progress = _progress(quiet)
    with cli_logging(verbose), progress:
        bundle = load_bundle(source, override)
        from monai_trt.bundle.plan import plan_bundle  # imports the exporters

        result = plan_bundle(bundle, batch, spatial_shape, lambda d: progress.note(f"calling {d}"))
    if json:
        print(jsonlib.dumps({"bundle": bundle.name, **result.to_json()}, indent=1))
    else:
        print(result.text(bundle.net_id))
    if result.failures:
        raise UsageError("some engines of the plan failed:\n  " + "\n  ".join(result.failures))


def clean(
    cache_dir: str | None = None, max_size: Any = None, all: bool = False, yes: bool = False, json: bool = False
) -> None:
    """Remove cache entries: invalid here (tampered or not ours, other versions/GPU/platform, method unavailable), plus
    quarantined entries and dead builds; with --max_size also least-recently-used ones down to that size; with
    --all everything. Prints what would go; deletes only with --yes.

    Args:
        cache_dir: cache root (default: env MONAI_TRT_CACHE, else ~/.cache/monai_trt).
        max_size: size budget for the valid entries, e.g. 2GB, 500MiB, 1e9.
        all: remove every entry.
        yes: really delete (default: dry run).
        json: print JSON.
    """
    root = Path(cache_dir or default_cache_dir()).expanduser()
    budget = parse_size(max_size) if max_size is not None else None
    with cli_logging(verbose=False):
        items, kept = clean_cache(root, everything=all, max_size=budget, yes=yes)
    if json:
        print(jsonlib.dumps({"cache": str(root), "dry_run": not yes, "items": items, "kept_entries": kept}, indent=1))
        return
    verb = "removed" if yes else "would remove"
    for item in items:
        state = f"kept ({item['skipped']})" if item["skipped"] else verb
        print(f"{state}  {item['key'][:12]}  {format_size(item['size'])}  {item['why']}")
    gone = [item for item in items if not item["skipped"]]
    print(f"{verb} {len(gone)} item(s), {format_size(sum(i['size'] for i in gone))}; {kept} "
          f"entr{'y' if kept == 1 else 'ies'} kept in {root}" + (" (dry run: add --yes to delete)" if gone and not yes
                                                               else ""))


def info(json: bool = False) -> None:
    """Which engine methods work on this machine and, for each missing one, why (package, CUDA, version).

    Args:
        json: print JSON.
    """
    with cli_logging(verbose=False):
        table = engine_table()
    root = Path(default_cache_dir()).expanduser()
    if json:
        print(jsonlib.dumps({"monai_trt": monai_trt.__version__, "cache": str(root), **table}, indent=1))
        return
    print(f"monai_trt {monai_trt.__version__}; torch {table['torch']}; "
          f"{table['platform']['system']} {table['platform']['machine']}")
    no_cuda = (f"no CUDA device (torch {table['torch']} is built without CUDA)" if table["cuda"] is None
               else f"no CUDA device visible (torch built for CUDA {table['cuda']})")
    print(f"CUDA: {', '.join(table['gpus']) or no_cuda}")
    print(f"cache: {root}")
    rows = [(r["method"], r["engine"], r["device"], "yes" if r["available"] else "no",
             ", ".join(f"{k} {v}" for k, v in r["versions"].items()) if r["available"] else r["reason"])
            for r in table["engines"]]
    print(_table(rows, ("METHOD", "ENGINE", "DEVICE", "AVAILABLE", "VERSIONS / WHY NOT")))
    print("method auto picks: " + "; ".join(f"{d} -> {m or 'nothing'}" for d, m in table["auto"].items()))


def convert(
    bundle_root: str,
    out: str | None = None,
    method: str = "keep",
    precision: str | None = None,
    keep: Any = None,
    trt_file: str | None = None,
    inference_file: str | None = None,
    readme: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    json: bool = False,
) -> None:
    """Convert a model-zoo bundle's TensorRT config (`trt_compile` or `torch_tensorrt` style) into a monai_trt patch.

    The patch merges on top of the bundle's own configs/inference.json and keeps its checkpoint loading; the
    conversion is refused (nothing written) when the result could run on weights the plain run would not load.

    Args:
        bundle_root: the bundle directory.
        out: where to write the patch (default configs/inference_monai_trt.json in the bundle).
        method: engine method; `keep` maps the zoo file's own meaning (onnx / torch_trt), or auto, aoti, ...
        precision: override of the precision the zoo file / README asks for.
        keep: top-level ids of the zoo file to carry over as they are (default none).
        trt_file: the zoo TensorRT config (default configs/inference_trt.json or .yaml).
        inference_file: the bundle's inference config (default configs/inference.json or .yaml).
        readme: the README documenting `trt_export` flags (default docs/README.md).
        force: overwrite an existing output file.
        dry_run: convert and check without writing.
        json: print the result as JSON.
    """
    from monai_trt.bundle.zoo import convert_bundle

    keep = [keep] if isinstance(keep, str) else list(keep or ())
    done = convert_bundle(bundle_root, out, trt_file=trt_file, inference_file=inference_file, readme=readme,
                          method=method, precision=precision, keep=keep, force=force, dry_run=dry_run)
    if json:
        print(jsonlib.dumps({
            "out": str(done.out) if done.out else None, "patch": done.patch, "networks": done.networks,
            "loaders": {k: [loader.describe() for loader in v] for k, v in done.loaders.items()},
            "mapped": done.mapped, "unmapped": done.unmapped,
        }, indent=2))
    else:
        print(done.report(bundle_root))


def main() -> None:
    """Console entry point: run a command; a monai_trt error prints one message and exits with status 1."""
    import fire

    from monai_trt.bench.command import bench  # the optional benchmark: imported only to run a command

    argv = sys.argv[1:]
    if "--" not in argv and any(a in ("--help", "-h") for a in argv[1:]):
        argv = [a for a in argv if a not in ("--help", "-h")] + ["--", "--help"]  # else **override takes `help`
    try:
        commands = {"build": build, "ls": ls, "verify": verify, "plan": plan, "clean": clean, "info": info,
                    "bench": bench, "convert": convert}
        fire.Fire(commands,
                  command=argv, name="monai_trt")
    except MonaiTrtError as err:
        print(f"monai_trt: error: {err}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # `monai_trt ls --json | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
