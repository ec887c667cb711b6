"""torch → exportable graph: the build job, the flat-tensor adapter in the engine's precision, torch.export / ONNX.

The lowest layer: it imports nothing else of monai_trt.
"""

from monai_trt.export.graph import FlatForward, precision_module
from monai_trt.export.job import BuildJob, Profile
from monai_trt.export.program import DEFAULT_EXPORT_ARGS, export_onnx, export_program, tf32_enabled

__all__ = [
    "BuildJob", "Profile", "FlatForward", "precision_module", "export_program", "export_onnx", "tf32_enabled",
    "DEFAULT_EXPORT_ARGS",
]
