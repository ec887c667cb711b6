"""Start-up probe for `bench`, run in a fresh process: build the workload's network, optionally apply a patch whose
engines are already cached, and time process start → first network output.

Usage (by `bench` only): ``python -m monai_trt.bench.startup '<json spec>'``. The spec carries `t0`, the parent's
`time.time()` just before it started this process, so the measure includes interpreter start-up and imports. The
result is one line on stdout, prefixed with ``MONAI_TRT_BENCH_STARTUP``.
"""

from __future__ import annotations

import json
import sys
import time

MARKER = "MONAI_TRT_BENCH_STARTUP "


def main(argv: list[str]) -> None:
    """Run the probe described by `argv[0]` (JSON) and print its timings."""
    spec = json.loads(argv[0])
    t0 = float(spec["t0"])
    import torch

    import monai_trt
    from monai_trt.bundle.load import BundleSource, load_bundle

    imported = time.time()
    work = spec["workload"]
    if work["kind"] == "w1":
        from monai_trt.bench.workload import make_w1_network

        network = make_w1_network(work["settings"], torch.device(work["device"]))
    else:
        network = load_bundle(BundleSource(**work["source"]), work["override"]).network
    device = next(iter(network.parameters())).device
    if spec.get("patch"):
        monai_trt.apply(network, spec["patch"])
    ready = time.time()
    x = torch.rand(spec["batch_shape"], generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        network(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    done = time.time()
    engines = sum(len(g) for w in monai_trt.wrappers(network).values() for g in w.engines.values())
    print(MARKER + json.dumps({"first_output_s": done - t0, "imports_s": imported - t0, "network_s": ready - imported,
                               "first_call_s": done - ready, "engines": engines}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
