"""Faithfulness and sanity metrics on hand-computable examples and tiny models."""

import itertools
import math

import pytest
import timm
import torch
import torchvision.transforms.functional as TF

import gain_exp.core.models  # noqa: F401  registers gain_cnn4
from gain_exp.core.faithfulness import (
    FaithfulnessMetrics,
    average_ranks,
    deletion_insertion,
    deletion_insertion_curves,
    randomisation_check,
    randomisation_groups,
    spearman,
    spurious_energy,
)
from gain_exp.core.gain import GAIN


def linear_model(weights: torch.Tensor):
    """Two classes: logit 0 is 0, logit 1 = sum(w * x); so P(class 1) = sigmoid(sum(w * x))."""

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        score = (x * weights).flatten(1).sum(dim=1)
        return torch.stack([torch.zeros_like(score), score], dim=1)

    return model_fn


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def trapezoid(ys: list[float]) -> float:
    dx = 1 / (len(ys) - 1)
    return sum((a + b) / 2 * dx for a, b in itertools.pairwise(ys))


# ---------------------------------------------------------------------------------- deletion / insertion, by hand


def test_deletion_and_insertion_curves_by_hand():
    # 1 x 2 x 2 image of ones, w = [[2, 1], [0.5, -1]], zero baseline, one pixel per step, map = w.
    w = torch.tensor([[2.0, 1.0], [0.5, -1.0]]).view(1, 1, 2, 2)
    images = torch.ones(1, 1, 2, 2)
    deletion, insertion, x = deletion_insertion_curves(
        linear_model(w), images, w[:, 0], torch.tensor([1]), steps=4, baseline="zero"
    )
    # Pixels go in the order 2, 1, 0.5, -1; the score after deleting k of them is the sum of the rest.
    del_scores = [2.5, 0.5, -0.5, -1.0, 0.0]
    ins_scores = [0.0, 2.0, 3.0, 3.5, 2.5]
    assert x.tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert deletion[0].tolist() == pytest.approx([sigmoid(s) for s in del_scores], abs=1e-6)
    assert insertion[0].tolist() == pytest.approx([sigmoid(s) for s in ins_scores], abs=1e-6)
    del_auc, ins_auc = deletion_insertion(linear_model(w), images, w[:, 0], torch.tensor([1]), steps=4, baseline="zero")
    assert del_auc.item() == pytest.approx(trapezoid([sigmoid(s) for s in del_scores]), abs=1e-6)
    assert ins_auc.item() == pytest.approx(trapezoid([sigmoid(s) for s in ins_scores]), abs=1e-6)


def test_steps_that_do_not_divide_the_pixels_round_and_report_the_true_fraction():
    # 9 pixels in 2 steps: round(4.5) = 4 pixels (round half to even would say 4 as well), x = 4/9.
    images = torch.ones(1, 1, 3, 3)
    w = torch.arange(9.0, 0, -1).view(1, 1, 3, 3) / 10
    deletion, _, x = deletion_insertion_curves(
        linear_model(w), images, w[:, 0], torch.tensor([1]), steps=2, baseline="zero"
    )
    assert x.tolist() == pytest.approx([0, 5 / 9, 1])  # (1 * 9 + 1) // 2 = 5: halves round up
    assert deletion[0, 1].item() == pytest.approx(sigmoid((4 + 3 + 2 + 1) / 10), abs=1e-6)


def test_multi_label_uses_the_sigmoid_of_the_class_logit():
    w = torch.tensor([[1.0, -2.0]]).view(1, 1, 1, 2)
    images = torch.ones(1, 1, 1, 2)
    model_fn = linear_model(w)
    single, _, _ = deletion_insertion_curves(model_fn, images, w[:, 0], torch.tensor([0]), steps=2, baseline="zero")
    multi, _, _ = deletion_insertion_curves(
        model_fn, images, w[:, 0], torch.tensor([0]), steps=2, baseline="zero", multi_label=True
    )
    # class 0's logit is always 0: sigmoid says 0.5 throughout, softmax depends on class 1's score (-1, -2, 0).
    assert multi[0].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert single[0].tolist() == pytest.approx([1 - sigmoid(-1), 1 - sigmoid(-2), 0.5], abs=1e-6)


def test_ties_are_broken_in_raster_order():
    # Only the last pixel matters; a flat map deletes it last, so the probability stays up until the end.
    w = torch.zeros(1, 1, 2, 2)
    w[..., 1, 1] = 4.0
    deletion, _, _ = deletion_insertion_curves(
        linear_model(w), torch.ones(1, 1, 2, 2), torch.ones(1, 2, 2), torch.tensor([1]), steps=4, baseline="zero"
    )
    assert deletion[0].tolist() == pytest.approx([sigmoid(4)] * 4 + [0.5], abs=1e-6)


def test_constant_probability_model_has_that_probability_as_both_aucs():
    def model_fn(x: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.tensor([[0.3, 0.7]])).expand(len(x), 2)

    images, maps = torch.rand(3, 3, 8, 8), torch.rand(3, 8, 8)
    for baseline in ("blur", "mean", "zero"):
        deletion, insertion = deletion_insertion(
            model_fn, images, maps, torch.tensor([1, 1, 0]), steps=5, baseline=baseline, batch_size=4
        )
        assert deletion.tolist() == pytest.approx([0.7, 0.7, 0.3])
        assert insertion.tolist() == pytest.approx([0.7, 0.7, 0.3])


# ------------------------------------------------------------------------------ deletion / insertion, behaviour


def toy_problem(n: int = 8, size: int = 12):
    """Positive images and positive, uneven pixel weights: every pixel's evidence w * x is positive."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.rand(1, 1, size, size, generator=gen) ** 3) * 0.5
    images = 0.5 + torch.rand(n, 1, size, size, generator=gen)
    return linear_model(w), images, (w * images)[:, 0], torch.ones(n, dtype=torch.long)


def test_a_perfect_map_beats_a_random_map_which_beats_an_inverted_one():
    model_fn, images, importance, classes = toy_problem()
    random_map = torch.rand(importance.shape, generator=torch.Generator().manual_seed(1))
    aucs = {
        name: deletion_insertion(model_fn, images, m, classes, steps=16, baseline="zero")
        for name, m in [("perfect", importance), ("random", random_map), ("inverted", -importance)]
    }
    (del_p, ins_p), (del_r, ins_r), (del_i, ins_i) = aucs["perfect"], aucs["random"], aucs["inverted"]
    assert bool((del_p < del_r).all() and (del_r < del_i).all())
    assert bool((ins_p > ins_r).all() and (ins_r > ins_i).all())
    # The perfect map's curves are the best possible: deleting the largest evidence first minimises every point.
    assert bool((del_p + 0.1 < del_i).all() and (ins_p > ins_i + 0.1).all())


def tiny_cnn(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("gain_cnn4", num_classes=num_classes, pretrained=False).eval()


def test_deletion_starts_clean_and_ends_at_the_baseline_and_insertion_the_reverse():
    model = tiny_cnn()
    images, maps = torch.randn(5, 3, 32, 32), torch.rand(5, 32, 32)
    classes = torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        clean = model(images).softmax(dim=1)[torch.arange(5), classes]
        blurred = model(TF.gaussian_blur(images, [11, 11], [5.0, 5.0])).softmax(dim=1)[torch.arange(5), classes]
        mean = model(images.mean(dim=(2, 3), keepdim=True).expand_as(images)).softmax(dim=1)[torch.arange(5), classes]
    deletion, insertion, _ = deletion_insertion_curves(model, images, maps, classes, steps=4, baseline="blur")
    assert deletion[:, 0].tolist() == pytest.approx(clean.tolist(), abs=1e-5)
    assert deletion[:, -1].tolist() == pytest.approx(blurred.tolist(), abs=1e-5)
    assert insertion[:, 0].tolist() == pytest.approx(blurred.tolist(), abs=1e-5)
    assert insertion[:, -1].tolist() == pytest.approx(clean.tolist(), abs=1e-5)
    deletion, _, _ = deletion_insertion_curves(model, images, maps, classes, steps=4, baseline="mean")
    assert deletion[:, -1].tolist() == pytest.approx(mean.tolist(), abs=1e-5)


def test_chunked_batches_give_the_same_numbers_as_one_batch():
    model = tiny_cnn()
    images, maps = torch.randn(3, 3, 16, 16), torch.rand(3, 4, 4)  # maps at a coarser scale than the images
    classes = torch.tensor([0, 1, 2])
    whole = deletion_insertion(model, images, maps, classes, steps=6, batch_size=1000)
    for batch_size in (5, 11):  # chunks that cut through one image's steps
        part = deletion_insertion(model, images, maps, classes, steps=6, batch_size=batch_size)
        torch.testing.assert_close(part[0], whole[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(part[1], whole[1], atol=1e-5, rtol=0)


def test_coarse_maps_are_resized_bilinearly_to_the_image():
    model = tiny_cnn()
    images, coarse, classes = torch.randn(2, 3, 16, 16), torch.rand(2, 4, 4), torch.tensor([0, 2])
    fine = torch.nn.functional.interpolate(coarse.unsqueeze(1), size=(16, 16), mode="bilinear").squeeze(1)
    a = deletion_insertion(model, images, coarse, classes, steps=4)
    b = deletion_insertion(model, images, fine, classes, steps=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"baseline": "noise"}, "baseline 'noise'"),
        ({"maps": torch.rand(3, 8, 8)}, "maps must be"),
        ({"classes": torch.tensor([0.0, 1.0])}, "classes must be"),
        ({"classes": torch.tensor([0, 5])}, "index 5 but the model has 3 classes"),
        ({"steps": 0}, "steps must be"),
        ({"batch_size": 0}, "batch_size must be"),
        ({"blur_kernel": 4}, "odd positive blur_kernel"),
    ],
)
def test_bad_input_is_one_sentence(kwargs, match):
    args = {
        "model_fn": tiny_cnn(),
        "images": torch.randn(2, 3, 8, 8),
        "maps": torch.rand(2, 8, 8),
        "classes": torch.tensor([0, 1]),
    } | kwargs
    with pytest.raises(ValueError, match=match):
        deletion_insertion(**args)


# ------------------------------------------------------------------------------------------------ spurious energy


def test_spurious_energy_by_hand():
    maps = torch.zeros(5, 2, 2)
    maps[0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # all inside the region -> 1
    maps[1] = torch.tensor([[0.0, 0.0], [0.0, 3.0]])  # all outside -> 0
    maps[2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # half -> 0.5
    maps[3] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # region empty -> NaN
    # maps[4] all zero -> 0
    region = torch.tensor([[True, False], [False, False]]).expand(5, 2, 2).clone()
    region[3] = False
    out = spurious_energy(maps, region)
    assert out[[0, 1, 2, 4]].tolist() == [1.0, 0.0, 0.5, 0.0]
    assert math.isnan(out[3].item())


def test_spurious_energy_leaves_invalid_pixels_out_of_both_sums():
    maps = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    region = torch.tensor([[[True, False], [False, False]]])
    valid = torch.tensor([[[True, True], [False, True]]])
    assert spurious_energy(maps, region, valid).item() == pytest.approx(0.5)
    assert math.isnan(spurious_energy(maps, region, ~region).item())  # the region's only pixel is invalid


def test_spurious_energy_refuses_negative_maps_and_mismatched_shapes():
    with pytest.raises(ValueError, match="non-negative"):
        spurious_energy(torch.tensor([[[-1.0, 1.0]]]), torch.ones(1, 1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        spurious_energy(torch.rand(2, 4, 4), torch.ones(2, 4, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------- accumulator


def test_accumulator_means_counts_and_merging():
    m = FaithfulnessMetrics()
    assert m.compute() == {"faith_n": 0.0, "spurious_n": 0.0, "spurious_skipped": 0.0}  # no NaN when empty
    m.update(torch.tensor([0.1, 0.3]), torch.tensor([0.9, 0.7]))
    other = FaithfulnessMetrics()
    other.update(torch.tensor([0.5]), torch.tensor([0.2]))
    other.update_spurious(torch.tensor([0.25, math.nan, 0.75, 1.0]))
    m.add(other)
    out = m.compute()
    assert out["faith_n"] == 3.0
    assert out["deletion_auc"] == pytest.approx(0.3)
    assert out["insertion_auc"] == pytest.approx(0.6)
    assert out["spurious_n"] == 3.0 and out["spurious_skipped"] == 1.0
    assert out["spurious_energy"] == pytest.approx(2 / 3)
    assert all(type(v) is float for v in out.values())
    m.reset()
    assert "deletion_auc" not in m.compute()


def test_accumulator_refuses_nan_or_mismatched_aucs():
    m = FaithfulnessMetrics()
    with pytest.raises(ValueError, match="two tensors of N values"):
        m.update(torch.rand(3), torch.rand(2))
    with pytest.raises(ValueError, match="NaN"):
        m.update(torch.tensor([math.nan]), torch.tensor([0.5]))


# ------------------------------------------------------------------------------------------- randomisation check


def test_average_ranks_and_spearman_by_hand():
    assert average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist() == [[3.5, 1.0, 3.5, 2.0]]
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 99.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    out = spearman(a, b)
    assert out[:2].tolist() == pytest.approx([1.0, -1.0])
    assert math.isnan(out[2].item())
    # scipy.stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]) = 0.9486832980505138 (ties: average ranks)
    assert spearman(torch.tensor([[1.0, 2.0, 2.0, 3.0]]), torch.tensor([[1.0, 3.0, 2.0, 4.0]])).item() == pytest.approx(
        0.9486832980505138, abs=1e-6
    )


def tiny_gain(name: str = "gain_cnn4") -> GAIN:
    torch.manual_seed(0)
    return GAIN(timm.create_model(name, num_classes=3, pretrained=False)).eval()


def test_default_groups_cascade_from_the_head():
    assert randomisation_groups(tiny_gain().model) == [
        "fc",
        "features.13",
        "features.12",
        "features.9",
        "features.8",
        "features.5",
        "features.4",
        "features.1",
        "features.0",
    ]
    groups = randomisation_groups(tiny_gain("test_resnet").model)
    # test_resnet's deep stem is an nn.Sequential, so its convs and norms are groups of their own.
    assert groups[0] == "fc" and groups[-1] == "conv1.0"
    assert groups.index("layer4.0") < groups.index("layer1.0") < groups.index("bn1") < groups.index("conv1.0")


def test_randomisation_check_is_pure_deterministic_and_bounded():
    gain = tiny_gain()
    images, targets = torch.randn(4, 3, 32, 32), torch.eye(3)[[0, 1, 2, 0]]
    before = {k: v.clone() for k, v in gain.state_dict().items()}
    rng = torch.get_rng_state()
    first = randomisation_check(gain, images, targets)
    assert [name for name, _ in first] == randomisation_groups(gain.model)
    assert -1 < first[0][1] <= 1
    assert all(math.isnan(s) or -1 <= s <= 1 for _, s in first)
    assert min(s for _, s in first if not math.isnan(s)) < 0.9  # the maps do depend on the weights
    assert all(torch.equal(before[k], v) for k, v in gain.state_dict().items())  # caller's model untouched
    assert torch.equal(torch.get_rng_state(), rng)  # caller's RNG untouched
    again = randomisation_check(gain, images, targets, batch_size=3)
    assert [name for name, _ in again] == [name for name, _ in first]
    assert [s for _, s in again] == pytest.approx([s for _, s in first], nan_ok=True)


def test_randomisation_check_with_order_and_other_similarities():
    gain = tiny_gain()
    images, targets = torch.randn(3, 3, 32, 32), torch.eye(3)
    out = randomisation_check(gain, images, targets, order=["fc", "features.12"], similarity="ssim")
    assert [name for name, _ in out] == ["fc", "features.12"]
    assert all(-1 <= s <= 1 for _, s in out)
    pearson = randomisation_check(gain, images, targets, order=["fc"], similarity="pearson")
    assert -1 <= pearson[0][1] <= 1
    with pytest.raises(ValueError, match="close matches"):
        randomisation_check(gain, images, order=["feature.12"])
    with pytest.raises(ValueError, match="similarity 'cosine'"):
        randomisation_check(gain, images, similarity="cosine")


def test_a_single_step_still_has_both_ends():
    w = torch.tensor([[1.0, 2.0]]).view(1, 1, 1, 2)
    deletion, insertion, x = deletion_insertion_curves(
        linear_model(w), torch.ones(1, 1, 1, 2), w[:, 0], torch.tensor([1]), steps=1, baseline="zero"
    )
    assert x.tolist() == [0.0, 1.0]
    assert deletion[0].tolist() == pytest.approx([sigmoid(3), 0.5]) and insertion[0].tolist() == pytest.approx(
        [0.5, sigmoid(3)]
    )


def test_per_label_gain_maps_wire_in_with_their_image_index():
    gain = GAIN(tiny_cnn(), formulation="per_label").eval()
    images, targets = torch.randn(2, 3, 16, 16), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    out = gain(images, targets, mining=False)
    deletion, insertion = deletion_insertion(
        lambda x: gain(x, attention=False).logits, images[out.image_index], out.attention, out.class_index, steps=2
    )
    assert deletion.shape == insertion.shape == (3,)
    assert bool(((deletion >= 0) & (deletion <= 1) & (insertion >= 0) & (insertion <= 1)).all())


def test_randomisation_check_refuses_a_bad_batch_size_and_a_bare_backbone():
    with pytest.raises(ValueError, match="batch_size"):
        randomisation_check(tiny_gain(), torch.randn(1, 3, 16, 16), batch_size=0)
    with pytest.raises(ValueError, match="needs a GAIN module"):
        randomisation_check(tiny_cnn(), torch.randn(1, 3, 16, 16))
