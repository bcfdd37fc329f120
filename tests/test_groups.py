"""Groups (class x cue value) and worst-group accuracy: hand-computed metrics, empty groups, batching, the built-in
benchmarks' groups and their group-balanced validation split (dataset.val_bias)."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import compose

from gain_exp.core.metrics import GroupMetrics
from gain_exp.data import shapes
from gain_exp.run import train


def _onehot(labels: list[int], k: int = 2) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(labels), k).float()


# 6 images, 2 classes, groups a/b/c/d (class 0 on cue 0, class 0 on cue 1, class 1 on cue 0, class 1 on cue 1);
# predictions: right, right, wrong | right, wrong | (group c: none) | right; one image without a group (-1)
LABELS = [0, 0, 0, 0, 1, 1, 1]
PREDS = [0, 0, 1, 0, 0, 1, 0]
GROUPS = [0, 0, 0, 1, 1, 3, -1]
NAMES = ["a", "b", "c", "d"]


def _metrics(batches: list[slice], data=(PREDS, LABELS, GROUPS), classes=None) -> dict[str, float]:
    """GroupMetrics over (predictions, labels, group ids), one part per batch folded in with ``add``."""
    preds, labels, group_ids = data
    whole = GroupMetrics(NAMES, classes)
    logits, targets, ids = _onehot(preds) * 5, _onehot(labels), torch.tensor(group_ids)
    for sl in batches:
        part = GroupMetrics(NAMES, classes)
        part.update(logits[sl], targets[sl], ids[sl])
        whole.add(part)
    return whole.compute()


def test_group_accuracy_by_hand_with_an_empty_group_and_an_image_without_one():
    m = _metrics([slice(0, 7)])
    assert m["group_acc/a"] == pytest.approx(2 / 3) and m["group_n/a"] == 3.0
    assert m["group_acc/b"] == pytest.approx(1 / 2) and m["group_n/b"] == 2.0
    assert math.isnan(m["group_acc/c"]) and m["group_n/c"] == 0.0  # empty: NaN, never a made-up 0 or 1
    assert m["group_acc/d"] == 1.0 and m["group_n/d"] == 1.0
    assert m["worst_group_acc"] == pytest.approx(1 / 2)
    assert m["mean_group_acc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)  # the empty group is left out
    assert sum(v for k, v in m.items() if k.startswith("group_n/")) == 6  # the image without a group is not counted


def test_group_accuracy_is_the_same_however_the_split_is_batched():
    whole = _metrics([slice(0, 7)])
    assert _metrics([slice(0, 2), slice(2, 3), slice(3, 7)]) == pytest.approx(whole, nan_ok=True)
    assert _metrics([slice(i, i + 1) for i in range(7)]) == pytest.approx(whole, nan_ok=True)


def test_no_group_seen_gives_nan_summaries_and_bad_ids_are_refused():
    m = GroupMetrics(NAMES).compute()
    assert math.isnan(m["worst_group_acc"]) and math.isnan(m["mean_group_acc"])
    with pytest.raises(ValueError, match="group id 4 is not one of the 4 groups"):
        GroupMetrics(NAMES).update(_onehot([0]), _onehot([0]), torch.tensor([4]))


# cue_follow: 2 classes, groups (class, cue's class) = (0, 0), (0, 1), (1, 0), (1, 1); the cue-conflicting groups are
# 1 (class 0 on class 1's cue) and 2 (class 1 on class 0's cue). Predictions there: 1, 1, 0 and 0, 1: 3 of the 5
# name the cue's class. Group 0's wrong prediction (1) and the image without a group are not cue-conflicting.
CUE_CLASSES = [(0, 0), (0, 1), (1, 0), (1, 1)]
CUE_LABELS = [0, 0, 0, 0, 1, 1, 1, 0]
CUE_PREDS = [1, 1, 1, 0, 0, 1, 1, 1]
CUE_GROUPS = [0, 1, 1, 1, 2, 2, 3, -1]


def _cue_metrics(batches: list[slice], classes=CUE_CLASSES) -> dict[str, float]:
    return _metrics(batches, (CUE_PREDS, CUE_LABELS, CUE_GROUPS), classes)


def test_cue_follow_by_hand_is_the_share_of_cue_conflicting_images_predicted_as_the_cue_class():
    m = _cue_metrics([slice(0, 8)])
    assert m["cue_follow"] == pytest.approx(3 / 5) and m["cue_conflict_n"] == 5.0
    assert _cue_metrics([slice(i, i + 1) for i in range(8)]) == pytest.approx(m, nan_ok=True)  # batching: same
    assert m["group_acc/b"] == pytest.approx(1 / 3)  # the group metrics are unchanged by it
    none = _cue_metrics([slice(0, 8)], classes=[(0, 0), (0, -1), (1, -1), (1, 1)])  # cues that name no class
    assert math.isnan(none["cue_follow"]) and none["cue_conflict_n"] == 0.0  # no conflicting image: NaN, not 0
    assert "cue_follow" not in _metrics([slice(0, 7)])  # groups without cue classes: no cue_follow
    # 3 classes: a conflicting image predicted as the third class is wrong but does not follow the cue
    three = GroupMetrics(["0_on_1", "1_on_0"], [(0, 1), (1, 0)])
    three.update(_onehot([2, 1, 2], 3) * 5, _onehot([0, 0, 1], 3), torch.tensor([0, 0, 1]))
    m3 = three.compute()
    assert m3["cue_follow"] == pytest.approx(1 / 3) and m3["mean_group_acc"] == 0.0  # all wrong, one to the cue
    with pytest.raises(ValueError, match="classes gives 3 .class, cue class. pairs for 4 groups"):
        GroupMetrics(NAMES, CUE_CLASSES[:3])


def test_the_built_in_benchmarks_cue_value_q_stands_for_class_q(tmp_path):
    data = _shapes(tmp_path, bias=0.9)
    assert data.group_classes == [(c, q) for c in range(3) for q in range(3)]
    assert [data.groups[g] for g, (c, q) in enumerate(data.group_classes) if c == q] == [
        "circle_on_circle_tint",
        "square_on_square_tint",
        "triangle_on_triangle_tint",
    ]


def _shapes(tmp_path, **kw):
    args = dict(root=str(tmp_path / "shapes"), num_classes=3, image_size=32, n_train=30, n_val=300, n_test=20, seed=1)
    return shapes.build(**{**args, **kw})


def test_shapes_groups_are_class_by_tint_and_val_bias_balances_only_val(tmp_path):
    biased = _shapes(tmp_path, bias=0.9)
    assert biased.groups[:3] == ["circle_on_circle_tint", "circle_on_square_tint", "circle_on_triangle_tint"]
    val = biased.val
    sample = val[5]
    label, cue = int(sample["target"].argmax()), int(val.cue[5])
    assert int(sample["group"]) == label * 3 + cue
    counts = torch.bincount(val.groups, minlength=9).float()
    assert counts[[0, 4, 8]].sum() / counts.sum() > 0.8  # the biased val is mostly on the diagonal groups
    balanced = _shapes(tmp_path, bias=0.9, val_bias=1 / 3)
    share = torch.bincount(balanced.val.cue, minlength=3).float() / 300
    assert (share - 1 / 3).abs().max() < 0.08  # the tint no longer follows the class
    diagonal = torch.bincount(balanced.val.groups, minlength=9)[[0, 4, 8]].sum() / 300
    assert abs(diagonal - 1 / 3) < 0.08
    for name in ("train", "test_biased", "test_unbiased"):  # only val changes
        a = biased.train if name == "train" else biased.tests[name]
        b = balanced.train if name == "train" else balanced.tests[name]
        assert torch.equal(a.images, b.images) and torch.equal(a.cue, b.cue)
    assert torch.equal(balanced.val.images[:, :, 0, 0] == 0, biased.val.images[:, :, 0, 0] == 0)  # same layout
    assert biased.extras["val_bias"] == 0.9 and balanced.extras["val_bias"] == pytest.approx(1 / 3)


def test_val_bias_balanced_is_one_over_the_classes(tmp_path):
    data = _shapes(tmp_path, bias=0.9, val_bias="balanced")
    assert data.extras["val_bias"] == pytest.approx(1 / 3)
    assert torch.equal(data.val.cue, _shapes(tmp_path, bias=0.9, val_bias=1 / 3).val.cue)
    with pytest.raises(ValueError, match="val_bias=fair is not a probability; set it in .0, 1., balanced"):
        _shapes(tmp_path, val_bias="fair")


def test_val_bias_equal_to_bias_reads_the_same_cache_file(tmp_path):
    _shapes(tmp_path, bias=0.9)
    files = sorted((tmp_path / "shapes").glob("*.pt"))
    _shapes(tmp_path, bias=0.9, val_bias=0.9)
    assert sorted((tmp_path / "shapes").glob("*.pt")) == files  # same key: caches made before val_bias stay valid


def test_multi_label_shapes_have_no_groups(tmp_path):
    data = _shapes(tmp_path, max_objects=2)
    assert data.groups is None and "group" not in data.val[0]


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_val_bias_out_of_range_is_one_sentence(tmp_path, value):
    with pytest.raises(ValueError, match=f"val_bias={value} is not a probability"):
        _shapes(tmp_path, val_bias=value)


def test_decoy_digits_groups_are_digit_by_patch(tmp_path):
    pytest.importorskip("sklearn")
    from gain_exp.data import decoy_digits

    data = decoy_digits.build(root=str(tmp_path / "dd"), image_size=32, n_train=50, n_val=200, n_test=20, val_bias=0.1)
    assert len(data.groups) == 100 and data.groups[37] == "3_patch_7" and data.group_classes[37] == (3, 7)
    assert torch.equal(data.val.groups, data.val.labels * 10 + data.val.cue)
    assert (data.train.groups // 10 == data.train.groups % 10).all()  # bias 1.0: every train patch names its digit
    assert (data.val.labels == data.val.cue).float().mean() < 0.3  # val_bias 0.1: no longer


def test_a_worst_group_monitor_can_break_ties_on_mean_group_accuracy(tmp_path, tiny):
    cfg = compose(
        [
            *tiny,
            "dataset.val_bias=balanced",
            "trainer.monitor=val/worst_group_acc",
            "trainer.monitor_tiebreak=val/mean_group_acc",
            "trainer.epochs=2",
        ]
    )
    summary = train(cfg, out_dir=tmp_path / "run")
    best = summary["best"]
    assert best["tiebreak"]["metric"] == "val/mean_group_acc"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/worst_group_acc" in r]
    keys = [(r["val/worst_group_acc"], r["val/mean_group_acc"]) for r in val]
    assert best["epoch"] == max(range(len(keys)), key=lambda e: (keys[e], -e))  # lexicographic; earlier on a full tie
    assert best["tiebreak"]["value"] == pytest.approx(keys[best["epoch"]][1])
    assert "(ties: the max val/mean_group_acc)" in summary["selections"]["best"]["rule"]


@pytest.mark.parametrize(
    "value,phrase",
    [
        ("test_unbiased/acc", "trainer.monitor_tiebreak=test_unbiased/acc must be a validation metric"),
        ("val/mean_grup_acc", "trainer.monitor_tiebreak=val/mean_grup_acc is not a metric of this run; did you mean"),
    ],
)
def test_a_tiebreak_that_is_no_val_metric_is_one_sentence(tmp_path, tiny, value, phrase):
    cfg = compose([*tiny, "trainer.monitor_tiebreak=" + value, "trainer.epochs=1"])
    with pytest.raises(ValueError, match=re.escape(phrase)):
        train(cfg, out_dir=tmp_path / "run")


def test_a_run_reports_group_metrics_and_can_select_on_worst_group(tmp_path, tiny):
    summary = train(
        compose([*tiny, "dataset.val_bias=balanced", "trainer.monitor=val/worst_group_acc", "trainer.epochs=1"]),
        out_dir=tmp_path / "run",
    )
    final = summary["final"]
    for split in ("val", "test_biased", "test_unbiased"):
        accs = [v for k, v in final.items() if k.startswith(f"{split}/group_acc/") and v is not None]
        assert final[f"{split}/worst_group_acc"] == pytest.approx(min(accs))
        assert sum(v for k, v in final.items() if k.startswith(f"{split}/group_n/")) == 16  # n_val = n_test = 16
        names = [k.split("/")[-1] for k in final if k.startswith(f"{split}/group_n/")]
        off = sum(final[f"{split}/group_n/{g}"] for g in names if g.split("_on_")[0] != g.split("_on_")[1][:-5])
        assert final[f"{split}/cue_conflict_n"] == off  # shape x another shape's tint (<shape>_on_<shape>_tint)
        follow = final[f"{split}/cue_follow"]
        assert (0 <= follow <= 1) if off else follow is None  # NaN (None in JSON) without a conflicting image
    assert summary["best"]["metric"] == "val/worst_group_acc"
