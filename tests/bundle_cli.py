"""Helpers for tests that run an example bundle through the real `python -m monai.bundle run` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def gate_off(bundle: Path, trt_config: str = "inference_trt.json") -> list[str]:
    """CLI overrides turning the speed gate off in every patch section of `bundle`'s `trt_config`.

    Bundle tests assert that engines serve; whether an engine beats PyTorch on a loaded 2-core CI machine is luck,
    so they run with `min_speedup: 0` (the gate itself is tested in test_speed_gate.py).
    """
    patch = json.loads((bundle / "configs" / trt_config).read_text())
    args = []
    for key, value in patch.items():
        if key.startswith("trt_patch") and isinstance(value, list):
            for index in range(len(value)):
                args += [f"--{key}#{index}#min_speedup", "0"]
    return args


def run_bundle(bundle: Path, cwd: Path, *args: str, env: dict | None = None, timeout: int = 600,
               trt_config: str = "inference_trt.json", extra_configs: tuple[Path, ...] = ()) -> str:
    """Run `bundle` with its inference.json + `trt_config` (+ `extra_configs`) and the given CLI overrides; returns
    stdout+stderr.

    The engine cache is `cwd/cache`; the repository root is put on PYTHONPATH so `import monai_trt` works from
    any checkout.
    """
    files = [bundle / "configs" / "inference.json", bundle / "configs" / trt_config, *extra_configs]
    configs = "[" + ",".join(f"'{f}'" for f in files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root", str(bundle),
           *gate_off(bundle, trt_config), *args]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    full_env = {k: v for k, v in os.environ.items() if k != "MONAI_TRT"}
    full_env.update({"MONAI_TRT_CACHE": str(cwd / "cache"), "PYTHONPATH": path, **(env or {})})
    done = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def cache_entries(cache: Path) -> list[dict]:
    """meta.json of every published entry under `cache`."""
    entries = cache / "entries"
    if not entries.is_dir():
        return []
    return [json.loads((e / "meta.json").read_text()) for e in sorted(entries.iterdir()) if (e / "meta.json").exists()]


WRAPPERS_TAG = "monai_trt wrappers:"


def report_wrappers_config(directory: Path, *networks: str) -> Path:
    """A config to append to a run: at the end of `run`, one line `WRAPPERS_TAG {json}` with, per network id and
    wrapped path, how many calls an engine and PyTorch served and (with `submodule: auto`) the planned state.
    Read it back with :func:`read_wrappers`."""
    items = ", ".join(f"'{n}': monai_trt.wrappers(@{n})" for n in networks)
    line = (f"$print({WRAPPERS_TAG!r}, json.dumps({{net: {{path or '<root>': {{**w.calls, 'state': "
            f"getattr(getattr(w, 'node', None), 'state', None)}} for path, w in ws.items()}} "
            f"for net, ws in {{{items}}}.items()}}), flush=True)")
    path = directory / "report_wrappers.json"
    path.write_text(json.dumps({"+imports": ["$import json", "$import monai_trt"], "+run": [line]}))
    return path


def read_wrappers(log: str) -> dict[str, dict[str, dict]]:
    """What :func:`report_wrappers_config` printed: {network id: {path ('<root>' for ""): {engine, pytorch, state}}}."""
    (line,) = [line for line in log.splitlines() if line.startswith(WRAPPERS_TAG)]
    return json.loads(line[len(WRAPPERS_TAG):])
