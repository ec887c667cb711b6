"""Convert a model-zoo bundle's TensorRT config into a monai_trt patch file that keeps the bundle's weights.

Model-zoo bundles ship `configs/inference_trt.json` (or `.yaml`) in one of two styles:

- `trt_compile`: an id the run uses (`network`, `diffusion`, `autoencoder`, ...) is overridden by
  `$trt_compile(<module>, <base_path>, args=@<dict>, submodule=[...])`. The bundle's own checkpoint loading stays.
- `torch_tensorrt`: `network_def` is replaced by `$torch.jit.load(<.ts>)`, an engine exported beforehand by
  `python -m monai.bundle trt_export` (flags documented in the bundle's README) with the weights baked in. Because of
  that, these files may override `imports` and `initialize` (dropping a `CheckpointLoader` called there), disable
  handlers (dropping a `CheckpointLoader` handler) and turn the evaluator's AMP off.

:func:`convert_bundle` reads both files (and the README for `trt_export` flags) and writes a patch that merges on
top of the bundle's own inference config like `configs/inference_trt.json` does (`+imports`, the `trt` switch, one
`trt_patch` section per patched network, `+initialize` with `monai_trt.apply`). None of the zoo file's network,
handler, `initialize` or `imports` overrides is carried over, and the conversion is refused
(:class:`ConversionError`) when the merged config would not load a checkpoint into every patched network.
:func:`check_patch` runs the same checks on any patch file, e.g. one converted by hand.

The steps, one module each (lower ones first):

- :mod:`.configs`: find, load and merge raw configs; look up an id; :class:`ConversionError`.
- :mod:`.expressions`: `$` expressions read with `ast`: references, module aliases, literal conditions.
- :mod:`.loaders`: the checkpoint loaders a run reaches (:func:`find_checkpoint_loaders`).
- :mod:`.checks`: the safety checks on a merged patch (:func:`check_patch`).
- :mod:`.readme`: the README's `trt_export` commands (:func:`parse_trt_export_commands`).
- :mod:`.entries`: one conversion's state and the entry shaping both styles share.
- :mod:`.trt_compile`, :mod:`.torch_tensorrt`: one zoo style each.
- :mod:`.assemble`: every zoo key mapped or noted, then the patch dict.
- :mod:`.convert`: :func:`convert_bundle` and its :class:`Conversion` report.
"""

from monai_trt.bundle.zoo.checks import check_patch
from monai_trt.bundle.zoo.configs import ConversionError, find_bundle_file
from monai_trt.bundle.zoo.convert import DEFAULT_OUT, Conversion, convert_bundle
from monai_trt.bundle.zoo.loaders import Loader, find_checkpoint_loaders
from monai_trt.bundle.zoo.readme import parse_trt_export_commands

__all__ = [
    "Conversion", "ConversionError", "Loader", "convert_bundle", "check_patch", "find_checkpoint_loaders",
    "parse_trt_export_commands", "find_bundle_file", "DEFAULT_OUT",
]
