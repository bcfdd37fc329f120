"""Boxes as annotations (dataset.annotation=box, dataset.box_enlarge): the box -> label map rendering in
gain_exp/data/base.py by hand, and each dataset's use of it (shapes, decoy digits, VOC's XML boxes; mask_folder
refuses), with val/test still scored against the masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONF, compose
from fixtures_data import VOC_CLASSES, make_mask_folder, make_voc, voc_has_mask, voc_label_map, voc_objects, voc_split

from gain_exp.data import shapes, voc
from gain_exp.data.base import IGNORE_INDEX, box_label_maps, box_masks, boxes_from_seg
from gain_exp.data.mask_folder import build as build_mask_folder
from gain_exp.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows_cols(seg: torch.Tensor, value: int) -> tuple[list[int], list[int]]:
    ys, xs = torch.nonzero(seg == value, as_tuple=True)
    return sorted(set(ys.tolist())), sorted(set(xs.tolist()))


def test_a_box_is_the_pixels_whose_centres_it_holds():
    seg = box_masks([[2, 3, 12, 6]], [0], (16, 10))  # exclusive ends: columns 2..11, rows 3..5
    assert seg.shape == (10, 16) and seg.dtype == torch.uint8
    assert _rows_cols(seg, 1) == (list(range(3, 6)), list(range(2, 12)))
    assert int((seg == 1).sum()) == 10 * 3 and set(seg.unique().tolist()) == {0, 1}


def test_enlarge_grows_each_side_about_the_centre():
    # width 10 -> 12: x 1..13 (columns 1..12); height 4 -> 4.8: y 1.6..6.4, centres 2.5..5.5 inside (rows 2..5)
    seg = box_masks([[2, 2, 12, 6]], [0], (16, 16), enlarge=0.2)
    assert _rows_cols(seg, 1) == (list(range(2, 6)), list(range(1, 13)))


def test_an_enlarged_box_is_clipped_to_the_image():
    # width 6 -> 9: x 8.5..17.5, clipped to 16 (columns 8..15); height 4 -> 6: y -1..5, clipped to 0 (rows 0..4)
    seg = box_masks([[10, 0, 16, 4]], [2], (16, 16), enlarge=0.5)
    assert _rows_cols(seg, 3) == (list(range(0, 5)), list(range(8, 16)))
    whole = box_masks([[-5, -5, 40, 40]], [0], (8, 6))  # a box larger than the image fills it
    assert bool((whole == 1).all())


def test_where_boxes_of_different_classes_overlap_the_smaller_box_wins():
    big, small = [0, 0, 10, 10], [4, 4, 8, 8]
    for boxes, classes in (([big, small], [0, 1]), ([small, big], [1, 0])):  # whatever order they come in
        seg = box_masks(boxes, classes, (12, 12))
        assert int((seg == 2).sum()) == 16 and int((seg == 1).sum()) == 100 - 16
    same = box_masks([[0, 0, 4, 4], [2, 2, 6, 6]], [3, 3], (8, 8))  # one class: the union
    assert int((same == 4).sum()) == 16 + 16 - 4


def test_ignore_boxes_are_painted_with_the_ignore_label():
    seg = box_masks([[0, 0, 10, 10], [1, 1, 3, 3]], [0, 5], (10, 10), ignore=[False, True])
    assert int((seg == IGNORE_INDEX).sum()) == 4 and int((seg == 1).sum()) == 96


def test_bad_classes_are_refused():
    with pytest.raises(ValueError, match="one class in 0..253 per box"):
        box_masks([[0, 0, 2, 2]], [254], (4, 4))
    with pytest.raises(ValueError, match="one class in 0..253 per box"):
        box_masks([[0, 0, 2, 2], [1, 1, 3, 3]], [0], (4, 4))
    assert not box_masks(torch.zeros(0, 4), [], (4, 4)).any()  # no box: all background


def test_boxes_from_seg_gives_the_tight_box_per_class():
    seg = torch.zeros(12, 12, dtype=torch.uint8)
    seg[2:5, 3:9] = 2  # class 1
    seg[7, 1] = seg[10, 4] = 4  # class 3: two pixels
    seg[0, :] = IGNORE_INDEX  # left out
    boxes, classes = boxes_from_seg(seg)
    assert classes.tolist() == [1, 3]
    assert boxes.tolist() == [[3, 2, 9, 5], [1, 7, 5, 11]]
    rendered = box_masks(boxes, classes, (12, 12))
    assert torch.equal(rendered == 2, seg == 2)  # a rectangle is its own box
    assert int((rendered == 4).sum()) == 4 * 4
    maps = box_label_maps(torch.stack([seg, torch.zeros_like(seg)]), enlarge=0.0)
    assert torch.equal(maps[0], rendered) and not maps[1].any()


def test_every_dataset_yaml_has_annotation_mask_and_box_enlarge_0():
    for path in sorted((CONF / "dataset").glob("*.yaml")):
        cfg = compose([f"dataset={path.stem}"]).dataset
        assert cfg.annotation == "mask" and cfg.box_enlarge == 0.0, path.name


@pytest.mark.parametrize(
    "override, sentence",
    [
        ({"annotation": "polygon"}, "shapes dataset: annotation='polygon' is unknown; use mask"),
        ({"box_enlarge": -0.1}, "shapes dataset: box_enlarge=-0.1 must be a fraction >= 0"),
    ],
)
def test_bad_annotation_settings_are_one_sentence(tmp_path, override, sentence):
    with pytest.raises(ValueError) as err:
        shapes.build(root=str(tmp_path), n_train=4, n_val=2, n_test=2, **override)
    assert str(err.value).startswith(sentence) and "\n" not in str(err.value)


# ---- the datasets ----


def _shapes(tmp_path: Path, **kw):
    args = dict(root=str(tmp_path / "shapes"), num_classes=3, image_size=32, n_train=24, n_val=8, n_test=8, seed=2)
    return shapes.build(**{**args, **kw})


def test_shapes_box_trains_on_tight_boxes_and_scores_val_and_tests_on_masks(tmp_path):
    masks, boxes = _shapes(tmp_path), _shapes(tmp_path, annotation="box", box_enlarge=0.1)
    assert torch.equal(boxes.train.seg, box_label_maps(masks.train.seg, 0.1))
    assert not torch.equal(boxes.train.seg, masks.train.seg)
    assert not ((masks.train.seg > 0) & (boxes.train.seg == 0)).any()  # each box holds its shape
    assert torch.equal(boxes.train.use_mask, masks.train.use_mask)  # the same budget
    assert torch.equal(boxes.train[3]["spurious"], masks.train[3]["spurious"])  # the cue stays the background
    for name in ("val", "test_biased", "test_unbiased"):  # scored against the exact masks
        a, b = (masks.val, boxes.val) if name == "val" else (masks.tests[name], boxes.tests[name])
        assert torch.equal(a.seg, b.seg) and torch.equal(a[0]["seg"], b[0]["seg"])
    assert boxes.extras["annotation"] == {"train": "box", "scored_against": "mask"}
    assert masks.extras["annotation"] == {"train": "mask", "scored_against": "mask"}


def test_decoy_digits_box_is_the_tight_box_of_the_strokes(tmp_path):
    pytest.importorskip("sklearn")
    from gain_exp.data import decoy_digits

    args = dict(root=str(tmp_path / "dd"), image_size=32, n_train=20, n_val=6, n_test=6)
    masks, boxes = decoy_digits.build(**args), decoy_digits.build(**args, annotation="box")
    assert torch.equal(boxes.train.seg, box_label_maps(masks.train.seg))
    assert torch.equal(boxes.val.seg, masks.val.seg) and torch.equal(
        boxes.tests["test_unbiased"].seg, masks.tests["test_unbiased"].seg
    )
    assert not (boxes.train.seg.bool() & boxes.train.spurious).any()  # the stroke box stays off the corner patch
    assert boxes.extras["annotation"]["train"] == "box"


def test_mask_folder_refuses_box_in_one_sentence(tmp_path):
    root = make_mask_folder(tmp_path / "folder", n_per_class=3, size=32)
    with pytest.raises(ValueError) as err:
        build_mask_folder(root=str(root), image_size=32, annotation="box")
    message = str(err.value)
    assert message.startswith("mask_folder dataset: annotation=box needs bounding boxes, which this dataset does not")
    assert "annotation=mask" in message and "\n" not in message and message.count(". ") == 0
    assert build_mask_folder(root=str(root), image_size=32).extras["annotation"]["train"] == "mask"


N, SIZE = 16, 48


def _voc_box_map(i: int) -> torch.Tensor:
    """What annotation=box should render for fixture image i: each object's XML box (difficult ones ignored)."""
    objects = voc_objects(i, N, SIZE)
    boxes = [[x0, y0, x1 + 1, y1 + 1] for _, _, (x0, y0, x1, y1) in objects]  # inclusive 0-based -> pixel edges
    classes = [VOC_CLASSES.index(name) for name, _, _ in objects]
    return box_masks(boxes, classes, (SIZE, SIZE), ignore=[d for _, d, _ in objects])


def test_voc_box_uses_the_xml_boxes_of_every_train_image(tmp_path):
    root = make_voc(tmp_path / "voc", n=N, size=SIZE)
    masks = voc.build(root=str(root), image_size=SIZE, masks_to_use=1.0)
    boxes = voc.build(root=str(root), image_size=SIZE, masks_to_use=1.0, annotation="box", box_enlarge=0.0)
    train_ids = [i for i in range(N - 2) if voc_split(i) == "train"]
    with_masks = [i for i in train_ids if voc_has_mask(i)]
    assert masks.extras["num_masked_train"] == len(with_masks) < len(train_ids)
    assert boxes.extras["num_masked_train"] == len(train_ids)  # every train image has boxes: a larger L_e budget
    assert boxes.extras["annotation"] == {"train": "box", "scored_against": "mask"}
    train = boxes.train
    for k in range(len(train)):
        i = int(train.images[k].stem.split("_")[1])
        seg = train.read_mask(train.masks[k], train.targets[k])  # the label map before the random train transform
        assert torch.equal(seg, _voc_box_map(i)), i
        assert bool(train[k]["has_mask"]) and train[k]["seg"].shape == (SIZE, SIZE)
    assert any(IGNORE_INDEX in _voc_box_map(i).unique() for i in train_ids)  # the fixture has difficult boxes
    for k in range(len(boxes.val)):  # val keeps the SegmentationClass masks
        i = int(boxes.val.images[k].stem.split("_")[1])
        s = boxes.val[k]
        assert bool(s["has_mask"]) == voc_has_mask(i) and not s["use_mask"]
        if voc_has_mask(i):
            assert torch.equal(s["seg"], torch.from_numpy(voc_label_map(i, N, SIZE)).long())


def test_shapes_with_box_annotation_trains_one_epoch(tmp_path, tiny):
    summary = train(
        compose([*tiny, "dataset.annotation=box", "dataset.box_enlarge=0.1", "trainer.epochs=1"]),
        out_dir=tmp_path / "run",
    )
    assert summary["status"] == "completed"
    assert summary["data"]["annotation"] == {"train": "box", "scored_against": "mask"}
    assert isinstance(summary["final"]["test_unbiased/loc_iou"], float)
