"""The call path of one wrapped submodule: capture the call, ask for an engine, run it, or fall back to PyTorch.

An :class:`EngineWrapper` replaces a module's `forward` on the instance only, so `state_dict` keys never change.
How an engine comes to be (key, cache, build, load, refit, validation) is :mod:`.lifecycle`'s business.

A call is answered by PyTorch whenever an engine could not answer exactly what PyTorch would: autograd is needed
(gradients on and an input or parameter requires grad), a layer that behaves differently in training is in training
mode, the inputs are on a device no engine runs on (e.g. `meta`), tensor subclasses other than MONAI's MetaTensor,
or outputs whose type and metadata cannot be reproduced from the inputs. Each cause is logged once per wrapper
(`meta` inputs and tracing at DEBUG only).
"""

from __future__ import annotations

import ast
import copy
import inspect
import logging
import textwrap
import types
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from monai_trt.cache.keys import digest
from monai_trt.errors import EngineBuildError, MonaiTrtError
from monai_trt.patch import PatchEntry
from monai_trt.runtime.calls import (
    CapturedCall,
    OutputTypes,
    UnsupportedCall,
    capture_call,
    flatten_outputs,
    forward_signature,
    learn_output_types,
)
from monai_trt.runtime.devices import ReplicaSet
from monai_trt.runtime.lifecycle import EngineSet, LoadedEngine, Reference, autocast_mode, no_autocast

__all__ = ["EngineWrapper", "Usage", "USAGE", "training_dependent_layers"]

logger = logging.getLogger(__name__)


@dataclass
class Usage:
    """Whether the wrappers of one patched submodule (the original and its deep copies) served any call.

    Attributes:
        label: the wrapper's label (config id, submodule path, method, precision).
        served: calls served, by engine or PyTorch, over all copies.
        installed: copies still installed (`remove()` takes one off).
        reported: already reported as never having served a call.
    """

    label: str
    served: int = 0
    installed: int = 1
    reported: bool = False


# Usage records of this process's wrappers that may still need reporting (see hook.report_unused).
USAGE: list[Usage] = []


def _register(label: str) -> Usage:
    USAGE[:] = [u for u in USAGE if u.installed > 0 and not u.served]  # only those can still be reported
    usage = Usage(label)
    USAGE.append(usage)
    return usage


class EngineWrapper:
    """Callable installed as `module.forward`; see the module docstring.

    Args:
        module: the module to wrap.
        spec: its patch entry.
        network: the config id of the network it belongs to (e.g. `network`), for messages.

    Attributes:
        spec: the patch entry this submodule was wrapped with.
        label: the name in every message: config id and submodule path, method, precision.
        disabled: why this wrapper runs PyTorch for the rest of the process (None while engines may serve).
        calls: how this process's calls were served, `{"engine": n, "pytorch": m}` (with `devices`: per share).
        replicas: the per-device replicas splitting each call (entry field `devices`), or None.
    """

    is_monai_trt_wrapper = True

    def __init__(self, module: nn.Module, spec: PatchEntry, network: str = "") -> None:
        previous = module.__dict__.get("forward")
        while isinstance(previous, EngineWrapper):  # never stack wrappers: keep the forward beneath them
            previous = previous.unwrap()
        self._setup(module, spec, network, previous, _register(spec.describe(network)))

    def _setup(self, module: nn.Module, spec: PatchEntry, network: str, previous: Any, usage: Usage) -> None:
        self.module = module
        self.spec = spec
        self.network = network
        self.label = spec.describe(network)
        self.previous_forward = previous
        self.original = previous or types.MethodType(type(module).forward, module)
        self._signature = forward_signature(self.original)
        self.engine_set = EngineSet(module, self.original, spec, self.label)
        self.disabled: str | None = None
        self.calls = {"engine": 0, "pytorch": 0}
        self.usage = usage
        self._output_types: dict[Any, OutputTypes | str] = {}
        self._training_layers: list[tuple[str, nn.Module]] | None = None
        self._noted_training = False
        self.replicas = ReplicaSet.create(self, EngineWrapper) if spec.devices is not None else None
        self.checked_by = self.replicas  # who may vouch that the module is unchanged (a copy's: the owner's set)

    @property
    def engines(self) -> dict[Any, list[LoadedEngine]]:
        """Engines loaded in this process, by call layout."""
        return self.engine_set.by_layout

    @property
    def builds(self) -> int:
        """Engines this wrapper built in this process (cache hits excluded)."""
        return self.engine_set.builds

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._pytorch_only(args, kwargs):
            return self._pytorch(args, kwargs)
        if self.replicas is not None and self.replicas.active():  # split across devices (runtime/devices.py)
            return self.replicas(args, kwargs)
        try:
            call = capture_call(self._signature, args, kwargs, self.engine_set.input_float_dtype)
        except UnsupportedCall as err:
            if err.quiet:
                logger.debug("%s: this call runs in PyTorch: %s", self.label, err)
            else:
                self.engine_set.warn_once(f"call:{err}", "%s: this call runs in PyTorch: %s", self.label, err)
            return self._pytorch(args, kwargs)
        autocast = autocast_mode(call.layout.device)
        try:
            reference = _Reference(self.original, args, kwargs)
            deferred: list[Any] = []  # the per-call content check, read once the engine's work is enqueued
            vouched = self.checked_by is not None and self.checked_by.vouches_for(self)  # see runtime/devices.py
            loaded = self.engine_set.engine_for(call, reference, autocast, deferred, module_checked=vouched)
            if loaded is not None and call.output_key not in self._output_types and \
                    not self.engine_set.settle(deferred):  # output types are learned of the module as it is now
                return self(*args, **kwargs)
            output_types = self._output_types_for(call, reference, loaded) if loaded is not None else None
            if loaded is None or output_types is None:
                return self._pytorch(args, kwargs)
            with no_autocast(call.layout.device, autocast is not None):
                outputs = loaded.run(call.tensors)
            if not self.engine_set.confirm(deferred):  # the module had changed (the deferred check): answer anew
                return self(*args, **kwargs)
            result = loaded.restore(outputs, autocast, lambda leaves: output_types.apply(leaves, call.inputs))
            self._served("engine")
            return result
        except _CallerError as err:
            raise err.__cause__ from None  # PyTorch itself rejects these inputs: the caller's error, not the engine's
        except MonaiTrtError as err:
            return self._fail(err, args, kwargs)
        except Exception as err:  # any backend failure must become a fallback, never garbage
            return self._fail(EngineBuildError(f"{type(err).__name__}: {err}"), args, kwargs, cause=err)

    def _pytorch_only(self, args: Any, kwargs: Any) -> bool:
        """True when PyTorch must answer this call (each cause but tracing is logged once)."""
        if self.disabled or torch.compiler.is_compiling() or torch.jit.is_scripting():
            return True
        if torch.is_grad_enabled():
            needs = self._needs_autograd(args, kwargs)
            if needs:
                self.engine_set.warn_once(
                    "autograd", "%s: gradients are enabled and %s requires grad, so calls like this run in PyTorch "
                    "(engine outputs carry no autograd graph); run inference under torch.no_grad() or "
                    "torch.inference_mode() to use the engine", self.label, needs)
                return True
        if not _any_training(self.module):  # eval mode throughout: nothing to look up
            return False
        if self._training_layers is None:  # reads layer sources (~0.3 s for a UNet): only once something trains
            self._training_layers = training_dependent_layers(self.module)
        for name, layer in self._training_layers:
            if layer.training and _differs_in_training(layer):
                self.engine_set.warn_once(
                    "training", "%s: %s is in training mode, where it behaves differently, so calls run in PyTorch; "
                    "call .eval() on the network before inference (in a bundle: \"$@%s.eval()\" in initialize)",
                    self.label, f"'{name}' ({type(layer).__name__})" if name else type(layer).__name__,
                    self.network or "network")
                return True
        if self.module.training and not self._noted_training:
            self._noted_training = True
            logger.info("%s: the module is in training mode, but none of its layers behaves differently there: calls "
                        "without gradients use the engine", self.label)
        return False

    def _needs_autograd(self, args: Any, kwargs: Any) -> str:
        """What requires grad ("an input", "a parameter"), or "" (call only while gradients are enabled)."""
        if any(isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in pytree.tree_leaves((args, kwargs))):
            return "an input"
        return "a parameter" if any(p.requires_grad for p in self.module.parameters()) else ""

    def _output_types_for(self, call: CapturedCall, reference: Reference, loaded: LoadedEngine) -> OutputTypes | None:
        """How to give engine outputs PyTorch's tensor types, learned once per call layout and input kinds (and
        remembered in the cache with the engine's validation, so a cache hit needs no PyTorch forward for it)."""
        key = call.output_key
        rule = self._output_types.get(key)
        if rule is None:
            remembered_key = digest(key)
            remembered = loaded.verdicts.output_types(remembered_key) if loaded.verdicts is not None else None
            if remembered is not None:
                rule = OutputTypes(remembered)
            else:
                leaves, _ = reference()  # already computed when this call validated or built the engine
                rule = learn_output_types(leaves, call)
                if isinstance(rule, OutputTypes) and loaded.verdicts is not None:
                    loaded.verdicts.record_output_types(remembered_key, rule.sources)
            self._output_types[key] = rule
        if isinstance(rule, str):
            self.engine_set.warn_once(f"types:{rule}", "%s: %s, which an engine cannot reproduce, so calls like this "
                                      "run in PyTorch", self.label, rule)
            return None
        return rule

    def _fail(self, err: MonaiTrtError, args: Any, kwargs: Any, cause: BaseException | None = None) -> Any:
        """Raise (`fallback: false`), or disable this wrapper for the rest of the process and run PyTorch."""
        if not self.spec.fallback:
            raise err from (cause or err.__cause__)
        self.disabled = str(err)
        logger.warning("%s: engine disabled, falling back to PyTorch: %s", self.label, err)
        return self._pytorch(args, kwargs)

    def _served(self, how: str) -> None:
        self.calls[how] += 1
        self.usage.served += 1

    def _pytorch(self, args: Any, kwargs: Any) -> Any:
        self._served("pytorch")
        return self.original(*args, **kwargs)

    def unwrap(self) -> Any:
        """The forward beneath this wrapper (None: the class forward), for whoever takes the wrapper off a module."""
        self.usage.installed -= 1
        return self.previous_forward

    def __deepcopy__(self, memo: dict[int, Any]) -> EngineWrapper:
        """A copied module gets a fresh wrapper (engines are reloaded from the cache on demand).

        The forward beneath the wrapper is deep-copied as `copy.deepcopy` of the unwrapped module would copy it: a
        forward bound to the module is bound to the copy.
        """
        module = memo.get(id(self.module))
        if module is None:
            raise TypeError("an EngineWrapper is copied only as part of its module")
        clone = EngineWrapper.__new__(EngineWrapper)
        clone._setup(module, self.spec, self.network, copy.deepcopy(self.previous_forward, memo), self.usage)
        self.usage.installed += 1  # copies share one record: a template whose copies serve calls was used
        return clone

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("monai_trt wrappers are not picklable; save the state_dict, or monai_trt.remove() first")


def training_dependent_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules whose output may depend on their training flag (checked per call: only in training mode they
    make a call run in PyTorch).

    torch's dropout layers (when p > 0) and instance norms with running stats are recognised as such; any other
    module qualifies when its class (or a base class) reads a `.training` attribute, or its source is unreadable.
    """
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.instancenorm._InstanceNorm))
            or _reads_training(type(m))]


def _any_training(module: nn.Module) -> bool:
    """Whether `module` or any submodule is in training mode (a plain walk: `modules()` costs ~5x more per call)."""
    stack = [module]
    while stack:
        m = stack.pop()
        if m.training:
            return True
        stack.extend(child for child in m._modules.values() if child is not None)
    return False


def _differs_in_training(layer: nn.Module) -> bool:
    if isinstance(layer, nn.modules.dropout._DropoutNd) and not _reads_training(type(layer), torch_own=False):
        return layer.p > 0
    if isinstance(layer, nn.modules.instancenorm._InstanceNorm) and not _reads_training(type(layer), torch_own=False):
        return layer.track_running_stats
    return True


@lru_cache(maxsize=None)
def _reads_training(cls: type, torch_own: bool = True) -> bool:
    """True when `cls` or a base class below nn.Module reads `.training` (or its source cannot be read).

    With `torch_own=False`, classes defined in torch.nn itself are skipped (their use of the flag is known).
    """
    for klass in cls.__mro__:
        if klass is nn.Module or klass.__module__ == "builtins" or not issubclass(klass, nn.Module):
            continue
        if not torch_own and klass.__module__.startswith("torch.nn."):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            return True
        if any(isinstance(node, ast.Attribute) and node.attr == "training" for node in ast.walk(tree)):
            return True
    return False


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

    def rerun(self) -> Any:
        with torch.no_grad():
            return self._forward(*self._args, **self._kwargs)


class _CallerError(Exception):
    """The original forward raised on the caller's inputs (re-raised unchanged, engine stays enabled)."""
