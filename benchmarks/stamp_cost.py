"""Per-call cost of the staleness check (issue 13) against the engine call it guards.

For each network: the time of :meth:`ModuleState.current` on an unchanged module (the check every engine call runs:
module tree and attributes, tensor versions, content checksum), split into its three parts; the time to
fingerprint and hash everything again (what a detected change costs); then, interleaved (a check, an engine call, a
check...) so that both see the same load on a shared machine, the check against one call through a monai_trt engine
at the workload's batch (`check_share_percent`: median of the per-pair ratios); and calls back to back with the
wrapper's own check on and bypassed.

Usage:
    CPU (example bundle's UNet, SwinUNETR 48 at batch 1):
        python benchmarks/stamp_cost.py --networks spheres_unet swin_unetr --batch 4 1
    GPU (W1's network call: SwinUNETR 48, batch 8, aoti fp16):
        python benchmarks/stamp_cost.py --networks swin_unetr --batch 8 --device cuda --method aoti --precision fp16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import types
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NETWORKS = {
    # bundles/spheres_segmentation/configs/inference.json: ROI 64³, sw_batch 4
    "spheres_unet": (lambda: _unet(), (1, 64, 64, 64)),
    # W1: ROI 96³, sw_batch 8
    "swin_unetr": (lambda: _swin(), (1, 96, 96, 96)),
}


def _unet() -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(3, 1, 2, (16, 32, 64, 128), (2, 2, 2), num_res_units=2, norm="batch")


def _swin() -> torch.nn.Module:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=2, feature_size=48)


def _timer(device: str) -> Callable[[Callable[[], object], int], list[float]]:
    from monai_trt.runtime.verdicts import sample_seconds

    return lambda fn, repeats: sample_seconds(fn, torch.device(device), repeats)


def measure(name: str, batch: int, device: str, method: str, precision: str, repeats: int, cache: str) -> dict:
    import monai_trt
    from monai_trt.runtime.stamps import ModuleState, Stamp

    make, shape = NETWORKS[name]
    torch.manual_seed(0)
    net = make().eval().to(device)
    time_it = _timer(device)
    state = ModuleState(net)
    (first,) = time_it(state.current, 1)  # fingerprint + weights hash: what a change costs
    state.current()
    stamp = state._stamp
    assert isinstance(stamp, Stamp) and stamp.changed() is None
    check = time_it(state.current, repeats * 20)
    parts = {
        "tree_and_attributes": time_it(stamp._walk, 100),
        "tensor_versions": time_it(stamp._tensor_versions, 100),
        "content_check": time_it(stamp._content.values, repeats * 20),
    }
    median = statistics.median
    result = {
        "network": name, "device": device, "method": method, "precision": precision, "input": [batch, *shape],
        "tensors": len(stamp._tensors), "modules": len(stamp._modules), "torch": torch.__version__,
        "check_ms": round(median(check) * 1e3, 3), "check_min_ms": round(min(check) * 1e3, 3),
        "parts_ms": {k: round(median(v) * 1e3, 3) for k, v in parts.items()},
        "recompute_s": round(first, 3),
    }
    print(json.dumps(result), flush=True)  # before the (long) engine build
    x = torch.randn(batch, *shape, device=device)
    monai_trt.apply(net, [{"method": method, "precision": precision, "path": cache}])
    with torch.no_grad():
        (build,) = time_it(lambda: net(x), 1)
        # interleaved, so that both see the same load on a shared machine: a check, then an engine call
        paired = [(time_it(state.current, 1)[0], time_it(lambda: net(x), 1)[0]) for _ in range(repeats * 3)]
        # back to back, one sync at the end (as a sliding window runs): with the check, and with it bypassed
        engine_set = monai_trt.wrappers(net)[""].engine_set
        streams = {}
        for label in ("with_check", "check_bypassed", "with_check_again"):
            live = engine_set._state
            if label == "check_bypassed":
                digests = live.current()
                engine_set._state = types.SimpleNamespace(current=lambda *_, d=digests, **__: d, confirm=lambda _: True,
                                                            versions=live.versions)
            streams[label] = sum(time_it(lambda: [net(x) for _ in range(repeats)], 1)) / repeats
            engine_set._state = live
    wrapper = monai_trt.wrappers(net)[""]
    result.update({
        "paired_check_ms": round(median(c for c, _ in paired) * 1e3, 3),
        "engine_call_ms": round(median(e for _, e in paired) * 1e3, 2),
        "check_share_percent": round(100 * median(c / e for c, e in paired), 3),
        "back_to_back_ms": {k: round(v * 1e3, 2) for k, v in streams.items()},
        "first_call_s": round(build, 1), "calls": dict(wrapper.calls),
    })
    if wrapper.calls["pytorch"]:
        result["warning"] = "some calls ran in PyTorch: engine_call_ms is not an engine's"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=["spheres_unet", "swin_unetr"], choices=sorted(NETWORKS))
    parser.add_argument("--batch", nargs="+", type=int, default=[4, 1], help="one per network (or one for all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", default="onnxruntime")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default=None, help="engine cache (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    batches = args.batch * len(args.networks) if len(args.batch) == 1 else args.batch
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, batch in zip(args.networks, batches):
            result = measure(name, batch, args.device, args.method, args.precision, args.repeats, args.cache or tmp)
            results.append(result)
            print(json.dumps(result), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
