"""`convert_bundle`: find the files, map the zoo file, check the merged result, write the patch; its
:class:`Conversion` report."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_trt.bundle.zoo.assemble import assemble
from monai_trt.bundle.zoo.checks import check_merge
from monai_trt.bundle.zoo.configs import ConversionError, find_bundle_file, relative
from monai_trt.bundle.zoo.entries import Converter
from monai_trt.bundle.zoo.loaders import Loader
from monai_trt.bundle.zoo.readme import find_readme
from monai_trt.patch.spec import METHODS, PRECISIONS

logger = logging.getLogger(__name__)

DEFAULT_OUT = "configs/inference_monai_trt.json"


@dataclass
class Conversion:
    """The result of :func:`convert_bundle`.

    Attributes:
        patch: the patch dict (what was written to `out`).
        styles: the zoo styles found (`trt_compile`, `torch_tensorrt`).
        networks: patched network id -> the id of its `trt_patch` section.
        loaders: patched network id -> the checkpoint loaders that stay in the merged config.
        mapped: what was carried over and how.
        unmapped: what the converted file does not carry, and why (read these).
        source: the zoo TensorRT config that was read.
        inference: the bundle's inference config the patch merges onto.
        out: where the patch was written; None for a dry run.
        bundle_root: the bundle directory (paths in `run_command` are relative to it).
    """

    patch: dict[str, Any]
    styles: tuple[str, ...]
    networks: dict[str, str]
    loaders: dict[str, list[Loader]]
    mapped: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    source: Path | None = None
    inference: Path | None = None
    out: Path | None = None
    bundle_root: Path | None = None

    @property
    def notes(self) -> list[str]:
        """Every note, mapped first."""
        return [f"mapped: {m}" for m in self.mapped] + [f"not mapped: {u}" for u in self.unmapped]

    def run_command(self, bundle_root: str | Path = ".") -> str:
        """The `monai.bundle run` command for the converted patch (config paths relative to the bundle root).

        Args:
            bundle_root: the `--bundle_root` value to print (e.g. as the user typed it).
        """
        root = self.bundle_root or Path(bundle_root)
        out = self.out or root / DEFAULT_OUT
        quoted = ",".join(f"'{relative(f, root)}'" for f in (self.inference, out))
        return f'python -m monai.bundle run --config_file "[{quoted}]" --bundle_root {bundle_root}'

    def report(self, bundle_root: str | Path = ".") -> str:
        """Human-readable summary: what was written, the checkpoint loaders kept, mapped and unmapped items."""
        lines = [f"converted {self.source} ({', '.join(self.styles)} style)"]
        lines.append(f"wrote {self.out}" if self.out else "dry run: nothing written")
        for net, section in self.networks.items():
            lines.append(f"network @{net}: entries in '{section}'; weights still come from:")
            lines.extend(f"  - {loader.describe()}" for loader in self.loaders.get(net, []))
        lines.append("mapped:")
        lines.extend(f"  - {m}" for m in self.mapped)
        lines.append("not mapped (check these):" if self.unmapped else "not mapped: nothing")
        lines.extend(f"  - {u}" for u in self.unmapped)
        lines.append("patch:")
        lines.append(json.dumps(self.patch, indent=2))
        lines.append("run (add --trt False, or env MONAI_TRT=0, for plain PyTorch):")
        lines.append(f"  {self.run_command(bundle_root)}")
        return "\n".join(lines)


def convert_bundle(
    bundle_root: str | Path,
    out: str | Path | None = None,
    *,
    trt_file: str | Path | None = None,
    inference_file: str | Path | None = None,
    readme: str | Path | None = None,
    method: str = "keep",
    precision: str | None = None,
    keep: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
) -> Conversion:
    """Convert a bundle's model-zoo TensorRT config into a monai_trt patch file.

    Args:
        bundle_root: the bundle directory.
        out: where to write the patch (relative to the bundle root or absolute); default
            `configs/inference_monai_trt.json`. A `.yaml`/`.yml` name writes YAML.
        trt_file: the zoo TensorRT config (default `configs/inference_trt.json|yaml`).
        inference_file: the config the patch merges onto (default `configs/inference.json|yaml`).
        readme: where the `trt_export` command is documented (default `docs/README.md`, else `README.md`).
        method: `keep` (the zoo's meaning: `trt_compile`'s method or `onnx`; `trt_export --use_onnx` -> `onnx`, else
            `torch_trt`), or one of auto, onnx, torch_trt, aoti, onnxruntime for every entry.
        precision: precision for every entry; default: the zoo's (`trt_compile` args or default fp16; the README's
            `trt_export --precision`, fp16 where it leaves the choice open).
        keep: zoo file keys to carry over verbatim (e.g. `["force_sliding_window"]`); the safety checks still apply.
        force: overwrite an existing `out`.
        dry_run: convert and check, write nothing.

    Returns:
        The patch, what was mapped and what not, and the checkpoint loaders that stay.

    Raises:
        ConversionError: missing files, a file that is not a zoo TensorRT config, an expression that cannot be
            mapped, an invalid resulting entry, or a merged config that would not load the checkpoint into every
            patched network (nothing is written then).
    """
    root = Path(bundle_root)
    if not root.is_dir():
        raise ConversionError(f"bundle root {root} is not a directory")
    if method != "keep" and method not in METHODS:
        raise ConversionError(f"method must be 'keep' or one of {list(METHODS)}, got {method!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ConversionError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    inference_path = find_bundle_file(root, "inference", inference_file)
    trt_path = find_bundle_file(root, "inference_trt", trt_file)
    conv = Converter(root, inference_path, trt_path, find_readme(root, readme), method, precision,
                     [keep] if isinstance(keep, str) else keep)
    assembled = assemble(conv)
    loaders = check_merge(conv.inference, assembled.patch, "the converted patch", root, conv.unmapped)
    conversion = Conversion(assembled.patch, assembled.styles, assembled.sections, loaders, conv.mapped,
                            conv.unmapped, trt_path, inference_path, None, root)
    if dry_run:
        return conversion

    target = Path(out if out is not None else DEFAULT_OUT)
    target = target if target.is_absolute() else root / target
    if target.exists() and not force:
        if target.resolve() == trt_path.resolve():
            raise ConversionError(f"{target} is the zoo file being converted; pass force=True (--force) to replace it")
        raise ConversionError(f"{target} exists; pass force=True (--force) to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix in (".yaml", ".yml"):
        import yaml

        target.write_text(yaml.safe_dump(assembled.patch, sort_keys=False), encoding="utf-8")
    else:
        target.write_text(json.dumps(assembled.patch, indent=2) + "\n", encoding="utf-8")
    conversion.out = target
    logger.info("wrote %s (%d mapped, %d not mapped)", target, len(conversion.mapped), len(conversion.unmapped))
    return conversion
