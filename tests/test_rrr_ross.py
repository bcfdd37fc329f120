"""Ross et al.'s RRR setting (experiment=decoy_rrr_ross): the mlp backbone, RRR's penalty and its gradient on a tiny
MLP against a hand computation, the map-less backbone's refusals, and the recipe composing and training.

The hand example: one 1 x 2 single-channel image x = (1, 2) of class 0, two classes, an MLP with one hidden layer of 3
ReLU units, W1 rows u1 = (1, 0), u2 = (0, 1), u3 = (-1, -1) (inactive at x), b1 = 0, so h = (1, 2, 0); head rows
(w, -1, 5) and (c, 0, 7), b2 = 0, with w = 2 and c = ln 3: z = (w - 2, c) = (0, ln 3), p = (1/4, 3/4).
With two classes, d(sum_k log p_k)/dx = sum_k (1 - 2 p_k) dz_k/dx = -tanh(d / 2) (v_0 - v_1), d = z_0 - z_1,
v_k = dz_k/dx: v_0 = w u1 - u2 = (2, -1), v_1 = c u1 = (ln 3, 0), tanh(d / 2) = -1/2, so the input gradient is
((w - c) / 2, -1/2) = (1 - ln 3 / 2, -1/2).
  Pixel 0 irrelevant: penalty P = t^2 q^2 with t = tanh(d / 2), q = w - c: (1 - ln 3 / 2)^2.
  Both irrelevant: (1 - ln 3 / 2)^2 + 1/4.
  dP/dw (d and q both grow by 1 per unit of w): t q^2 (1 - t^2) + 2 t^2 q = -3 q^2 / 8 + q / 2.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import compose

import gain_exp.core.models  # noqa: F401 - registers mlp with timm
from gain_exp.config.checks import check_config
from gain_exp.core.gain import GAIN, GAINOutput
from gain_exp.core.losses import GAINLoss
from gain_exp.core.metrics import LocalisationMetrics
from gain_exp.data.decoy_digits import build
from gain_exp.run import train

LN3 = math.log(3.0)
Q = 2.0 - LN3


def _tiny_mlp() -> torch.nn.Module:
    model = timm.create_model("mlp", num_classes=2, in_chans=1, img_size=(1, 2), hidden=(3,))
    with torch.no_grad():
        first = model.features[0]
        first.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        first.bias.zero_()
        model.fc.weight.copy_(torch.tensor([[2.0, -1.0, 5.0], [LN3, 0.0, 7.0]]))
        model.fc.bias.zero_()
    return model


def _penalty(model: torch.nn.Module, seg: torch.Tensor) -> torch.Tensor:
    images = torch.tensor([[[[1.0, 2.0]]]], requires_grad=True)
    logits = model(images)
    loss = GAINLoss(multi_label=False, am_weight=0.0, ex_weight=1.0, ex_loss="rrr")
    targets = torch.tensor([[1.0, 0.0]])
    return loss(GAINOutput(logits=logits), targets, seg, torch.tensor([True]), images=images).ex


def test_rrr_penalty_and_its_gradient_equal_the_hand_computation():
    model = _tiny_mlp()
    torch.testing.assert_close(model(torch.tensor([[[[1.0, 2.0]]]])).softmax(1), torch.tensor([[0.25, 0.75]]))
    only_pixel_0 = torch.tensor([[[0, 1]]], dtype=torch.uint8)  # H: pixel 1 relevant (class 0 is label 1)
    penalty = _penalty(model, only_pixel_0)
    torch.testing.assert_close(penalty, torch.tensor((1 - LN3 / 2) ** 2))
    (grad,) = torch.autograd.grad(penalty, model.fc.weight)  # double backprop: the penalty trains the weights
    torch.testing.assert_close(grad[0, 0], torch.tensor(-3 * Q**2 / 8 + Q / 2))
    both = torch.zeros(1, 1, 2, dtype=torch.uint8)
    torch.testing.assert_close(_penalty(model, both), torch.tensor((1 - LN3 / 2) ** 2 + 0.25))


def test_mlp_with_grey_input_reads_one_channel_and_builds_for_any_size():
    model = timm.create_model("mlp", num_classes=10, img_size=(12, 20), grey_input=True, init_std=0.1)
    assert model.features[0].in_features == 240 and [m.out_features for m in model.features[::2]] == [50, 30]
    assert all(p.std().item() == pytest.approx(0.1, rel=0.3) for p in model.parameters() if p.numel() > 100)
    images = torch.rand(2, 3, 12, 20, requires_grad=True)
    (grad,) = torch.autograd.grad(model(images).log_softmax(1).sum(), images)
    assert grad[:, 0].abs().sum() > 0 and grad[:, 1:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"^backbone mlp was built for 12 x 20 images but got 28 x 28; set "):
        model(torch.rand(1, 3, 28, 28))


def test_gain_on_the_mlp_gives_nan_maps_that_the_localisation_metrics_skip():
    model = timm.create_model("mlp", num_classes=2, img_size=8)
    gain = GAIN(model, normalisation="max").eval()
    out = gain(torch.rand(3, 3, 8, 8), torch.eye(2)[[0, 1, 0]])
    assert out.attention.shape == (3, 8, 8) and out.attention.isnan().all() and out.logits.isfinite().all()
    loc = LocalisationMetrics()
    loc.update(out.attention, torch.ones(3, 8, 8))
    scores = loc.compute()
    assert "loc_iou" not in scores and scores.get("loc_skipped") == 3, scores


@pytest.mark.parametrize("loss", ["gain", "gain_ext", "gradia", "haics", "energy"])
def test_the_mlp_refuses_the_losses_that_need_a_map_in_one_sentence(loss, tmp_path):
    cfg = compose(["backbone=mlp", "dataset=decoy_digits", f"dataset.root={tmp_path}", f"loss={loss}"])
    with pytest.raises(
        ValueError,
        match=r"^backbone=mlp has no spatial feature map, so it has no Grad-CAM .* use "
        r"loss=baseline or loss=rrr \(input gradients\), or a CNN backbone such as gain_cnn4\.$",
    ):
        check_config(cfg)


def test_the_mlp_refuses_deletion_insertion_and_takes_baseline_and_rrr(tmp_path):
    base = ["backbone=mlp", "dataset=decoy_digits", f"dataset.root={tmp_path}"]
    with pytest.raises(ValueError, match=r"^trainer\.eval_metrics\.deletion_insertion=test orders pixels by "):
        check_config(compose([*base, "loss=rrr"]))
    for loss in ("baseline", "rrr"):
        check_config(compose([*base, f"loss={loss}", "trainer.eval_metrics.deletion_insertion=off"]))


def test_the_recipe_is_ross_et_al_s_setting(tmp_path):
    cfg = compose(["experiment=decoy_rrr_ross", f"dataset.root={tmp_path}"])
    check_config(cfg)
    assert cfg.backbone.name == "mlp" and list(cfg.backbone.kwargs.hidden) == [50, 30]
    assert cfg.backbone.kwargs.img_size == cfg.dataset.image_size == 28 and cfg.backbone.kwargs.init_std == 0.1
    d = cfg.dataset
    assert (d.decoy, d.patch_fraction, d.masks_to_use, d.annotation) == ("grey", 0.142857, 1.0, "decoy")
    assert (cfg.loss.ex_loss, cfg.loss.ex_weight, cfg.loss.am_weight) == ("rrr", 1000.0, 0.0)
    t = cfg.trainer
    assert (t.optimizer._target_, t.optimizer.lr, t.batch_size, t.scheduler) == ("torch.optim.Adam", 1e-3, 256, None)
    assert t.epochs * t.steps_per_epoch == 64 * math.ceil(60_000 / 256)


def test_the_recipe_trains_one_tiny_epoch_and_its_annotation_is_the_swatch(tmp_path, one_thread):
    tiny = [
        "experiment=decoy_rrr_ross",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.n_train=64",
        "dataset.n_val=16",
        "dataset.n_test=16",
        "trainer.epochs=1",
        "trainer.steps_per_epoch=2",
        "trainer.batch_size=32",
        "trainer.num_panels=1",
        "trainer.device=cpu",
        "logger=json",
    ]
    summary = train(compose(tiny), out_dir=tmp_path / "run")
    final = summary["final"]
    assert summary["status"] == "completed" and final["train/mean_loss_e"] > 0
    assert 0 <= final["test_unbiased/acc"] <= 1 and "test_unbiased/loc_iou" not in final  # no map, no map metric
    data = build(
        str(tmp_path / "data"),
        28,
        64,
        16,
        16,
        decoy="grey",
        patch_fraction=0.142857,
        masks_to_use=1.0,
        annotation="decoy",
    )
    train_split = data.train
    assert torch.equal(train_split.seg == 0, train_split.spurious) and int(train_split.spurious[0].sum()) == 16
