"""`python -m monai_trt`: fire commands over the bundle, cache and runtime layers (nothing else imports this)."""

from monai_trt.cli.commands import main

__all__ = ["main"]
