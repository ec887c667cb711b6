"""The architecture fingerprint: everything about a module, except its weights' values, that changes its forward.

It goes into the cache key (see README "How the cache key works") and covers:

- the module tree: every submodule's path and class, its plain attributes (flags such as SwinUNETR's `normalize`,
  sizes, dtypes, enums, callables, plain tensor attributes by content, objects by their attributes), instance-level
  `forward` overrides (monai_trt's own wrapper excluded), forward and forward-pre hooks (also the global ones);
- every parameter and buffer (persistent or not) by name, shape, dtype and tying;
- code: the bytecode, defaults and closures of every function of every class in each module's MRO, and of the
  module-level helper functions, classes and constants those functions name (followed transitively); code of
  torch, numpy and the standard library is pinned by their versions instead;
- versions: Python, and every installed distribution whose code was reached (monai always).

What it cannot see is listed in the README ("What is detected").
"""

from __future__ import annotations

import csv
import enum
import functools
import hashlib
import importlib.metadata
import logging
import platform
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from monai_trt.cache.keys import canonical_json, digest

__all__ = [
    "architecture_fingerprint", "fingerprint_module", "describe_module", "MODULE_BOOKKEEPING",
    "plain_tensor_attributes",
]

logger = logging.getLogger(__name__)

# nn.Module's own bookkeeping: parameters, buffers, children and hooks are described on their own; `training` is the
# call path's business (engines are exported in eval mode; training-mode calls run PyTorch).
MODULE_BOOKKEEPING = frozenset(nn.Module().__dict__)
# Code of these top-level packages is pinned by their versions (torch's is in every backend's versions), not hashed.
_PINNED = frozenset({"torch", "numpy", "builtins"}) | frozenset(sys.stdlib_module_names)
# Class-dict entries that are metadata, not behaviour.
_CLASS_METADATA = frozenset({
    "__dict__", "__weakref__", "__module__", "__qualname__", "__doc__", "__annotations__", "__firstlineno__",
    "__static_attributes__", "__parameters__", "__orig_bases__", "_abc_impl", "__abstractmethods__",
    "__annotate__", "__annotations_cache__", "_is_protocol",
})
_MAX_DEPTH = 3  # plain objects held in attributes are described this many levels deep
_MAX_ITEMS = 10_000  # longer containers are summarised by a hash of their repr


def architecture_fingerprint(module: nn.Module) -> str:
    """sha256 of :func:`describe_module` without the versions (what the cache key calls `architecture`)."""
    return fingerprint_module(module)[0]


def fingerprint_module(module: nn.Module) -> tuple[str, dict[str, str]]:
    """(architecture digest, versions of Python and of the libraries whose code the module's forward reaches)."""
    start = time.perf_counter()
    description = describe_module(module)
    versions = description.pop("versions")
    fingerprint = digest(description)
    logger.debug("architecture of %s fingerprinted in %.3f s", type(module).__name__, time.perf_counter() - start)
    return fingerprint, versions


def describe_module(module: nn.Module) -> dict[str, Any]:
    """Everything about `module` except its weights' values that changes its forward, as canonical-JSON data.

    `versions` holds Python's version and those of the installed distributions whose code was reached.
    """
    walk = _Walk()
    modules = [
        {
            "path": path,
            "class": walk.klass(type(m)),
            "attrs": {name: walk.describe(value) for name, value in sorted(_attributes(m))},
            # the wrapped module's own hooks run around the engine, not in it
            "hooks": [walk.describe(h) for d in (m._forward_pre_hooks, m._forward_hooks) for h in d.values()]
            if m is not module else [],
        }
        for path, m in module.named_modules(remove_duplicate=False)
    ]
    first: dict[int, str] = {}
    tensors = []
    for kind, named in (("param", module.named_parameters(remove_duplicate=False)),
                        ("buffer", module.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            tied = first.setdefault(id(tensor), name)
            tensors.append([name, kind, list(tensor.shape), str(tensor.dtype), tied if tied != name else None])
    saved = module.state_dict(keep_vars=True)  # once: it walks the whole tree
    persistent = sorted(n for n, _ in module.named_buffers() if n in saved)
    hooks = [walk.describe(h) for d in (_torch_module._global_forward_pre_hooks, _torch_module._global_forward_hooks)
             for h in d.values()]
    return {
        "repr": repr(module),
        "modules": modules,
        "tensors": tensors,
        "persistent_buffers": persistent,
        "global_hooks": hooks,
        "code": walk.code,
        "versions": {"python": platform.python_version(), **walk.versions()},
    }


def plain_tensor_attributes(module: nn.Module) -> Iterator[torch.Tensor]:
    """Tensors held as plain attributes (not parameters or buffers) anywhere in `module`: constants to an export."""
    for m in module.modules():
        for _, value in _attributes(m):
            if isinstance(value, torch.Tensor):
                yield value


def _attributes(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """The module's own attributes; monai_trt's wrapper stands for the forward it replaced (usually none)."""
    for name, value in module.__dict__.items():
        if name in MODULE_BOOKKEEPING:
            continue
        if getattr(value, "is_monai_trt_wrapper", False):
            value = getattr(value, "previous_forward", None)
            if value is None:
                continue
        yield name, value


def _top(module_name: str | None) -> str:
    return (module_name or "builtins").split(".")[0]


@functools.lru_cache(maxsize=None)
def _code_hash(code: types.CodeType) -> str:
    """Hash of a code object and every code object nested in it (code objects are immutable)."""
    sha = hashlib.sha256()
    sha.update(code.co_code)
    sha.update(repr((code.co_name, code.co_argcount, code.co_kwonlyargcount, code.co_flags, code.co_names,
                     code.co_varnames, code.co_freevars, code.co_cellvars)).encode())
    for const in code.co_consts:
        sha.update((_code_hash(const) if isinstance(const, types.CodeType) else _const_repr(const)).encode())
    return sha.hexdigest()


def _const_repr(const: Any) -> str:
    if isinstance(const, frozenset):  # set order varies with hash randomisation
        return "frozenset(" + ",".join(sorted(_const_repr(c) for c in const)) + ")"
    if isinstance(const, tuple):
        return "(" + ",".join(_const_repr(c) for c in const) + ")"
    return repr(const)


def _names(code: types.CodeType) -> Iterator[str]:
    """Every global or attribute name `code` (and code nested in it) refers to, in order."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _names(const)


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


@functools.lru_cache(maxsize=None)
def _distributions_of(package: str) -> tuple[str, ...]:
    """The distributions providing top-level `package`: none for the standard library or a name no module was
    imported under (e.g. a namedtuple's made-up `__module__`); the one of the same name when it lists `package`
    among its top-level names (a single lookup); else from the full index of installed distributions (a scan)."""
    if package in sys.stdlib_module_names or package not in sys.modules:
        return ()
    try:
        same = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        same = None
    if same is not None and package in _top_level(same):
        return (same.metadata["Name"],)
    return tuple(_distributions().get(package, ()))


def _top_level(distribution: importlib.metadata.Distribution) -> set[str]:
    """Top-level import names a distribution installs (its top_level.txt, else the first parts of its files; read
    from RECORD as text where there is one: `Distribution.files` makes a path object per file)."""
    listed = distribution.read_text("top_level.txt")
    if listed:
        return set(listed.split())
    record = distribution.read_text("RECORD")
    paths = [row[0] for row in csv.reader(record.splitlines()) if row] if record else \
        [str(f) for f in distribution.files or ()]
    return {_first_part(path).removesuffix(".py") for path in paths}


def _first_part(path: str) -> str:
    """The first component of a relative posix path, as `PurePosixPath` parses it (empty and "." parts dropped)."""
    return next((part for part in path.split("/") if part and part != "."), "")


@functools.lru_cache(maxsize=None)
def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Walk:
    """One fingerprinting pass: records code (by qualified name) and the packages reached."""

    def __init__(self) -> None:
        self.code: dict[str, Any] = {}
        self.packages: set[str] = {"monai"}
        self._names: dict[int, str] = {}
        self._active: set[int] = set()
        self._keep: list[Any] = []  # keeps described objects alive, so that ids stay unique during the walk

    def versions(self) -> dict[str, str]:
        found = {}
        for package in sorted(self.packages - {"builtins", "__main__"}):
            for distribution in _distributions_of(package):
                found[distribution] = _version(distribution)
        return found

    # ------------------------------------------------------------------ values
    def describe(self, value: Any, depth: int = 0) -> Any:
        """Canonical-JSON data for an attribute value (see the module docstring)."""
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, enum.Enum):
            return {"enum": self.klass(type(value)), "name": value.name}
        if isinstance(value, int):
            return value if type(value) is int else {"int": self.klass(type(value)), "value": int(value)}
        if isinstance(value, (float, complex)):
            return {"number": repr(value)}
        if isinstance(value, (bytes, bytearray)):
            return {"bytes": hashlib.sha256(value).hexdigest()}
        if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return {"torch": str(value)}
        if isinstance(value, torch.Tensor):
            return _describe_tensor(value)
        if isinstance(value, np.ndarray):
            return {"ndarray": [list(value.shape), str(value.dtype)],
                    "sha": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}
        if isinstance(value, (list, tuple, dict, set, frozenset)):
            return self._container(value, depth)
        if isinstance(value, functools.partial):
            return {"partial": self.describe(value.func, depth), "args": self.describe(value.args, depth),
                    "keywords": self.describe(value.keywords, depth)}
        if isinstance(value, types.FunctionType):
            return {"function": self.function(value)}
        if isinstance(value, types.MethodType):
            return {"method": self.describe(value.__func__, depth), "of": self.klass(type(value.__self__))}
        if isinstance(value, type):
            return {"class": self.klass(value)}
        if isinstance(value, types.ModuleType):
            self.packages.add(_top(value.__name__))
            return {"module": value.__name__}
        return self._object(value, depth)

    def _container(self, value: Any, depth: int) -> Any:
        kind = type(value).__name__ if type(value) in (list, tuple, dict, set, frozenset) else self.klass(type(value))
        if len(value) > _MAX_ITEMS:
            return {kind: hashlib.sha256(repr(value).encode()).hexdigest(), "len": len(value)}
        if isinstance(value, dict):
            items = [[self.describe(k, depth), self.describe(v, depth)] for k, v in value.items()]
            return {kind: sorted(items, key=canonical_json)}
        items = [self.describe(v, depth) for v in value]
        return {kind: sorted(items, key=canonical_json) if isinstance(value, (set, frozenset)) else items}

    def _object(self, value: Any, depth: int) -> Any:
        cls = type(value)
        described: dict[str, Any] = {"object": self.klass(cls)}
        if _top(cls.__module__) in _PINNED or depth >= _MAX_DEPTH or id(value) in self._active:
            if callable(value):
                described["name"] = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}"
            return described  # torch/stdlib objects: their class (pinned by version) says enough
        try:
            attrs = vars(value)
        except Exception:  # no __dict__ (slots, C objects) or a proxy that raises on access: its class says it
            attrs = None
        if isinstance(attrs, dict):
            self._active.add(id(value))
            try:
                skip = MODULE_BOOKKEEPING if isinstance(value, nn.Module) else ()
                described["attrs"] = {k: self.describe(v, depth + 1) for k, v in sorted(attrs.items()) if k not in skip}
                if isinstance(value, nn.Module):  # a module held outside the tree: its tensors are constants
                    described["tensors"] = {n: _describe_tensor(t) for n, t in value.state_dict(keep_vars=True).items()}
            finally:
                self._active.discard(id(value))
        return described

    # ------------------------------------------------------------------ code
    def _register(self, obj: Any, name: str) -> tuple[str, bool]:
        """A unique name for `obj` in this walk, and whether it is new."""
        if id(obj) in self._names:
            return self._names[id(obj)], False
        unique, n = name, 1
        while unique in self.code:
            n += 1
            unique = f"{name}#{n}"
        self._names[id(obj)] = unique
        self._keep.append(obj)
        self.code[unique] = None  # placeholder: recursion ends here
        return unique, True

    def klass(self, cls: type) -> str:
        """Qualified name of `cls`; records the fingerprint of its own dict (bytecode, class attributes)."""
        name = f"{cls.__module__}.{cls.__qualname__}"
        self.packages.add(_top(cls.__module__))
        if _top(cls.__module__) in _PINNED:
            return name
        unique, new = self._register(cls, name)
        if new:
            self.code[unique] = {
                "bases": [self.klass(base) for base in cls.__mro__[1:]],
                "dict": {k: self._class_entry(v) for k, v in sorted(vars(cls).items()) if k not in _CLASS_METADATA},
            }
        return unique

    def _class_entry(self, value: Any) -> Any:
        if isinstance(value, (staticmethod, classmethod)):
            return {type(value).__name__: self.describe(value.__func__)}
        if isinstance(value, property):
            return {"property": [self.describe(f) for f in (value.fget, value.fset, value.fdel)]}
        if isinstance(value, functools.cached_property):
            return {"cached_property": self.describe(value.func)}
        return self.shared(value)

    def shared(self, value: Any) -> Any:
        """A module- or class-level value: code and immutable values in full; mutable objects by type only.

        Registries and other mutable objects filled at import time would make the key depend on what else the
        process imported; they are identified by their class.
        """
        if isinstance(value, (types.FunctionType, type, types.ModuleType, functools.partial)) or _immutable(value):
            return self.describe(value)
        return {"object": self.klass(type(value))}

    def function(self, func: types.FunctionType) -> str:
        """Qualified name of `func`; records its bytecode, defaults, closure and the globals it names."""
        name = f"{func.__module__}.{func.__qualname__}"
        self.packages.add(_top(func.__module__))
        if _top(func.__module__) in _PINNED:
            return name
        unique, new = self._register(func, name)
        if not new:
            return unique
        cells = []
        for cell in func.__closure__ or ():
            try:
                cells.append(self.shared(cell.cell_contents))
            except ValueError:  # an empty cell
                cells.append({"empty": True})
        self.code[unique] = {
            "code": _code_hash(func.__code__),
            "defaults": self.describe(func.__defaults__),
            "kwdefaults": self.describe(func.__kwdefaults__),
            "closure": cells,
            "globals": self._globals(func),
        }
        return unique

    def _globals(self, func: types.FunctionType) -> dict[str, Any]:
        """The module-level names `func` uses: helpers, classes, constants; for modules, the attributes it uses."""
        namespace = func.__globals__
        names = list(dict.fromkeys(_names(func.__code__)))
        found: dict[str, Any] = {}
        modules = []
        for name in names:
            if name in namespace and name not in found:
                value = namespace[name]
                if isinstance(value, types.ModuleType):
                    modules.append(value)
                found[name] = self.shared(value)
        for mod in modules:  # `helpers.pad(...)`: the attribute names used that `helpers` defines
            if _top(mod.__name__) in _PINNED:
                continue
            for name in names:
                value = getattr(mod, name, None)
                if isinstance(value, (types.FunctionType, type)):
                    found[f"{mod.__name__}.{name}"] = self.describe(value)
        return found


def _immutable(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, enum.Enum, torch.dtype)):
        return True
    return isinstance(value, (tuple, frozenset)) and all(_immutable(v) for v in value)


def _describe_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    described: dict[str, Any] = {"tensor": [list(tensor.shape), str(tensor.dtype)]}
    if tensor.device.type != "meta" and tensor.layout == torch.strided and tensor.numel():
        data = tensor.detach().reshape(-1).contiguous().cpu()
        described["sha"] = hashlib.sha256(data.view(torch.uint8).numpy()).hexdigest()
    return described

