"""`torch_tensorrt.dynamo.compile` of the double: checks the settings the way Torch-TensorRT does, records them."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch_tensorrt

_VERSION = tuple(int(p) for p in torch_tensorrt.__version__.split(".")[:2])
_EXPLICIT_DEFAULT = _VERSION >= (2, 10)


class _Compiled(torch.nn.Module):
    def __init__(self, program: torch.export.ExportedProgram, inputs: Sequence[torch_tensorrt.Input]) -> None:
        super().__init__()
        self.program = program
        self._module = program.module()
        self._inputs = list(inputs)

    def forward(self, *args: torch.Tensor) -> Any:
        for tensor, spec in zip(args, self._inputs):
            shape = tuple(tensor.shape)
            if not all(a <= s <= b for a, s, b in zip(spec.min_shape, shape, spec.max_shape)):
                raise RuntimeError(f"input shape {shape} outside the compiled range {spec.min_shape}..{spec.max_shape}")
        return self._module(*args)


def compile(
    exported_program: torch.export.ExportedProgram,
    inputs: Sequence[Any] | None = None,
    *,
    arg_inputs: Sequence[Any] | None = None,
    device: Any = None,
    disable_tf32: bool = False,
    enabled_precisions: Collection[torch.dtype] = (torch.float32,),
    use_explicit_typing: bool = _EXPLICIT_DEFAULT,
    workspace_size: int = 0,
    min_block_size: int = 5,
    torch_executed_ops: Collection[Any] | None = None,
    require_full_compilation: bool = False,
    truncate_double: bool = False,
    version_compatible: bool = False,
    hardware_compatible: bool = False,
    optimization_level: int | None = None,
    use_python_runtime: bool = False,
    use_fp32_acc: bool = False,
) -> _Compiled:
    specs = list(arg_inputs if arg_inputs is not None else inputs or [])
    if not all(isinstance(s, torch_tensorrt.Input) for s in specs):
        raise TypeError("inputs must be torch_tensorrt.Input")
    if use_explicit_typing and set(enabled_precisions) - {torch.float32}:
        raise ValueError("use_explicit_typing=True requires enabled_precisions == {torch.float32}")
    import tensorrt  # the compile path needs TensorRT; on 11.x only explicit typing exists

    if int(tensorrt.__version__.split(".")[0]) >= 11 and not use_explicit_typing:
        raise ValueError("TensorRT 11 networks are strongly typed: use_explicit_typing must be True")
    settings = {k: v for k, v in locals().items() if k not in ("exported_program", "inputs", "arg_inputs", "tensorrt", "specs")}
    torch_tensorrt.COMPILES.append({**settings, "inputs": specs})
    return _Compiled(exported_program, specs)
