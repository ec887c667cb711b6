"""monai_trt: TensorRT-class engines for MONAI bundles from one small patch file.

Add to a bundle (see configs/inference_trt.json)::

    "+imports": ["$import monai_trt"],
    "trt": true,
    "trt_patch": [{"submodule": "", "precision": "fp16"}],
    "+initialize": ["$monai_trt.apply(@network, @trt_patch, enabled=@trt, name='network')"]
"""

from __future__ import annotations

from monai.apps.utils import get_logger as _get_logger

_get_logger("monai_trt")  # MONAI-style: INFO to stdout; must run before any monai_trt.* logger exists

from monai_trt.errors import BackendUnavailable, CacheError, EngineBuildError, MonaiTrtError, PatchError
from monai_trt.runtime import apply, refresh, remove, wrappers

__version__ = "0.1.0"
__all__ = [
    "apply",
    "remove",
    "refresh",
    "wrappers",
    "MonaiTrtError",
    "PatchError",
    "BackendUnavailable",
    "EngineBuildError",
    "CacheError",
    "__version__",
]
