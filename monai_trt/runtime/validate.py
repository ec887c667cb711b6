"""Compare engine outputs with PyTorch's, with a tolerance per precision.

Non-finite values are compared by position, not folded into the error norm: where PyTorch has NaN anything agrees
(a NaN or Inf in the input must not disable an engine that agrees everywhere else); where PyTorch has ±Inf the engine
must have the same infinity; where PyTorch is finite the engine must be finite. The relative L2 error is taken over
the elements where both are finite.
"""

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
        out = out.detach().as_subclass(torch.Tensor).to(ref.device)
        ref = ref.detach().as_subclass(torch.Tensor)  # a MetaTensor's type and metadata are checked elsewhere
        if ref.is_floating_point():
            ref64, out64 = ref.double(), out.double()
            ref_finite, out_finite = torch.isfinite(ref64), torch.isfinite(out64)
            both = ref_finite & out_finite
            if not bool(both.all()):
                wrong = (ref_finite & ~out_finite) | (torch.isinf(ref64) & (out64 != ref64))
                if bool(wrong.any()):
                    return (f"output {i}: {int(wrong.sum())} values are non-finite where PyTorch's are finite, or "
                            "differ from PyTorch's ±Inf")
                ref64, out64 = ref64[both], out64[both]
            err = float(torch.linalg.vector_norm(out64 - ref64) / torch.linalg.vector_norm(ref64).clamp_min(1e-12))
            if not err <= limit:
                return f"output {i} relative L2 error {err:.3g} > {limit:g} ({precision})"
        else:
            same = float((out == ref).double().mean()) if ref.numel() else 1.0
            if same < MIN_EXACT_FRACTION:
                return f"output {i}: only {same:.4%} of elements equal"
    return ""
