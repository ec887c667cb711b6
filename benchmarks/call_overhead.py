"""Where a served call's time goes besides the engine (issue 16): the example bundle's UNet (or W1) wrapped with the
default patch entry, timed per part, each synchronised per call and also back to back (one synchronise per 50 calls,
as a sliding window runs).

Parts: PyTorch fp32 and under AMP (the unwrapped forward), the engine alone (the loaded engine's call on
inputs), the per-call module check alone (`ModuleState.current` + `confirm`), and the whole served call. Writes
`<out>/call_overhead_<network>.json` and a cProfile of 200 served calls (`<out>/call_overhead_<network>.prof.txt`).

Usage (repo root): python benchmarks/call_overhead.py OUT [--network spheres|w1] [--device cuda] [--calls 200]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import monai_trt  # noqa: E402
from benchmarks.aoti_levers import network  # noqa: E402


def timed(fn: Callable[[], Any], sync: Callable[[], None], calls: int) -> dict[str, float]:
    """Median ms of synchronised calls, and ms per call back to back (one synchronise per 50 calls)."""
    for _ in range(5):
        fn()
    sync()
    each = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        sync()
        each.append(time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(calls):
        fn()
        if i % 50 == 49:
            sync()
    sync()
    return {"synced_ms": round(statistics.median(each) * 1e3, 3),
            "back_to_back_ms": round((time.perf_counter() - start) / calls * 1e3, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--network", default="spheres", choices=("spheres", "w1"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--shape", default="", help="input shape instead of the network's, e.g. 1,1,16,16,16")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    net, shape = network(args.network)
    shape = tuple(int(s) for s in args.shape.split(",")) if args.shape else shape
    net = net.to(device).eval()
    x = torch.randn(*shape, device=device)
    entry = {"submodule": "", "precision": "auto", "dynamic_batchsize": [1, shape[0], shape[0]],
             "path": tempfile.mkdtemp(prefix="overhead_")}
    monai_trt.apply(net, [entry], name="network")
    wrapper = monai_trt.wrappers(net)[""]
    row: dict[str, Any] = {"network": args.network, "shape": list(shape), "device": str(device),
                           "torch": torch.__version__}
    with torch.inference_mode():
        start = time.perf_counter()
        net(x)
        sync()
        row["first_call_s"] = round(time.perf_counter() - start, 1)
        row["pytorch_fp32"] = timed(lambda: wrapper.original(x), sync, args.calls)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            row["pytorch_amp"] = timed(lambda: wrapper.original(x), sync, args.calls)
        loaded = [e for engines in wrapper.engines.values() for e in engines]
        row["engines"] = [{"serve": e.serve, "path": str(e.cached.path)} for e in loaded]
        served = next((e for e in loaded if e.serve), None)
        if served is not None:
            inputs = [x.to(wrapper.engine_set.input_float_dtype(device) or x.dtype)]
            try:
                row["engine_alone"] = timed(lambda: served.run(inputs), sync, args.calls)
            except Exception as err:  # noqa: BLE001 - a measurement script: report why
                row["engine_alone"] = f"failed: {type(err).__name__}: {err}"
        state = wrapper.engine_set._state

        def check() -> None:
            deferred: list[Any] = []
            state.current(deferred)
            state.confirm(deferred)

        row["module_check"] = timed(check, sync, args.calls)
        before = dict(wrapper.calls)
        row["served_call"] = timed(lambda: net(x), sync, args.calls)
        row["served_by"] = {k: wrapper.calls[k] - before[k] for k in before}
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(200):
            net(x)
        sync()
        profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(50)
    (args.out / f"call_overhead_{args.network}.prof.txt").write_text(text.getvalue())
    (args.out / f"call_overhead_{args.network}.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
