"""Kernel launches of the eager decode step on a GPU (issue 21, defect 10), counted as aten ops on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edgectx.model.transformer import RMSNorm


class OpLog(TorchDispatchMode):
    """The aten ops a call dispatches; on CUDA each one that is not a view is a kernel launch."""

    VIEWS = {"slice", "view", "alias", "as_strided", "expand", "transpose", "t", "select"}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))

    @property
    def launches(self) -> int:
        return sum(op not in self.VIEWS for op in self.ops)


def _norm(dim=64, seed=0) -> RMSNorm:
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(dim, 1e-5)
    norm.weight.data = torch.randn(dim, generator=gen)
    return norm


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()).to(x.dtype)


def test_rms_norm_on_cuda_is_one_launch_with_the_same_numbers():
    norm, x = _norm(), torch.randn(3, 64, generator=torch.Generator().manual_seed(1)) * 3
    with torch.inference_mode():
        with OpLog() as fused:
            y_fused = norm.fused(x)
        with OpLog() as layer_norm:
            y_cpu = norm.as_layer_norm(x)
        assert fused.ops == ["rms_norm"] and layer_norm.launches == 4  # neg, cat, cat, layer_norm
        assert torch.equal(norm(x), y_cpu)  # the CPU keeps its measured-faster form, bit for bit
        ref = _reference(x, norm.weight, norm.eps)
        assert torch.allclose(y_fused, ref, atol=2e-6, rtol=1e-6) and torch.allclose(y_cpu, ref, atol=2e-6, rtol=1e-6)


@pytest.mark.gpu
def test_rms_norm_on_cuda_takes_the_fused_kernel():
    norm = _norm().cuda()
    x = torch.randn(3, 64, device="cuda")
    with torch.inference_mode(), OpLog() as log:
        y = norm(x)
    assert log.ops == ["rms_norm"]
    assert torch.allclose(y, _reference(x, norm.weight, norm.eps), atol=1e-5)
    xb = x.bfloat16()
    assert torch.allclose(norm.bfloat16()(xb).float(), _reference(xb.float(), norm.weight.float(), norm.eps), atol=5e-2)
