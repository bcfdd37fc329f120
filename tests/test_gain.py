"""GAIN engine: Grad-CAM correctness, gradient modes, formulations, evaluation purity, errors."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from gain_exp.core.backbones import create_backbone
from gain_exp.core.gain import GAIN
from gain_exp.core.losses import GAINLoss


def _model(name: str = "resnet18", k: int = 5, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=k)


def _targets(rows: list[list[int]], k: int = 5) -> torch.Tensor:
    t = torch.zeros(len(rows), k)
    for i, row in enumerate(rows):
        t[i, row] = 1.0
    return t


@pytest.mark.parametrize(
    "name,layer,size",
    [("resnet18", "layer4", 96), ("convnext_tiny", "stages.3", 128), ("efficientnet_b0", "bn2", 128)],
)
def test_attention_matches_independent_gradcam(name, layer, size):
    from torchcam.methods import GradCAM as TorchCamGradCAM

    model = _model(name).eval()
    x = torch.randn(3, 3, size, size)
    classes = [0, 3, 1]
    extractor = TorchCamGradCAM(model, target_layer=layer, input_shape=(3, size, size))
    scores = model(x)
    reference = extractor(classes, scores)[0].detach()  # B x h x w, min-max normalised by torchcam
    extractor.remove_hooks()

    assert reference.shape[-2:] == model.forward_features(x).shape[-2:]
    out = GAIN(model, normalisation="minmax").eval()(x, F.one_hot(torch.tensor(classes), 5).float())
    # same normalisation, same bilinear upsampling to image size, then compare pixel by pixel
    reference = F.interpolate(reference.unsqueeze(1), size=(size, size), mode="bilinear").squeeze(1)
    for i in range(3):
        corr = torch.corrcoef(torch.stack([out.attention[i].flatten(), reference[i].flatten()]))[0, 1]
        assert corr > 0.999, f"{name} image {i}: correlation {corr:.5f}"
    assert out.attention.shape == (3, size, size)
    assert out.attention.min() >= 0 and out.attention.max() <= 1


def _am_grads(model, mode, scale=1.0, x=None, t=None, formulation="batch"):
    """Parameter gradients of L_am alone (classification term excluded) for a fresh copy of ``model``."""
    m = copy.deepcopy(model).train()
    gain = GAIN(m, grad_mode=mode, am_grad_scale=scale, formulation=formulation)
    out = gain(x, t)
    GAINLoss(multi_label=False).attention_mining(out, t).backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in m.named_parameters()}


@pytest.fixture(scope="module")
def small():
    model = _model("resnet18", k=5)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    t = _targets([[0], [1], [2], [3]])
    return model, x, t


def _flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


def test_full_mode_adds_second_order_term(small):
    model, x, t = small
    full, feat = _am_grads(model, "full", x=x, t=t), _am_grads(model, "features", x=x, t=t)
    diff = (_flat(full) - _flat(feat)).norm() / _flat(feat).norm()
    assert diff > 1e-3, "full and features gave the same gradient: no gradient through the Grad-CAM weights"
    # the second-order path reaches the classifier head only through the Grad-CAM weights
    head_from_weights = full["fc.weight"] - feat["fc.weight"]
    assert head_from_weights.abs().sum() > 0


def test_frozen_mode_gives_am_stream_parameters_no_gradient(small):
    model, x, t = small
    frozen = _am_grads(model, "frozen", x=x, t=t)
    # fc sits after the Grad-CAM layer: with detached weights and a frozen AM stream, L_am cannot reach it
    assert frozen["fc.weight"].abs().sum() == 0
    assert frozen["conv1.weight"].abs().sum() > 0, "gradient must still reach the network through the mask"
    # same as an explicit frozen copy scoring the masked images
    m = copy.deepcopy(model).train()
    out = GAIN(m, grad_mode="features")(x, t, mining=False)
    am_copy = copy.deepcopy(m).eval().requires_grad_(False)  # after the forward: same BN running stats
    out.am_logits = am_copy(out.masked_images)
    GAINLoss(multi_label=False).attention_mining(out, t).backward()
    for n, p in m.named_parameters():
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(frozen[n], expected, msg=f"parameter {n}")
    feat = _am_grads(model, "features", x=x, t=t)
    assert feat["fc.weight"].abs().sum() > 0


def test_am_grad_scale_scales_the_input_path_only(small):
    model, x, t = small
    g0, g1, g3 = (_flat(_am_grads(model, "features", scale=s, x=x, t=t)) for s in (0.0, 1.0, 3.0))
    # gradient = AM-parameter part (scale-free) + scale * input part
    torch.testing.assert_close(g3 - g0, 3.0 * (g1 - g0), rtol=1e-3, atol=1e-6)
    assert (g1 - g0).norm() > 0
    assert _flat(_am_grads(model, "frozen", scale=0.0, x=x, t=t)).abs().sum() == 0


def test_per_label_with_one_label_equals_batch(small):
    model, x, t = small
    losses = {}
    for form in ("batch", "per_label"):
        m = copy.deepcopy(model).train()
        out = GAIN(m, formulation=form)(x, t)
        seg = torch.zeros(4, 64, 64, dtype=torch.long)
        seg[:, 16:48, 16:48] = (t.argmax(1) + 1).view(4, 1, 1)
        terms = GAINLoss(multi_label=False, ex_weight=1.0)(out, t, seg, torch.tensor([1, 0, 1, 1]).bool())
        losses[form] = (out, terms)
    (ob, tb), (op, tp) = losses["batch"], losses["per_label"]
    torch.testing.assert_close(op.attention, ob.attention)
    for name in ("total", "cl", "am", "ex"):
        torch.testing.assert_close(getattr(tp, name), getattr(tb, name))
    assert tb.ex > 0 and tb.am > 0


def test_per_label_gives_one_map_per_pair_equal_to_single_class_maps():
    model = _model("resnet18", k=5).train()
    x = torch.randn(3, 3, 64, 64)
    t = _targets([[0, 2, 4], [1], [1, 3]])
    state = copy.deepcopy(model.state_dict())
    out = GAIN(model, formulation="per_label", multi_label=True)(x, t)
    assert out.attention.shape == (6, 64, 64) and out.masked_images.shape == (6, 3, 64, 64)
    assert out.am_logits.shape == (6, 5)
    assert out.image_index.tolist() == [0, 0, 0, 1, 2, 2]
    assert out.class_index.tolist() == [0, 2, 4, 1, 1, 3]
    # each pair's map equals the batch formulation's map for that single class
    for n, (b, c) in enumerate(zip(out.image_index.tolist(), out.class_index.tolist())):
        model.load_state_dict(state)  # BN batch statistics must match: same batch, same mode
        single = torch.zeros_like(t)
        single[:, :] = t  # other images keep their labels so the batch is identical
        single[b] = F.one_hot(torch.tensor(c), 5).float()
        ref = GAIN(model, formulation="batch")(x, single, mining=False)
        torch.testing.assert_close(out.attention[n], ref.attention[b], rtol=1e-4, atol=1e-5)


def test_evaluation_leaves_model_untouched():
    model = _model("resnet18", k=5).eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = copy.deepcopy(model.state_dict())
    gain = GAIN(model, multi_label=True).eval()
    x = torch.randn(2, 3, 64, 64)
    outputs = [
        gain(x),
        gain(x, _targets([[1], [2, 3]])),
    ]
    with torch.no_grad():
        outputs.append(gain(x))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    for out in outputs:
        assert not out.attention.requires_grad and not out.am_logits.requires_grad
        assert out.attention.shape[-2:] == (64, 64)
    # predicted classes are explained when no targets are given
    pred = outputs[0].logits.argmax(1)
    assert (outputs[0].map_targets[torch.arange(2), pred] == 1).all()


def test_train_mode_under_no_grad_still_gives_attention():
    model = _model("resnet18", k=3).train()
    with torch.no_grad():
        out = GAIN(model)(torch.randn(2, 3, 64, 64), _targets([[0], [2]], k=3))
    assert out.attention.shape == (2, 64, 64) and not out.attention.requires_grad


def test_grad_layer_override_and_fill_options():
    model = _model("resnet18", k=3).train()
    x = torch.randn(2, 3, 64, 64)
    t = _targets([[0], [2]], k=3)
    out = GAIN(model, grad_layer="layer3", fill=(1.0, 0.0, 0.0))(x, t)
    assert out.attention.shape == (2, 64, 64)
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(model.pretrained_cfg["mean"])) / torch.tensor(
        model.pretrained_cfg["std"]
    )
    full_mask = out.mask.unsqueeze(1)
    expected = x - full_mask * (x - red.view(1, 3, 1, 1))
    torch.testing.assert_close(out.masked_images, expected)
    out = GAIN(model, fill="mean")(x, t)
    assert torch.isfinite(out.masked_images).all()
    out.am_logits.sum().backward()
    assert model.layer3[0].conv1.weight.grad is not None


@pytest.mark.parametrize("mode", ["full", "features", "frozen"])
def test_every_mode_trains_every_formulation(mode):
    model = _model("resnet18", k=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, t = torch.randn(2, 3, 64, 64), _targets([[0, 1], [3]], k=4)
    for form in ("batch", "per_label"):
        out = GAIN(model, grad_mode=mode, formulation=form, multi_label=True)(x, t)
        loss = GAINLoss(multi_label=True)(out, t).total
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()


def test_unknown_backbone_lists_close_matches():
    with pytest.raises(ValueError, match=r"backbone 'resnet81' is not a timm model; did you mean .*resnet18"):
        create_backbone("resnet81", num_classes=3)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights_file=.*does not exist"):
        create_backbone("resnet18", num_classes=3, weights_file=str(tmp_path / "none.pth"))


def test_local_weights_file_loads_backbone_and_new_head(tmp_path):
    src = _model("resnet18", k=1000)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    model = create_backbone("resnet18", num_classes=3, weights_file=str(path))
    torch.testing.assert_close(model.conv1.weight, src.conv1.weight)
    assert model.fc.out_features == 3


def test_unknown_grad_layer_lists_valid_layers():
    with pytest.raises(ValueError, match=r"grad_layer 'layer9' does not exist in ResNet; close matches: \[.*layer"):
        GAIN(_model("resnet18"), grad_layer="layer9")


@pytest.mark.parametrize(
    "targets",
    [torch.tensor([0, 1]), torch.ones(2, 4), torch.ones(3, 5), torch.ones(2, 5, dtype=torch.long)],
)
def test_bad_targets_are_a_clear_error(targets):
    gain = GAIN(_model("resnet18", k=5))
    with pytest.raises(ValueError, match=r"targets must be a float 2 x 5 multi-hot .* F\.one_hot"):
        gain(torch.randn(2, 3, 64, 64), targets)


@pytest.mark.parametrize(
    "kwargs,phrase",
    [
        (dict(sigma=1.5), "sigma=1.5 is outside"),
        (dict(omega=0), "omega=0 must be > 0"),
        (dict(formulation="pairs"), "formulation='pairs' is unknown"),
        (dict(grad_mode="on"), "grad_mode='on' is unknown"),
        (dict(normalisation="l2"), "normalisation='l2' is unknown"),
        (dict(fill=(2, 0, 0)), "fill=.* must be"),
        (dict(am_grad_scale=-1), "am_grad_scale=-1 must be >= 0"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        GAIN(_model("resnet18"), **kwargs)


@pytest.mark.parametrize("train", [True, False])
def test_a_grad_layer_whose_output_is_later_modified_in_place_gives_its_own_map(train):
    # test_resnet's layer2.0.bn2 output is followed by `x += shortcut` (in place), as resnet18's layer4.1.bn2
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3, pretrained=False)
    gain = GAIN(model, grad_layer="layer2.0.bn2").train(train)
    seen = []
    handle = model.layer2[0].bn2.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    images, targets = torch.randn(2, 3, 32, 32), torch.eye(3)[:2]
    features, _ = gain.extractor(images)
    handle.remove()
    assert torch.equal(features.detach(), seen[0])  # the layer's output, not the sum after it
    out = gain(images, targets)  # at evaluation this raised "a leaf Variable ... in-place operation"
    assert out.attention.shape == (2, 32, 32) and torch.isfinite(out.attention).all()


@pytest.mark.parametrize("value", [0.5, -1.0, float("nan")])
def test_targets_that_are_not_zero_or_one_are_refused(value):
    gain = GAIN(timm.create_model("test_resnet", num_classes=3, pretrained=False))
    targets = torch.eye(3)[:2]
    targets[0, 1] = value
    with pytest.raises(ValueError, match=r"targets must be 0/1 .* pass hard labels"):
        gain(torch.randn(2, 3, 32, 32), targets)
