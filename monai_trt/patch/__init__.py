"""The `trt_patch` section and the `trt` switch → validated, frozen entries (every config error is raised here)."""

from monai_trt.patch.spec import PatchEntry, default_cache_dir, parse_patch, parse_switch

__all__ = ["PatchEntry", "parse_patch", "parse_switch", "default_cache_dir"]
