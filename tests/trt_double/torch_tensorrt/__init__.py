"""A test double of `torch_tensorrt`: `Input`, `dynamo.compile`, `save`, `load`, as monai_trt calls them.

The version comes from MONAI_TRT_DOUBLE_TORCH_TRT_VERSION (default 2.14.0). From 2.10 on, `dynamo.compile`
defaults to explicit typing (`enabled_precisions` deprecated), as recent Torch-TensorRT does. The "compiled" module
runs the exported program in PyTorch after checking input shapes against the compiled ranges; every compile call is
recorded in `COMPILES`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__version__ = os.environ.get("MONAI_TRT_DOUBLE_TORCH_TRT_VERSION", "2.14.0")
__monai_trt_double__ = True
COMPILES: list[dict[str, Any]] = []


class Input:
    def __init__(self, min_shape: Any = None, opt_shape: Any = None, max_shape: Any = None, dtype: Any = None,
                 shape: Any = None) -> None:
        if shape is not None:
            min_shape = opt_shape = max_shape = shape
        self.min_shape, self.opt_shape, self.max_shape = (tuple(s) for s in (min_shape, opt_shape, max_shape))
        self.dtype = dtype


def save(module: Any, file_path: str = "", *, output_format: str = "exported_program", inputs: Any = None,
         arg_inputs: Any = None, kwarg_inputs: Any = None, retrace: bool = True) -> None:
    if output_format != "exported_program":
        raise ValueError(f"the double saves only exported_program, got {output_format}")
    if retrace and not (arg_inputs or inputs):
        raise ValueError("retrace=True needs arg_inputs")
    torch.export.save(module.program, file_path)


def load(file_path: str = "", extra_files: Any = None, **kwargs: Any) -> Any:
    return torch.export.load(file_path)


from torch_tensorrt import dynamo as dynamo  # uses Input above
