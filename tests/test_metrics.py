"""Metrics on tiny hand-computable examples."""

import math
import warnings

import pytest
import torch

from gain_exp.core.metrics import ClassificationMetrics, LocalisationMetrics, am_score_drop

CLASSES = ["cat", "dog/wolf", "big bird"]  # '/' and ' ' must survive into the keys


def one_hot(labels: list[int], k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(labels), k).float()


def manual_ap(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """AP as the mean precision at the rank of each positive (no ties in the scores)."""
    order = scores.argsort(descending=True)
    hits = targets[order]
    precision_at = hits.cumsum(0) / torch.arange(1, len(hits) + 1)
    return (precision_at * hits).sum().item() / hits.sum().item()


# ---------------------------------------------------------------- single-label


def test_single_label_perfect_predictions_score_one():
    m = ClassificationMetrics(CLASSES, multi_label=False, top_k=(1, 2))
    labels = [0, 1, 2, 1]
    m.update(one_hot(labels, 3) * 5, one_hot(labels, 3))
    out = m.compute()
    assert set(out) == {"acc", "acc_macro", "acc/cat", "acc/dog/wolf", "acc/big bird", "top1_acc", "top2_acc"}
    assert all(v == pytest.approx(1.0) for v in out.values())
    assert all(type(v) is float for v in out.values())


def test_single_label_known_confusion():
    m = ClassificationMetrics(CLASSES, multi_label=False, top_k=(1, 2, 3))
    logits = torch.tensor(
        [
            [3.0, 2.0, 1.0],  # cat -> cat
            [1.0, 3.0, 2.0],  # cat -> dog, cat is 3rd
            [1.0, 3.0, 2.0],  # dog -> dog
            [3.0, 1.0, 2.0],  # bird -> cat, bird is 2nd
        ]
    )
    labels = [0, 0, 1, 2]
    # Two batches: accumulation must match one big batch.
    m.update(logits[:2], one_hot(labels[:2], 3))
    m.update(logits[2:], one_hot(labels[2:], 3))
    out = m.compute()
    assert out["acc"] == pytest.approx(0.5)
    assert out["acc/cat"] == pytest.approx(0.5)
    assert out["acc/dog/wolf"] == pytest.approx(1.0)
    assert out["acc/big bird"] == pytest.approx(0.0)
    assert out["acc_macro"] == pytest.approx(0.5)
    assert out["top2_acc"] == pytest.approx(0.75)
    assert "top3_acc" not in out  # k == K is always 1
    assert "auroc" not in out


def test_single_label_class_without_samples_is_nan_and_left_out_of_macro():
    m = ClassificationMetrics(CLASSES, multi_label=False)
    # "big bird" is predicted once but never the truth: its recall is undefined, not 0.
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
    m.update(logits, one_hot([0, 0, 1], 3))
    out = m.compute()
    assert math.isnan(out["acc/big bird"])
    assert out["acc_macro"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["acc"] == pytest.approx(2 / 3)


def test_reset_and_empty_compute():
    m = ClassificationMetrics(CLASSES, multi_label=False)
    assert m.compute() == {}
    m.update(one_hot([0], 3), one_hot([1], 3))
    m.reset()
    m.update(one_hot([2], 3), one_hot([2], 3))
    assert m.compute()["acc"] == pytest.approx(1.0)


def test_update_rejects_wrong_shapes():
    m = ClassificationMetrics(CLASSES, multi_label=False)
    with pytest.raises(ValueError, match="B x 3"):
        m.update(torch.zeros(2, 4), torch.zeros(2, 4))


def test_negative_class_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="negative_class"):
        ClassificationMetrics(["a", "b"], multi_label=False, negative_class=2)


# ---------------------------------------------------------------- binary


def binary_batch(neg_probs: list[float], pos_probs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [0, logit(p)] give softmax prob p for class 1 (the positive)."""
    p = torch.tensor(neg_probs + pos_probs)
    logits = torch.stack([torch.zeros_like(p), torch.logit(p)], dim=1)
    return logits, one_hot([0] * len(neg_probs) + [1] * len(pos_probs), 2)


def test_binary_metrics_known_numbers():
    m = ClassificationMetrics(["normal", "tumour"], multi_label=False, negative_class=0, fpr_levels=(0.01, 0.5))
    m.update(*binary_batch([0.1, 0.4, 0.7], [0.6, 0.9]))
    out = m.compute()
    assert out["acc"] == pytest.approx(4 / 5)
    assert out["pos_acc"] == pytest.approx(1.0)
    assert out["neg_acc"] == pytest.approx(2 / 3)
    # Positive-negative pairs ranked correctly: 0.6 beats 2 of 3, 0.9 beats 3 of 3.
    assert out["auroc"] == pytest.approx(5 / 6)
    # FPR <= 1%: threshold above 0.7, only 0.9 passes. FPR <= 50%: one false positive allowed (0.7).
    assert out["sens@fpr0.01"] == pytest.approx(0.5)
    assert out["sens@fpr0.5"] == pytest.approx(1.0)


def test_binary_negative_class_may_be_index_one():
    m = ClassificationMetrics(["tumour", "normal"], multi_label=False, negative_class=1, fpr_levels=(0.1,))
    # binary_batch's first group has label 0, which is "tumour" here: the positives; one of them is missed.
    logits, targets = binary_batch([0.1, 0.6], [0.8, 0.9])
    m.update(logits, targets)
    out = m.compute()
    assert out["pos_acc"] == pytest.approx(0.5) and out["neg_acc"] == pytest.approx(1.0)
    assert out["auroc"] == pytest.approx(1.0)  # tumour probabilities 0.9, 0.4 vs 0.2, 0.1


def test_binary_with_one_class_only_gives_nan_not_zero():
    m = ClassificationMetrics(["normal", "tumour"], multi_label=False, negative_class=0)
    m.update(*binary_batch([0.1, 0.2], []))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = m.compute()
    assert math.isnan(out["auroc"]) and math.isnan(out["sens@fpr0.05"]) and math.isnan(out["pos_acc"])
    assert out["neg_acc"] == pytest.approx(1.0)
    assert {"sens@fpr0.01", "sens@fpr0.05", "sens@fpr0.1"} <= set(out)


# ---------------------------------------------------------------- multi-label


def test_multi_label_known_numbers():
    probs = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.6, 0.05], [0.3, 0.7, 0.4], [0.1, 0.15, 0.2]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float)
    m = ClassificationMetrics(CLASSES, multi_label=True, top_k=(1, 2))
    m.update(torch.logit(probs), targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = m.compute()
    assert out["AP/cat"] == pytest.approx(5 / 6)  # positives at ranks 1 and 3: (1 + 2/3) / 2
    assert out["AP/dog/wolf"] == pytest.approx(0.5)
    assert math.isnan(out["AP/big bird"])  # no positives: undefined, left out of mAP
    assert out["mAP"] == pytest.approx((5 / 6 + 0.5) / 2)
    # Image 3 has no label and is left out; top-1 hits image 0, top-2 also image 1.
    assert out["top1_acc"] == pytest.approx(1 / 3)
    assert out["top2_acc"] == pytest.approx(2 / 3)
    # cat: tp 1, fp 1, fn 1 -> 1/2; dog: tp 1, fp 1 -> 2/3.
    assert out["f1_macro"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_multi_label_map_matches_manual_ap():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=gen)
    targets = (torch.rand(12, 4, generator=gen) < 0.4).float()
    targets[0] = 1.0  # every class has a positive
    m = ClassificationMetrics(["a", "b", "c", "d"], multi_label=True)
    m.update(logits, targets)
    out = m.compute()
    manual = [manual_ap(logits[:, c], targets[:, c]) for c in range(4)]
    for c, name in enumerate("abcd"):
        assert out[f"AP/{name}"] == pytest.approx(manual[c], abs=1e-6)
    assert out["mAP"] == pytest.approx(sum(manual) / 4, abs=1e-6)
    assert "top3_acc" in out


def test_multi_label_perfect_predictions():
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.float)
    m = ClassificationMetrics(CLASSES, multi_label=True)
    m.update(targets * 10 - 5, targets)
    out = m.compute()
    assert out["mAP"] == pytest.approx(1.0)
    assert out["f1_macro"] == pytest.approx(1.0)
    assert out["top1_acc"] == pytest.approx(1.0)


# ---------------------------------------------------------------- localisation


def squares() -> tuple[torch.Tensor, torch.Tensor]:
    """10x10 map: 4x4 square at (0,0) with its peak at the corner; gt 4x4 square at (2,2); overlap 2x2."""
    att = torch.zeros(1, 10, 10)
    att[0, 0:4, 0:4] = 0.8
    att[0, 0, 0] = 1.0
    gt = torch.zeros(1, 10, 10)
    gt[0, 2:6, 2:6] = 1.0
    return att, gt


def test_iou_and_energy_of_two_squares():
    att, gt = squares()
    m = LocalisationMetrics()
    m.update(att, gt)
    out = m.compute()
    assert out["loc_iou"] == pytest.approx(4 / 28)
    assert out["energy_pg"] == pytest.approx(4 * 0.8 / (1.0 + 15 * 0.8))
    assert out["loc_n"] == 1.0 and out["loc_skipped"] == 0.0


def test_pointing_game_tolerance():
    att, gt = squares()  # peak (0,0); nearest gt pixel (2,2) is sqrt(8) ~ 2.83 px away
    results = {}
    for tol in (0, 2, 3):
        m = LocalisationMetrics(tolerance=tol)
        m.update(att, gt.bool())
        results[tol] = m.compute()["pointing_game"]
    assert results == {0: 0.0, 2: 0.0, 3: 1.0}


def test_pointing_game_hit_inside_and_flat_map_misses():
    gt = torch.zeros(2, 8, 8)
    gt[:, 4:, 4:] = 1
    att = torch.zeros(2, 8, 8)
    att[0, 6, 6] = 1.0  # peak inside the object
    m = LocalisationMetrics(tolerance=0)
    m.update(att, gt)  # map 1 is all zeros: its argmax (0,0) is a tie, not a pointing
    out = m.compute()
    assert out["pointing_game"] == pytest.approx(0.5)
    assert out["energy_pg"] == pytest.approx(0.5)  # 1.0 and 0 (no energy at all)


def test_ignore_pixels_are_excluded():
    att, gt = squares()
    valid = torch.ones(1, 10, 10, dtype=torch.bool)
    valid[0, 0:2, :] = False  # drop the top two rows, incl. the peak
    m = LocalisationMetrics(tolerance=0)
    m.update(att, gt, valid)
    out = m.compute()
    # Prediction keeps rows 2-3 of the square (8 px), overlap 4, union 8 + 16 - 4.
    assert out["loc_iou"] == pytest.approx(4 / 20)
    assert out["energy_pg"] == pytest.approx(4 / 8)
    # The new peak is the first valid 0.8 pixel, (2,0): outside the object.
    assert out["pointing_game"] == 0.0

    # An ignored peak far from the object must not decide the pointing game.
    att2 = torch.zeros(1, 10, 10)
    att2[0, 9, 9] = 1.0
    att2[0, 3, 3] = 0.5
    valid2 = torch.ones(1, 10, 10, dtype=torch.bool)
    valid2[0, 9, 9] = False
    m = LocalisationMetrics(tolerance=0)
    m.update(att2, gt, valid2)
    assert m.compute()["pointing_game"] == 1.0


def test_empty_and_ignored_gt_are_skipped():
    att, gt = squares()
    empty = torch.zeros_like(gt)
    only_ignored = gt.clone()
    valid = torch.ones(3, 10, 10, dtype=torch.bool)
    valid[2] = gt[0] == 0  # the object lies entirely on ignore pixels
    m = LocalisationMetrics()
    m.update(att.repeat(3, 1, 1), torch.cat([gt, empty, only_ignored]), valid)
    out = m.compute()
    assert out["loc_n"] == 1.0 and out["loc_skipped"] == 2.0
    assert out["loc_iou"] == pytest.approx(4 / 28)

    m = LocalisationMetrics()
    m.update(att, empty)
    assert m.compute() == {"loc_n": 0.0, "loc_skipped": 1.0}


def test_localisation_accumulates_and_resets():
    att, gt = squares()
    m = LocalisationMetrics()
    m.update(att, gt)
    m.update(gt, gt)  # perfect map
    out = m.compute()
    assert out["loc_iou"] == pytest.approx((4 / 28 + 1) / 2)
    assert out["loc_n"] == 2.0
    m.reset()
    assert m.compute()["loc_n"] == 0.0


def test_localisation_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        LocalisationMetrics().update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5))


# ---------------------------------------------------------------- AM score drop


def test_am_score_drop_single_and_multi_label():
    # softmax([ln 3, 0]) = [0.75, 0.25]; softmax([0, 0]) = [0.5, 0.5]
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    am_logits = torch.zeros(2, 2)
    drop = am_score_drop(logits, am_logits, one_hot([0, 1], 2), multi_label=False)
    assert drop.tolist() == pytest.approx([0.25, 0.0])

    # sigmoid(0) = 0.5 drops to ~0 for class 0 and stays for class 1: mean 0.25. Row 2 has no class.
    logits = torch.zeros(2, 2)
    am_logits = torch.tensor([[-50.0, 0.0], [0.0, 0.0]])
    drop = am_score_drop(logits, am_logits, torch.tensor([[1.0, 1.0], [0.0, 0.0]]), multi_label=True)
    assert drop[0].item() == pytest.approx(0.25)
    assert math.isnan(drop[1].item())
