"""Instance norm without a view (monai_trt.export.norms): same results, no `[1, N*C, ...]` view left for Inductor's
channels-last layout to break."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

from monai_trt.export.norms import unview_instance_norms

INSTANCE_NORM = torch.ops.aten.instance_norm.default


class ConvNorm(nn.Module):
    def __init__(self, dims: int = 3, affine: bool = True, running: bool = False, output_norm: bool = False) -> None:
        super().__init__()
        conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dims == 3 else (nn.Conv2d, nn.InstanceNorm2d)
        self.conv = conv(2, 6, 3, padding=1)
        self.norm = norm(6, affine=affine, track_running_stats=running)
        self.tail = conv(6, 3, 1)
        self.output_norm = output_norm
        if affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-0.5, 0.5)
        if running:
            self.norm.running_mean.uniform_(-0.2, 0.2)
            self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        return y if self.output_norm else self.tail(torch.relu(y))


def _count(program: torch.export.ExportedProgram) -> int:
    return sum(1 for n in program.graph.nodes if n.target is INSTANCE_NORM)


def _export(module: nn.Module, x: torch.Tensor, dynamic: bool) -> torch.export.ExportedProgram:
    shapes = ({0: Dim("batch", min=1, max=8)},) if dynamic else None
    with torch.no_grad():
        return torch.export.export(module, (x,), dynamic_shapes=shapes)


@pytest.mark.parametrize(
    "dims, affine, running, output_norm, dynamic",
    [(3, True, False, False, True), (3, False, False, False, False), (2, True, True, False, False),
     (3, True, False, True, False)],
)
def test_same_results_without_instance_norm(dims, affine, running, output_norm, dynamic):
    module = ConvNorm(dims, affine, running, output_norm).eval()
    x = torch.randn(3, 2, *([6] * dims), generator=torch.Generator().manual_seed(dims))
    program = _export(module, x, dynamic)
    assert _count(program) == 1
    rewritten, count = unview_instance_norms(program)
    assert count == 1 and _count(rewritten) == 0
    assert _count(program) == 1  # the input program is untouched
    rewritten.validate()
    with torch.no_grad():
        torch.testing.assert_close(rewritten.module()(x), module(x), rtol=1e-5, atol=1e-5)
        if dynamic:
            small = x[:1]
            torch.testing.assert_close(rewritten.module()(small), module(small), rtol=1e-5, atol=1e-5)


def test_no_view_folds_batch_into_channels():
    """After decomposition the graph must not hold the `[1, N*C, ...]` view Inductor's layout pass breaks on."""
    module = ConvNorm().eval()
    x = torch.randn(4, 2, 5, 5, 5)
    program, _ = unview_instance_norms(_export(module, x, dynamic=False))
    folded = [n for n in program.run_decompositions().graph.nodes
              if n.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
              and list(n.meta["val"].shape[:2]) == [1, 4 * 6]]
    assert not folded
    # and the original does hold one (so the check above can fail)
    original = _export(module, x, dynamic=False).run_decompositions()
    assert any(list(n.meta["val"].shape[:2]) == [1, 24] for n in original.graph.nodes
               if n.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default))


def test_half_precision_is_computed_wide():
    module = ConvNorm().eval()
    x = torch.randn(2, 2, 6, 6, 6) * 30 + 200  # large mean: float16 statistics would lose digits
    program, _ = unview_instance_norms(_export(module, x, dynamic=False))
    casts = [n for n in program.graph.nodes if n.target is torch.ops.aten.var_mean.correction]
    assert casts and all(n.args[0].meta["val"].dtype == torch.float32 for n in casts)
    half = ConvNorm().eval().to(torch.bfloat16)
    half.load_state_dict(module.state_dict())
    hx = x.to(torch.bfloat16)
    program, count = unview_instance_norms(_export(half, hx, dynamic=False))
    assert count == 1
    stats = [n for n in program.graph.nodes if n.target is torch.ops.aten.var_mean.correction]
    assert stats[0].args[0].meta["val"].dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(program.module()(hx).float(), half(hx).float(), rtol=2e-2, atol=2e-2)


def test_training_mode_norm_left_alone():
    module = ConvNorm(running=True).train()
    program = _export(module, torch.randn(2, 2, 4, 4, 4), dynamic=False)
    if _count(program) == 0:
        pytest.skip("this torch exports training-mode instance norm without aten.instance_norm")
    rewritten, count = unview_instance_norms(program)
    assert count == 0 and rewritten is program
