"""The call path of one wrapped submodule: capture the call, ask for an engine, run it, or fall back to PyTorch.

An :class:`EngineWrapper` replaces a module's `forward` on the instance only, so `state_dict` keys never change.
How an engine comes to be (key, cache, build, load, refit, validation) is :mod:`.lifecycle`'s business.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

from monai_trt.errors import EngineBuildError, MonaiTrtError
from monai_trt.patch import PatchEntry
from monai_trt.runtime.calls import UnsupportedCall, capture_call, flatten_outputs, forward_signature
from monai_trt.runtime.lifecycle import EngineSet, LoadedEngine, no_autocast

__all__ = ["EngineWrapper"]

logger = logging.getLogger(__name__)


class EngineWrapper:
    """Callable installed as `module.forward`; see the module docstring.

    Attributes:
        spec: the patch entry this submodule was wrapped with.
        disabled: why this wrapper runs PyTorch for the rest of the process (None while engines may serve).
        calls: how this process's calls were served, `{"engine": n, "pytorch": m}`.
    """

    is_monai_trt_wrapper = True

    def __init__(self, module: nn.Module, spec: PatchEntry) -> None:
        self.module = module
        self.spec = spec
        self.previous_forward = module.__dict__.get("forward")
        self.original = self.previous_forward or types.MethodType(type(module).forward, module)
        self._signature = forward_signature(self.original)
        self.engine_set = EngineSet(module, self.original, spec, spec.describe())
        self.disabled: str | None = None
        self.calls = {"engine": 0, "pytorch": 0}

    @property
    def engines(self) -> dict[Any, list[LoadedEngine]]:
        """Engines loaded in this process, by call layout."""
        return self.engine_set.by_layout

    @property
    def builds(self) -> int:
        """Engines this wrapper built in this process (cache hits excluded)."""
        return self.engine_set.builds

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.module.training or torch.compiler.is_compiling() or torch.jit.is_scripting():
            return self._pytorch(args, kwargs)
        try:
            call = capture_call(self._signature, args, kwargs, self.engine_set.input_float_dtype)
        except UnsupportedCall as err:
            self.engine_set.warn_once(f"call:{err}", "%s: this call runs in PyTorch: %s", self.spec.describe(), err)
            return self._pytorch(args, kwargs)
        autocast = torch.is_autocast_enabled(torch.device(call.layout.device).type)
        try:
            loaded = self.engine_set.engine_for(call, _Reference(self.original, args, kwargs), autocast)
            if loaded is None:
                return self._pytorch(args, kwargs)
            with no_autocast(call.layout.device, autocast):
                outputs = loaded.run(call.tensors)
            result = loaded.restore(outputs, autocast)
            self.calls["engine"] += 1
            return result
        except _CallerError as err:
            raise err.__cause__ from None  # PyTorch itself rejects these inputs: the caller's error, not the engine's
        except MonaiTrtError as err:
            return self._fail(err, args, kwargs)
        except Exception as err:  # any backend failure must become a fallback, never garbage
            return self._fail(EngineBuildError(f"{type(err).__name__}: {err}"), args, kwargs, cause=err)

    def _fail(self, err: MonaiTrtError, args: Any, kwargs: Any, cause: BaseException | None = None) -> Any:
        """Raise (`fallback: false`), or disable this wrapper for the rest of the process and run PyTorch."""
        if not self.spec.fallback:
            raise err from (cause or err.__cause__)
        self.disabled = str(err)
        logger.warning("%s: engine disabled, falling back to PyTorch: %s", self.spec.describe(), err)
        return self._pytorch(args, kwargs)

    def _pytorch(self, args: Any, kwargs: Any) -> Any:
        self.calls["pytorch"] += 1
        return self.original(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> EngineWrapper:
        """A copied module gets a fresh wrapper (engines are reloaded from the cache on demand)."""
        module = memo.get(id(self.module))
        if module is None:
            raise TypeError("an EngineWrapper is copied only as part of its module")
        clone = EngineWrapper.__new__(EngineWrapper)
        EngineWrapper.__init__(clone, module, self.spec)
        clone.previous_forward = None
        clone.original = types.MethodType(type(module).forward, module)
        clone.engine_set.original = clone.original
        return clone

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("monai_trt wrappers are not picklable; save the state_dict, or monai_trt.remove() first")


class _Reference:
    """PyTorch's outputs for one call, computed at most once, and only if the engine life cycle needs them."""

    def __init__(self, forward: Any, args: Any, kwargs: Any) -> None:
        self._forward, self._args, self._kwargs = forward, args, kwargs
        self._value: tuple[list[torch.Tensor], Any] | None = None

    def __call__(self) -> tuple[list[torch.Tensor], Any]:
        if self._value is None:
            try:
                with torch.no_grad():
                    outputs = self._forward(*self._args, **self._kwargs)
            except Exception as err:
                raise _CallerError() from err
            self._value = flatten_outputs(outputs)
        return self._value


class _CallerError(Exception):
    """The original forward raised on the caller's inputs (re-raised unchanged, engine stays enabled)."""
