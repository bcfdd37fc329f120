"""CUDA tier (marker ``gpu``): skipped without a device, run by ``make test`` on a machine with one.

The GAIN step is device-agnostic code; these check that CUDA gives the CPU's numbers for every formulation and
gradient mode (fp32; cuDNN's kernels differ in summation order, hence the tolerance).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from gain_exp.core.gain import GAIN
from gain_exp.core.losses import GAINLoss

pytestmark = pytest.mark.gpu


def _step(model: torch.nn.Module, device: str, mode: str, formulation: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One GAIN_ext step's loss and parameter gradients on ``device`` from the same weights and batch."""
    model = copy.deepcopy(model).to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=generator).to(device)
    t = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float32).to(device)
    seg = torch.randint(0, 4, (4, 32, 32), generator=generator, dtype=torch.uint8).to(device)  # 0: background
    out = GAIN(model, grad_mode=mode, formulation=formulation, multi_label=True)(x, t)
    loss = GAINLoss(multi_label=True)(out, t, seg, torch.ones(4, dtype=torch.bool, device=device))
    loss.total.backward()
    return loss.total.detach().cpu(), [p.grad.detach().cpu() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("formulation", ["batch", "per_label"])
@pytest.mark.parametrize("mode", ["full", "features", "frozen"])
def test_a_cuda_step_gives_the_cpu_numbers(mode: str, formulation: str) -> None:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).train()
    cpu_loss, cpu_grads = _step(model, "cpu", mode, formulation)
    cuda_loss, cuda_grads = _step(model, "cuda", mode, formulation)
    assert torch.allclose(cpu_loss, cuda_loss, rtol=1e-4, atol=1e-5)
    assert len(cpu_grads) == len(cuda_grads)
    for a, b in zip(cpu_grads, cuda_grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
