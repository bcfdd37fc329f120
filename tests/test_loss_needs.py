"""What a training step must give the loss is the loss's to say (GAINLoss.step_needs, prepare, step_inputs): the
trainer's step stays generic, and RRR's mechanics (input gradients, unfused attention, held batch-norm statistics)
live with RRR."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from gain_exp.core.losses import GAINLoss, RightReasonsInputs, StepInputs, StepNeeds

ENGINE = Path(__file__).resolve().parent.parent / "gain_exp" / "train" / "engine.py"


class _Attention(nn.Module):
    """Stands in for timm's Attention: a ``fused_attn`` switch (fused kernels have no double backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.fused_attn = True
        self.proj = nn.Linear(4, 4)


class _Tiny(nn.Module):
    """conv -> batch norm -> pool -> linear, plus two attention modules (one already unfused)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.attn, self.other = _Attention(), _Attention()
        self.other.fused_attn = False
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).relu().mean(dim=(2, 3)))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([True, False, True, False])


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"am_weight": 0.0, "ex_weight": 0.0},  # baseline
        {"ex_weight": 0.0},  # gain
        {"ex_loss": "mse"},  # gain_ext
        {"ex_loss": "energy"},
        {"ex_loss": "rrr", "ex_weight": 0.0},
    ],
)  # rrr switched off: nothing to give
def test_a_loss_without_input_gradients_leaves_the_step_and_the_model_as_they_are(kwargs):
    loss = GAINLoss(multi_label=False, **kwargs)
    model = _Tiny().train()
    images, use_mask = _batch()
    for epoch in (0, 3):
        assert not loss.step_needs(epoch).input_gradients and not loss.step_needs(epoch).held_norm_stats
        loss.prepare(model, epoch)
        assert model.attn.fused_attn is True and model.other.fused_attn is False
        inputs = loss.step_inputs(model, images, use_mask, epoch)
        with inputs:
            assert _hooks(model) == 0
            model(inputs.images)
        assert inputs.images is images and not images.requires_grad and inputs.recorder is None
        assert inputs.loss_inputs() == {"images": None, "input_logits": None}


def test_rrr_needs_input_gradients_from_its_start_epoch_and_unfuses_attention_for_good():
    loss = GAINLoss(multi_label=False, am_weight=0.0, ex_weight=1.0, ex_loss="rrr", ex_start_epoch=1)
    model = _Tiny().train()
    assert loss.step_needs(0) == StepNeeds(mining=False, maps=False, input_gradients=False, held_norm_stats=False)
    loss.prepare(model, 0)
    assert model.attn.fused_attn is True  # before L_e starts: the fused kernels stay
    assert loss.step_needs(1) == StepNeeds(mining=False, maps=False, input_gradients=True, held_norm_stats=False)
    loss.prepare(model, 1)
    assert model.attn.fused_attn is False and model.other.fused_attn is False
    loss.prepare(model, 2)
    # unfused for good, as the trainer always did: evaluation runs the path training runs
    assert model.attn.fused_attn is False


def test_rrr_through_differentiates_the_training_forward():
    loss = GAINLoss(multi_label=False, am_weight=0.0, ex_weight=1.0, ex_loss="rrr")
    model = _Tiny().train()
    images, use_mask = _batch()
    inputs = loss.step_inputs(model, images, use_mask, 0)
    assert isinstance(inputs, StepInputs) and inputs.recorder is None
    with inputs:
        assert _hooks(model) == 0
        logits = model(inputs.images)
    given = inputs.loss_inputs()
    assert given["images"] is inputs.images and given["input_logits"] is None
    assert inputs.images.requires_grad and not images.requires_grad and torch.equal(inputs.images, images)
    (grads,) = torch.autograd.grad(logits.sum(), given["images"])
    assert grads.shape == images.shape


def test_rrr_held_records_the_batch_statistics_and_runs_the_annotated_images_again():
    loss = GAINLoss(multi_label=False, am_weight=0.0, ex_weight=1.0, ex_loss="rrr", rrr_norm_stats="held")
    assert loss.step_needs(0).input_gradients and loss.step_needs(0).held_norm_stats
    model = _Tiny().train()
    images, use_mask = _batch()
    inputs = loss.step_inputs(model, images, use_mask, 0)
    assert isinstance(inputs.recorder, RightReasonsInputs) and inputs.images is images
    with inputs:
        assert _hooks(model) == 1  # the batch norm's recorder
        logits = model(inputs.images)
    assert _hooks(model) == 0 and model.bn in inputs.recorder.stats
    given = inputs.loss_inputs()
    rows = given["images"]
    assert rows.requires_grad and torch.equal(rows, images[use_mask])
    torch.testing.assert_close(given["input_logits"], logits[use_mask], atol=1e-5, rtol=1e-5)
    assert model.bn.training  # back in training mode with its own running statistics
    # a batch without annotated images (single process): the recorder runs, nothing runs again
    none = loss.step_inputs(model, images, torch.zeros(4, dtype=torch.bool), 0, has_masks=False)
    with none:
        model(none.images)
    assert none.loss_inputs() == {"images": None, "input_logits": None}


@pytest.mark.parametrize("ex_loss", ["mse", "rrr"])
def test_the_streams_a_step_runs_are_those_the_trainer_ran(ex_loss):
    """StepNeeds.attention and .mining as the trainer computed them: am_on or (ex_on and not input_grad and masks)."""
    for am_weight, ex_weight, epoch, has_masks in itertools.product((0.0, 1.0), (0.0, 1.0), (0, 1, 2), (False, True)):
        loss = GAINLoss(
            multi_label=False,
            am_weight=am_weight,
            ex_weight=ex_weight,
            ex_loss=ex_loss,
            am_start_epoch=1,
            ex_start_epoch=2,
        )
        needs = loss.step_needs(epoch)
        am_on, ex_on = loss.active(epoch)
        input_grad = loss.input_gradients(epoch)
        assert needs.mining == am_on and needs.input_gradients == input_grad
        assert needs.attention(has_masks) == (am_on or (ex_on and not input_grad and has_masks))


def test_the_training_step_no_longer_knows_about_rrr():
    source = ENGINE.read_text()
    names = {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)}
    attrs = {node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)}
    assert "rrr" not in source.lower() and "fused_attn" not in source and "RightReasonsInputs" not in names | attrs
    assert "input_gradients" not in attrs
