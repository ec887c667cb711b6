"""In the user's process: find and wrap submodules (hook), serve each call (wrapper), run the engine life cycle."""

from monai_trt.runtime.hook import apply, remove, wrappers

__all__ = ["apply", "remove", "wrappers"]
