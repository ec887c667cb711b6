"""Explicit attention → scaled_dot_product_attention rewrite (monai_trt.export.attention)."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from torch import nn
from torch.export import Dim

from monai_trt.export.attention import fuse_attention

SDPA = torch.ops.aten.scaled_dot_product_attention.default
SOFTMAX = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)


def _count(program: torch.export.ExportedProgram, targets) -> int:
    targets = targets if isinstance(targets, tuple) else (targets,)
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target in targets)


def _export(module: nn.Module, args: tuple, dynamic: bool = True) -> torch.export.ExportedProgram:
    batch = Dim("batch", min=1, max=16)
    shapes = tuple({0: batch} for _ in args) if dynamic else None
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=shapes)


def _fuse(module: nn.Module, args: tuple, expected: int, dynamic: bool = True) -> torch.export.ExportedProgram:
    """Export, rewrite, and check the count, the graph and that the original program is untouched."""
    program = _export(module, args, dynamic)
    softmaxes = _count(program, SOFTMAX)
    fused, count = fuse_attention(program)
    assert count == expected
    assert _count(fused, SDPA) == _count(program, SDPA) + expected
    assert _count(fused, SOFTMAX) == softmaxes - expected
    assert _count(program, SOFTMAX) == softmaxes  # the input program is not modified
    fused.validate()
    return fused


def _close(fused: torch.export.ExportedProgram, module: nn.Module, args: tuple, **tol: float) -> None:
    with torch.no_grad():
        expected, actual = module(*args), fused.module()(*args)
    torch.testing.assert_close(actual, expected, **(tol or {"rtol": 1e-5, "atol": 1e-5}))


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + len(shape)))


# ------------------------------------------------------------------------------------------ plain attention forms


class Plain(nn.Module):
    """softmax(q @ kᵀ * scale) @ v."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.125, dim=-1) @ v


class ScaledQuery(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax((q * 0.25) @ k.transpose(-2, -1), dim=-1) @ v


class Divided(nn.Module):
    """VISTA3D's spelling: permute for kᵀ, division by sqrt(d)."""

    def forward(self, q, k, v):
        attn = q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1])
        return torch.softmax(attn, dim=-1) @ v


class GivenKt(nn.Module):
    """kᵀ arrives as an input, so the rewrite transposes it back."""

    def forward(self, q, kt, v):
        return torch.matmul(q, kt).mul(0.3).softmax(-1).matmul(v)


class Einsum(nn.Module):
    def forward(self, q, k, v):
        attn = torch.einsum("bhxd,bhyd->bhxy", q, k) * 0.2
        return torch.einsum("bhxy,bhyd->bhxd", attn.softmax(dim=-1), v)


class Bmm(nn.Module):
    """3-D operands (batch and heads merged)."""

    def forward(self, q, k, v):
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))
        return torch.bmm(torch.bmm(q, k.transpose(1, 2)).div(4.0).softmax(-1), v)


class BiasThenScale(nn.Module):
    """The bias is added before the scale, so it is scaled too."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(_rand(1, 4, 12, 12))

    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1) + self.bias) * 0.5, dim=-1) @ v


class Temperature(nn.Module):
    """A learned per-head temperature (MONAI's CABlock / Restormer spelling), scores first."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(_rand(4, 1, 1).abs() + 0.5)

    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1) @ v


class RelativeScores(nn.Module):
    """A second score term (as decomposed relative positions add): one matmul is the scores, the other the mask."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3 + q @ v.transpose(-2, -1), dim=-1) @ v


QKV = (_rand(2, 4, 12, 8), _rand(2, 4, 12, 8), _rand(2, 4, 12, 8))


def test_plain_attention_with_dynamic_batch():
    fused = _fuse(Plain(), QKV, expected=1)
    (sdpa,) = [n for n in fused.graph.nodes if n.target is SDPA]
    assert sdpa.kwargs["scale"] == 0.125 and sdpa.args[3] is None  # scale kept, no mask
    for batch in (1, 2, 5):
        _close(fused, Plain(), tuple(_rand(batch, 4, 12, 8) for _ in range(3)))


@pytest.mark.parametrize(
    "module", [ScaledQuery, Divided, GivenKt, Einsum, Bmm, BiasThenScale, Temperature, RelativeScores]
)
def test_scale_bias_and_layout_variants(module):
    net = module()
    args = (QKV[0], QKV[1].transpose(-2, -1).contiguous(), QKV[2]) if module is GivenKt else QKV
    fused = _fuse(net, args, expected=1)
    _close(fused, net, args)
    _close(fused, net, tuple(_rand(3, *a.shape[1:]) for a in args))


def test_scale_on_query_is_folded_into_sdpa():
    fused = _fuse(ScaledQuery(), QKV, expected=1)
    (sdpa,) = [n for n in fused.graph.nodes if n.target is SDPA]
    assert sdpa.kwargs["scale"] == 0.25
    assert not [n for n in fused.graph.nodes if n.target is torch.ops.aten.mul.Tensor]


# ------------------------------------------------------------------------------------------------ MONAI blocks


def _window_attention(mask: bool, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, tuple]:
    """A SwinUNETR WindowAttention (explicit path) with 8 windows of 4x4x4 per image, optionally shifted-masked."""
    from monai.networks.nets.swin_unetr import WindowAttention

    class Windows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = WindowAttention(dim=24, num_heads=3, window_size=(4, 4, 4), use_flash_attention=False)
            nn.init.normal_(self.attn.relative_position_bias_table, std=0.5)
            m = torch.where(_rand(8, 64, 64) > 0.8, -100.0, 0.0) if mask else None
            self.register_buffer("mask", m)

        def forward(self, x):
            b = x.shape[0]
            return self.attn(x.reshape(b * 8, 64, 24), self.mask).reshape(b, 512, 24)

    torch.manual_seed(0)
    return Windows().eval().to(dtype), (_rand(2, 512, 24).to(dtype),)


@pytest.mark.parametrize("mask", [False, True], ids=["bias", "bias+shift-mask"])
def test_swin_window_attention(mask):
    net, args = _window_attention(mask)
    fused = _fuse(net, args, expected=1)
    # the shifted-window mask goes through view(b // nw, nw, ...): replayed on zeros; a bias alone is passed as is
    assert _count(fused, torch.ops.aten.new_zeros.default) == int(mask)
    for batch in (1, 3):
        _close(fused, net, (_rand(batch, 512, 24),))


def test_swin_window_attention_fp16():
    net, args = _window_attention(mask=True, dtype=torch.float16)
    program = _export(net, args)
    assert _count(program, torch.ops.aten.to.dtype) == 1  # attn.to(v.dtype)
    fused = _fuse(net, args, expected=1)
    assert _count(fused, torch.ops.aten.to.dtype) == 0
    with torch.no_grad():
        reference = copy.deepcopy(net).float()(args[0].float())
        explicit, rewritten = program.module()(*args).float(), fused.module()(*args).float()
    assert rewritten.dtype == explicit.dtype
    # SDPA rounds no worse than the explicit fp16 chain (it keeps the scores in fp32)
    assert (rewritten - reference).abs().max() <= (explicit - reference).abs().max() * 1.5 + 1e-3


def test_a_static_mask_of_misaligned_rows_is_zero_padded():
    """27 keys per window: the mask reaches SDPA as a view of a zero-padded copy (rows aligned to 8 elements), as
    eager PyTorch pads it, not as strides Inductor would pad with uninitialised memory."""
    from monai.networks.nets.swin_unetr import WindowAttention

    torch.manual_seed(0)
    class Windows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = WindowAttention(dim=24, num_heads=3, window_size=(3, 3, 3), use_flash_attention=False)
            nn.init.normal_(self.attn.relative_position_bias_table, std=0.5)

        def forward(self, x):
            return self.attn(x, None)

    attn = Windows().eval()
    args = (_rand(4, 27, 24),)
    fused = _fuse(attn, args, expected=1, dynamic=False)
    (sdpa,) = [n for n in fused.graph.nodes if n.target is SDPA]
    mask = sdpa.args[3]
    while mask.target is torch.ops.aten.unsqueeze.default:
        mask = mask.args[0]
    assert mask.target is torch.ops.aten.slice.Tensor
    assert mask.args[0].target is torch.ops.aten.constant_pad_nd.default
    assert mask.args[0].meta["val"].shape[-1] == 32
    _close(fused, attn, args)


def test_swin_window_attention_fp16_with_fp32_mask():
    """SwinUNETR computes its shift mask in float32 in forward: half scores + float32 mask widen the chain."""
    net, args = _window_attention(mask=True, dtype=torch.float16)
    net.mask = net.mask.float()
    program = _export(net, args)
    fused = _fuse(net, args, expected=1)
    with torch.no_grad():
        reference = copy.deepcopy(net).float()(args[0].float())
        explicit, rewritten = program.module()(*args).float(), fused.module()(*args).float()
    assert (rewritten - reference).abs().max() <= (explicit - reference).abs().max() * 1.5 + 1e-3


class Fp32Softmax(nn.Module):
    """Half-precision attention whose scores are cast up for the softmax and back down for `@ v`."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(_rand(1, 4, 12, 12))

    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1)).float() * 0.3 + self.bias, -1).to(v.dtype) @ v


class Fp32SoftmaxDtype(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3, -1, dtype=torch.float32).type_as(v) @ v


@pytest.mark.parametrize("module", [Fp32Softmax, Fp32SoftmaxDtype])
def test_half_attention_with_fp32_softmax(module):
    net, args = module().eval(), tuple(t.half() for t in QKV)
    program = _export(net.half(), args)
    fused = _fuse(net, args, expected=1)
    assert _count(fused, (torch.ops.aten.to.dtype, torch.ops.aten.type_as.default)) == 0
    with torch.no_grad():
        reference = copy.deepcopy(net).float()(*(t.float() for t in args))
        explicit, rewritten = program.module()(*args).float(), fused.module()(*args).float()
    assert (rewritten - reference).abs().max() <= (explicit - reference).abs().max() * 1.5 + 1e-3


def test_monai_sablock():
    from monai.networks.blocks import SABlock

    torch.manual_seed(0)
    net = SABlock(hidden_size=32, num_heads=4, qkv_bias=True).eval()
    args = (_rand(2, 10, 32),)
    fused = _fuse(net, args, expected=1)
    _close(fused, net, (_rand(3, 10, 32),))


def test_swinunetr_every_window_attention():
    from monai.networks.nets import SwinUNETR
    from monai.networks.nets.swin_unetr import WindowAttention

    torch.manual_seed(0)
    # batch norm (eval) rather than instance norm, which refuses the 1x1x1 bottleneck of a 32³ input
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3, norm_name="batch").eval()
    sites = sum(isinstance(m, WindowAttention) for m in net.modules())
    assert sites == 8
    fused = _fuse(net, (_rand(2, 1, 32, 32, 32),), expected=sites)
    # 32³: the stages at 16³ and 8³ shift their second block's windows (masked); at 4³ and 2³ a window is the image
    assert _count(fused, torch.ops.aten.new_zeros.default) == 2
    _close(fused, net, (_rand(1, 1, 32, 32, 32),), rtol=1e-4, atol=1e-4)
    # in half precision too, where the shift masks stay float32 (computed in forward)
    _fuse(net.half(), (_rand(2, 1, 32, 32, 32).half(),), expected=sites)


# ------------------------------------------------------------------------------------------ left unchanged


class SoftmaxOverKeys(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v


class ProbsReturned(nn.Module):
    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return probs @ v, probs


class ScoresReused(nn.Module):
    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1)
        return torch.softmax(scores, dim=-1) @ v + scores.mean()


class TrainingDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v):
        return self.drop(torch.softmax(q @ k.transpose(-2, -1), dim=-1)) @ v


class BoolMask(nn.Module):
    def forward(self, q, k, v):
        scores = (q @ k.transpose(-2, -1)).masked_fill(torch.ones(12, 12, dtype=torch.bool).tril() == 0, -1e4)
        return torch.softmax(scores, dim=-1) @ v


class ProbsRescaled(nn.Module):
    def forward(self, q, k, v):
        return (torch.softmax(q @ k.transpose(-2, -1), dim=-1) * 2) @ v


class ScoresBroadcast(nn.Module):
    """The bias broadcasts the scores (one query set for every batch item): not an SDPA shape."""

    def forward(self, q, k, v):
        return torch.softmax(q[:1] @ k[:1].transpose(-2, -1) + k[..., :1] * v[..., :1].transpose(-2, -1), -1) @ v


class NarrowingCast(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-2, -1)).half(), dim=-1).float() @ v


@pytest.mark.parametrize(
    "module",
    [SoftmaxOverKeys, ProbsReturned, ScoresReused, TrainingDropout, BoolMask, ProbsRescaled, ScoresBroadcast,
     NarrowingCast],
)
def test_left_unchanged(module):
    net = module().train(module is TrainingDropout)
    program = _export(net, QKV)
    fused, count = fuse_attention(program)
    assert count == 0 and fused is program
    assert _count(program, SDPA) == 0 and _count(program, SOFTMAX) == 1
    if module is not TrainingDropout:
        _close(fused, net, QKV)


def test_a_failing_rewrite_keeps_the_program(monkeypatch, trt_logs):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(sys.modules[fuse_attention.__module__], "_rewrite", broken)
    program = _export(Plain(), QKV)
    assert fuse_attention(program) == (program, 0)
    assert "attention rewrite skipped (RuntimeError: boom)" in trt_logs.text()


def test_causal_sablock_is_left_unchanged():
    from monai.networks.blocks import SABlock

    net = SABlock(hidden_size=32, num_heads=4, causal=True, sequence_length=10).eval()
    program = _export(net, (_rand(2, 10, 32),))
    assert fuse_attention(program) == (program, 0)  # boolean masked_fill


# ------------------------------------------------------------------------------------- downstream of the rewrite


def test_decomposed_graph_and_decomposing_after():
    net, args = _window_attention(mask=True)
    program = _export(net, args)
    decomposed, count = fuse_attention(program.run_decompositions())  # bmm / _softmax / _unsafe_view forms
    assert count == 1 and _count(decomposed, SOFTMAX) == 0
    _close(decomposed, net, (_rand(3, 512, 24),))
    fused, _ = fuse_attention(program)
    _close(fused.run_decompositions(), net, (_rand(3, 512, 24),))  # as the ONNX exporter and Inductor do


def test_onnx_export_of_the_rewritten_program(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    net, args = _window_attention(mask=True)
    fused = _fuse(net, args, expected=1)
    path = str(tmp_path / "attn.onnx")
    with torch.no_grad():
        torch.onnx.export(fused, args, path, dynamo=True, dynamic_shapes=({0: Dim("batch", min=1, max=16)},))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = _rand(3, 512, 24)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), net(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_aoti_compiles_the_rewritten_program(tmp_path):
    net, args = _window_attention(mask=True)
    fused = _fuse(net, args, expected=1)
    with torch.no_grad():
        path = torch._inductor.aoti_compile_and_package(fused, package_path=str(tmp_path / "attn.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        for batch in (1, 3):
            x = _rand(batch, 512, 24)
            torch.testing.assert_close(runner(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_an_aoti_engine_serves_the_fused_attention(trt_logs):
    """Through monai_trt.apply: the build rewrites the attention, the engine validates and serves the call."""
    import monai_trt

    net, (x,) = _window_attention(mask=True)
    wrapped = monai_trt.apply(copy.deepcopy(net).eval(), [{"method": "aoti", "precision": "fp32"}])
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), net(x), rtol=1e-4, atol=1e-5)
    assert monai_trt.wrappers(wrapped)[""].calls == {"engine": 1, "pytorch": 0}
    assert "rewrote 1 explicit attention(s) into scaled_dot_product_attention" in trt_logs.text()
