"""GAIN_ext end to end through the app on the on-disk VOC and mask-folder fixtures."""

from __future__ import annotations

import pytest
import torch
from conftest import compose
from fixtures_data import make_mask_folder, make_voc

from gain_exp.config.plan import make_plan
from gain_exp.run import train
from gain_exp.train.engine import build_evaluator
from gain_exp.train.experiment import build_experiment
from gain_exp.train.runtime import Runtime

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = [
    "backbone.name=test_resnet",
    "dataset.image_size=32",
    "trainer.epochs=1",
    "trainer.batch_size=4",
    "trainer.num_panels=2",
    "logger=json",
    "loss=gain_ext",
    "loss.am_weight=1",
    "loss.am_start_epoch=0",
]


def test_gain_ext_on_voc_fixture(tmp_path):
    root = make_voc(tmp_path / "voc", n=16, size=48)
    summary = train(
        compose(
            COMMON
            + [
                "dataset=voc2012",
                f"dataset.root={root}",
                "dataset.masks_to_use=3",
                "formulation=per_label",
                "grad_mode=full",
            ]
        ),
        out_dir=tmp_path / "run",
    )
    final = summary["final"]
    assert summary["status"] == "completed" and summary["best"]["metric"] == "val/mAP"
    for key in ("val/mAP", "val/loc_iou", "val/pointing_game", "val/energy_pg", "val/am_drop"):
        assert isinstance(final[key], float), key
    assert final["val/loc_n"] > 0
    assert summary["data"]["classes_without_images"]["val"]  # the fixture's val lacks some train classes
    assert (tmp_path / "run" / "attention" / "val_epoch000.png").is_file()


def test_gain_ext_on_mask_folder_fixture(tmp_path):
    root = make_mask_folder(tmp_path / "folder", n_per_class=6, size=48)
    summary = train(
        compose(
            COMMON
            + [
                "dataset=mask_folder",
                f"dataset.root={root}",
                "dataset.negative_class=negative",
                "dataset.batch_pos_dist=0.5",
                "dataset.steps_per_epoch=3",
                "loss.am_on_all=false",
            ]
        ),
        out_dir=tmp_path / "run",
    )
    final = summary["final"]
    tests = sorted({k.split("/")[0] for k in final if "/" in k} - {"train", "val"})
    assert tests, "the test split was not evaluated"
    for split in ["val", *tests]:
        for key in ("acc", "pos_acc", "neg_acc", "auroc", "sens@fpr0.05", "loc_iou", "pointing_game"):
            assert f"{split}/{key}" in final, f"{split}/{key}"
        assert isinstance(final[f"{split}/loc_iou"], float)


def test_per_image_iou_scores_like_the_split_on_ignore_pixels(tmp_path, monkeypatch):
    # VOC masks carry 255 borders; each panel's IoU must leave them out exactly as the split's loc_iou does.
    from gain_exp.tracking import JsonTracker

    seen = {}
    original = JsonTracker.log_panels

    def keep(self, split, panels, epoch):
        seen[split] = list(panels)
        original(self, split, panels, epoch)

    monkeypatch.setattr(JsonTracker, "log_panels", keep)
    root = make_voc(tmp_path / "voc", n=16, size=48)
    cfg = compose(
        COMMON
        + [
            "dataset=voc2012",
            f"dataset.root={root}",
            "dataset.masks_to_use=3",
            "trainer.num_panels=64",
            "trainer.eval_batch_size=64",
        ]
    )
    final = train(cfg, out_dir=tmp_path / "run")["final"]
    # A panel shows each image's first map; on multi-label data the split scores one map per (image, true class).
    # (An in-process run saves no overrides, so load_experiment cannot rebuild it: the same cfg and its best weights.)
    experiment = build_experiment(make_plan(cfg), Runtime(torch.device("cpu")))
    experiment.model.load_state_dict(torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt")["model"])
    rows = build_evaluator(experiment).evaluate(experiment.data.tests["val"], "val", rows=True).rows
    maps = [m["iou"] for r in rows for m in r["maps"] if m["iou"] is not None]
    assert len(maps) == final["val/loc_n"] > len(rows) // 2
    assert sum(maps) / len(maps) == pytest.approx(final["val/loc_iou"], abs=1e-6)
    firsts = {r["index"]: r["maps"][0]["iou"] for r in rows if r["maps"] and r["maps"][0]["iou"] is not None}
    panels = {p.index: p.iou for p in seen["val"] if p.iou is not None}
    assert panels.keys() == firsts.keys() and all(panels[i] == pytest.approx(firsts[i], abs=1e-6) for i in panels)
