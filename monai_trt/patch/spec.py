"""Parse and validate `trt_patch` and the `trt` switch into frozen entries.

Every configuration error is raised here, as a :class:`PatchError`, before any export or build starts.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_trt.errors import PatchError

logger = logging.getLogger(__name__)

__all__ = ["PatchEntry", "parse_patch", "parse_switch", "default_cache_dir", "PRECISIONS", "METHODS"]

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
METHODS = ("auto", "onnx", "torch_trt", "aoti", "onnxruntime")
REFIT_MODES = ("none", "identical", "refit")
ENV_SWITCH = "MONAI_TRT"
AUTO_MIN_SPEEDUP = 1.01  # method auto: an engine must beat PyTorch by 1 % on the same call, or PyTorch serves
ENV_CACHE = "MONAI_TRT_CACHE"
DEFAULT_BUILD_TIMEOUT = 1800.0  # s; longer than any build measured here (SwinUNETR aoti ~170 s, TensorRT minutes)
AUTO = "auto"  # `submodule: auto`: search the module tree for what converts and pays (runtime/planner.py)
DEFAULT_SEARCH_DEPTH = 4  # levels below a search root that `submodule: auto` may descend
DEFAULT_SEARCH_SECONDS = 1800.0  # s of search (exports, builds, checks) per root and process; then PyTorch
SEARCH_KEYS = ("search_under", "search_depth", "search_seconds")  # only with `submodule: auto`
_TRUE = ("true", "1", "on", "yes")
_FALSE = ("false", "0", "off", "no")

# Keys model-zoo authors pass to MONAI's trt_compile that have no effect here; accepted so that existing
# inference_trt.json files move over mechanically, and reported at INFO when the patch is parsed.
# `input_names`: names always come from the forward's signature (trt_compile's default).
IGNORED_ZOO_KEYS = ("timestamp", "logger", "forward_override", "output_lists", "input_names")
# `export_args` keys that MONAI's convert_to_onnx (which trt_compile calls) consumes itself rather than passing to
# torch.onnx.export: here the export is always torch.onnx.export(dynamo=True), names and dynamic dims come from the
# call and the profiles, and every engine is validated against PyTorch. Dropped (so they are not in the key).
IGNORED_ZOO_EXPORT_ARGS = (
    "dynamo", "use_trace", "verify", "device", "use_ort", "ort_provider", "rtol", "atol", "constant_size_threshold",
    "input_names", "output_names", "dynamic_axes", "filename",
)


@dataclass(frozen=True)
class PatchEntry:
    """One validated `trt_patch` entry, for a single submodule.

    Attributes:
        submodule: dotted path inside the network; "" is the whole network.
        path: cache directory for this entry's engines.
        precision: one of fp32, tf32, fp16, bf16, or auto (fp16 for a module on CUDA, fp32 elsewhere; resolved by
            `monai_trt.apply` from where the module's weights are).
        method: one of auto, onnx, torch_trt, aoti, onnxruntime.
        build_args: user build options (merged over the backend's defaults when the engine is built).
        dynamic_batchsize: (min, opt, max) for dim 0 of every tensor input, or None.
        input_profiles: per-profile mapping input name -> (min_shape, opt_shape, max_shape), or ().
        fallback: run PyTorch (with a warning) when an engine cannot be built or run.
        validate: compare each engine with PyTorch on its first call in a process; a mismatch falls back.
        tolerance: override of the relative L2 error allowed by validation (None: per-precision default).
        max_engines: the most engines (shape ranges) one submodule may build before calls go to PyTorch.
        export_args: options for the exporter (e.g. opset_version), part of the cache key.
        use_cuda_graph: replay engine calls from CUDA graphs (CUDA devices; `aoti` and TensorRT engines). None (unset,
            or "auto"): the backend's default, on for `aoti`, off for TensorRT (whose graphs need the same input
            tensors every call).
        refit: none (weights baked in), identical or refit (engine stored without weights).
        output_names: names for the engine outputs (cosmetic: unlike trt_compile, outputs never become a dict).
        build_timeout: longest wait, in seconds, for another process building the same engine; after it this
            process runs PyTorch for now and picks the engine up once it is published (not part of the key).
        min_speedup: the speed gate: an engine serves only when PyTorch takes at least this many times as long on
            the same call (measured once per engine and machine, remembered in the cache); 0 turns it off. None:
            1.01 with method auto (auto never makes a bundle slower), off for an explicitly named method.
        search_depth: 0 for a named submodule; > 0 for `submodule: auto`, where `submodule` is one search root and
            this is how many levels below it the search may descend (see :mod:`monai_trt.runtime.planner`).
        search_seconds: the search's time budget per root and process (`submodule: auto` only).
        devices: None (calls run where their inputs are), "all" (every visible CUDA device) or device names
            ("cuda:0", "cpu"): each call's dim 0 is split across one engine replica per device (runtime/devices.py).
    """

    submodule: str = ""
    path: str = ""
    precision: str = "auto"
    method: str = "auto"
    build_args: Mapping[str, Any] = field(default_factory=dict)
    dynamic_batchsize: tuple[int, int, int] | None = None
    input_profiles: tuple[Mapping[str, tuple[tuple[int, ...], ...]], ...] = ()
    fallback: bool = True
    validate: bool = True
    tolerance: float | None = None
    max_engines: int = 4
    export_args: Mapping[str, Any] = field(default_factory=dict)
    use_cuda_graph: bool | None = None
    refit: str = "none"
    output_names: tuple[str, ...] = ()
    build_timeout: float = DEFAULT_BUILD_TIMEOUT
    min_speedup: float | None = None
    search_depth: int = 0
    search_seconds: float = DEFAULT_SEARCH_SECONDS
    devices: str | tuple[str, ...] | None = None

    @property
    def speed_gate(self) -> float:
        """The effective `min_speedup` (0: no gate)."""
        if self.min_speedup is not None:
            return self.min_speedup
        return AUTO_MIN_SPEEDUP if self.method == "auto" else 0.0

    def describe(self, network: str = "") -> str:
        """Short human-readable name used in log lines, e.g. `monai_trt 'network.image_encoder' (aoti, fp16)`.

        Args:
            network: the config id of the network the entry patches (`monai_trt.apply(..., name=)`); the path is
                `<network>` when neither it nor a submodule is known.
        """
        where = ".".join(part for part in (network, self.submodule) if part) or "<network>"
        return f"monai_trt '{where}' ({self.method}, {self.precision})"


_FIELDS = tuple(f for f in PatchEntry.__dataclass_fields__ if f not in SEARCH_KEYS) + SEARCH_KEYS


def default_cache_dir() -> str:
    """Cache root: env MONAI_TRT_CACHE, else $XDG_CACHE_HOME/monai_trt, else ~/.cache/monai_trt."""
    if os.environ.get(ENV_CACHE):
        return os.environ[ENV_CACHE]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return os.path.join(base, "monai_trt")


def parse_switch(enabled: Any) -> bool:
    """Resolve the on/off switch: env MONAI_TRT (if set) overrides `enabled`.

    Args:
        enabled: a bool, 0/1, or one of the strings true/false/1/0/on/off/yes/no (any case).

    Raises:
        PatchError: the value (or the env variable) is not boolean-like.
    """
    env = os.environ.get(ENV_SWITCH)
    if env is not None and env.strip() != "":
        return _as_bool(env, f"environment variable {ENV_SWITCH}")
    return _as_bool(enabled, "the trt switch (enabled=)")


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise PatchError(f"{what} must be boolean-like (true/false/1/0/on/off), got {value!r}")


def parse_patch(patch: Any) -> tuple[PatchEntry, ...]:
    """Validate a `trt_patch` section into one frozen entry per submodule.

    Args:
        patch: a list of entry dicts, a single entry dict, or None/empty (nothing to patch).

    Raises:
        PatchError: with the entry index and field at fault.
    """
    if patch is None:
        return ()
    if isinstance(patch, Mapping):
        patch = [patch]
    if not isinstance(patch, Sequence) or isinstance(patch, (str, bytes)):
        raise PatchError(f"trt_patch must be a list of entries or one entry dict, got {type(patch).__name__}")
    entries: list[PatchEntry] = []
    for index, raw in enumerate(patch):
        entries.extend(_parse_entry(index, raw))
    seen: set[str] = set()
    for entry in entries:
        if entry.submodule in seen:
            raise PatchError(f"trt_patch: submodule '{entry.submodule}' appears in more than one entry")
        seen.add(entry.submodule)
    _check_nesting([e.submodule for e in entries])
    return tuple(entries)


def _check_nesting(paths: list[str]) -> None:
    for a in paths:
        for b in paths:
            if a != b and (a == "" or b.startswith(a + ".")):
                raise PatchError(
                    f"trt_patch: submodule '{b}' lies inside '{a or '<network>'}'; an engine cannot contain another "
                    "engine. Patch either the outer module or the inner ones."
                )


def _parse_entry(index: int, raw: Any) -> list[PatchEntry]:
    where = f"trt_patch[{index}]"
    if not isinstance(raw, Mapping):
        raise PatchError(f"{where} must be a dict, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_FIELDS) - set(IGNORED_ZOO_KEYS))
    if unknown:
        raise PatchError(f"{where}: unknown key(s) {unknown}; accepted keys are {sorted(_FIELDS)}")
    values: dict[str, Any] = {}
    values["path"] = _as_str(raw.get("path") or default_cache_dir(), f"{where}.path")
    values["precision"] = _choice(raw.get("precision", "auto"), PRECISIONS + ("auto",), f"{where}.precision")
    values["method"] = _choice(raw.get("method", "auto"), METHODS, f"{where}.method")
    values["refit"] = _choice(raw.get("refit", "none"), REFIT_MODES, f"{where}.refit")
    values["build_args"] = _as_dict(raw.get("build_args"), f"{where}.build_args")
    export_args = _as_dict(raw.get("export_args"), f"{where}.export_args")
    values["export_args"] = {k: v for k, v in export_args.items() if k not in IGNORED_ZOO_EXPORT_ARGS}
    if raw.get("input_names") is not None:
        _names(raw["input_names"], f"{where}.input_names")
    ignored = sorted(set(raw) & set(IGNORED_ZOO_KEYS))
    ignored += [f"export_args.{k}" for k in sorted(set(export_args) - set(values["export_args"]))]
    if ignored:
        logger.info("%s: %s accepted for compatibility with trt_compile and ignored", where, ignored)
    for flag in ("fallback", "validate"):
        if flag in raw:
            values[flag] = _as_bool(raw[flag], f"{where}.{flag}")
    graphs = raw.get("use_cuda_graph")
    if graphs is not None and not (isinstance(graphs, str) and graphs.strip().lower() == "auto"):
        values["use_cuda_graph"] = _as_bool(graphs, f"{where}.use_cuda_graph")
    if raw.get("tolerance") is not None:
        tol = raw["tolerance"]
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol <= 0:
            raise PatchError(f"{where}.tolerance must be a positive number, got {tol!r}")
        values["tolerance"] = float(tol)
    if raw.get("min_speedup") is not None:
        ratio = raw["min_speedup"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < float("inf"):
            raise PatchError(f"{where}.min_speedup must be a number >= 0 (0: no speed gate), got {ratio!r}")
        values["min_speedup"] = float(ratio)
    if "max_engines" in raw:
        n = raw["max_engines"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PatchError(f"{where}.max_engines must be a positive integer, got {n!r}")
        values["max_engines"] = n
    if raw.get("build_timeout") is not None:
        seconds = raw["build_timeout"]
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < float("inf"):
            raise PatchError(f"{where}.build_timeout must be a number of seconds >= 0, got {seconds!r}")
        values["build_timeout"] = float(seconds)
    if raw.get("output_names") is not None:
        values["output_names"] = _names(raw["output_names"], f"{where}.output_names")
    if raw.get("devices") is not None:
        values["devices"] = _parse_devices(raw["devices"], f"{where}.devices")
    dyn, profiles = raw.get("dynamic_batchsize"), raw.get("input_profiles")
    if dyn is not None and profiles:
        raise PatchError(f"{where}: give either dynamic_batchsize or input_profiles, not both")
    if dyn is not None:
        values["dynamic_batchsize"] = _parse_batch_range(dyn, f"{where}.dynamic_batchsize")
    if profiles:
        values["input_profiles"] = _parse_profiles(profiles, f"{where}.input_profiles")
    submodules = raw.get("submodule", "")
    if submodules is None:
        submodules = ""
    if isinstance(submodules, str) and submodules.strip().lower() == AUTO:
        return _parse_search(where, raw, values)
    given = sorted(set(raw) & set(SEARCH_KEYS))
    if given:
        raise PatchError(f"{where}: {given} apply only to `submodule: \"auto\"`")
    if isinstance(submodules, str):
        submodules = [submodules]
    if not isinstance(submodules, Sequence) or not all(isinstance(s, str) for s in submodules) or not submodules:
        raise PatchError(f"{where}.submodule must be a dotted path or a list of them, got {raw.get('submodule')!r}")
    return [PatchEntry(submodule=s.strip(), **values) for s in submodules]


def _parse_search(where: str, raw: Mapping[str, Any], values: dict[str, Any]) -> list[PatchEntry]:
    """`submodule: auto`: one entry per search root (`search_under`, default the whole network)."""
    roots = raw.get("search_under", [""])
    if roots is None:
        roots = [""]
    if isinstance(roots, str):
        roots = [roots]
    if not isinstance(roots, Sequence) or not roots or not all(isinstance(r, str) for r in roots):
        raise PatchError(f"{where}.search_under must be a dotted path or a non-empty list of them, got {roots!r}")
    depth = raw.get("search_depth", DEFAULT_SEARCH_DEPTH)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise PatchError(f"{where}.search_depth must be a positive integer, got {depth!r}")
    seconds = raw.get("search_seconds", DEFAULT_SEARCH_SECONDS)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < float("inf"):
        raise PatchError(f"{where}.search_seconds must be a positive number of seconds, got {seconds!r}")
    return [PatchEntry(submodule=r.strip(), search_depth=depth, search_seconds=float(seconds), **values) for r in roots]


def _as_str(value: Any, what: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise PatchError(f"{what} must be a path string, got {value!r}")
    return os.fspath(value)


def _names(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(isinstance(n, str) for n in value):
        raise PatchError(f"{what} must be a list of strings, got {value!r}")
    return tuple(value)


def _choice(value: Any, options: tuple[str, ...], what: str) -> str:
    if not isinstance(value, str) or value.lower() not in options:
        raise PatchError(f"{what} must be one of {list(options)}, got {value!r}")
    return value.lower()


def _as_dict(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise PatchError(f"{what} must be a dict with string keys, got {value!r}")
    return dict(value)


def _parse_devices(value: Any, what: str) -> str | tuple[str, ...]:
    """`"all"`, or a non-empty list of CUDA indices / "cuda:<i>" / "cpu" names (all CUDA or all "cpu"), normalised
    to ("cuda:0", ...). A CUDA device may appear once; "cpu" may repeat (CPU replicas: for tests, no speed-up)."""
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [value]
    usage = f'{what} must be "all" or a list of CUDA indices / "cuda:<i>" names (or "cpu" entries), got {value!r}'
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise PatchError(usage)
    names = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            names.append(f"cuda:{item}")
        elif isinstance(item, str) and item.strip().lower() == "cpu":
            names.append("cpu")
        elif isinstance(item, str) and re.fullmatch(r"cuda:\d+", item.strip().lower()):
            names.append(f"cuda:{int(item.strip()[5:])}")
        else:
            raise PatchError(usage)
    cuda = [n for n in names if n != "cpu"]
    if cuda and len(cuda) != len(names):
        raise PatchError(f"{what} mixes CUDA devices and 'cpu': {value!r}; give one kind")
    if len(set(cuda)) != len(cuda):
        raise PatchError(f"{what} names a CUDA device more than once: {value!r}")
    return tuple(names)


def _positive_ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise PatchError(f"{what} must be a list of positive integers, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise PatchError(f"{what} must be a list of positive integers, got {value!r}")
    return tuple(int(v) for v in value)


def _parse_batch_range(value: Any, what: str) -> tuple[int, int, int]:
    ints = _positive_ints(value, what)
    if len(ints) != 3 or not ints[0] <= ints[1] <= ints[2]:
        raise PatchError(f"{what} must be [min, opt, max] with min <= opt <= max, got {value!r}")
    return ints  # type: ignore[return-value]


def _parse_profiles(value: Any, what: str) -> tuple[dict[str, tuple[tuple[int, ...], ...]], ...]:
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise PatchError(f"{what} must be a list of {{input_name: [min_shape, opt_shape, max_shape]}} dicts")
    profiles = []
    for p, profile in enumerate(value):
        if not isinstance(profile, Mapping) or not profile:
            raise PatchError(f"{what}[{p}] must be a non-empty dict input_name -> [min_shape, opt_shape, max_shape]")
        parsed = {}
        for name, shapes in profile.items():
            loc = f"{what}[{p}][{name!r}]"
            if not isinstance(shapes, Sequence) or len(shapes) != 3:
                raise PatchError(f"{loc} must be [min_shape, opt_shape, max_shape], got {shapes!r}")
            lo, opt, hi = (_positive_ints(s, loc) for s in shapes)
            if not len(lo) == len(opt) == len(hi):
                raise PatchError(f"{loc}: min/opt/max shapes have different ranks: {shapes!r}")
            if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise PatchError(f"{loc}: need min <= opt <= max in every dimension, got {shapes!r}")
            parsed[str(name)] = (lo, opt, hi)
        profiles.append(parsed)
    return tuple(profiles)
