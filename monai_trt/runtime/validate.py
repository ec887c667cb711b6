"""Compare engine outputs with PyTorch's, with a tolerance per precision."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["compare_outputs", "DEFAULT_TOLERANCE"]

# Largest relative L2 error ||engine - torch|| / ||torch|| accepted per precision (floating outputs).
DEFAULT_TOLERANCE = {"fp32": 1e-3, "tf32": 1e-2, "fp16": 3e-2, "bf16": 6e-2}
# Smallest fraction of equal elements accepted for integer/bool outputs (e.g. argmax masks).
MIN_EXACT_FRACTION = 0.999


def compare_outputs(
    outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], precision: str, tolerance: float | None = None
) -> str:
    """Empty string when `outputs` match `reference`, else a description of the first mismatch."""
    if len(outputs) != len(reference):
        return f"{len(outputs)} outputs, PyTorch returned {len(reference)}"
    limit = tolerance if tolerance is not None else DEFAULT_TOLERANCE[precision]
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        if tuple(out.shape) != tuple(ref.shape):
            return f"output {i} has shape {list(out.shape)}, PyTorch {list(ref.shape)}"
        out = out.detach().to(ref.device)
        if ref.is_floating_point():
            ref64, out64 = ref.detach().double(), out.double()
            if not torch.isfinite(out64).all() and torch.isfinite(ref64).all():
                return f"output {i} has non-finite values"
            err = float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-12))
            if not err <= limit:
                return f"output {i} relative L2 error {err:.3g} > {limit:g} ({precision})"
        else:
            same = float((out == ref).double().mean()) if ref.numel() else 1.0
            if same < MIN_EXACT_FRACTION:
                return f"output {i}: only {same:.4%} of elements equal"
    return ""
