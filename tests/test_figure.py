"""gain_exp.figure: several saved runs' attention on the same images, one PNG grid with its record, and the maps
drawn are the maps the evaluator scores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from PIL import Image, ImageChops
from torch.utils.data import default_collate

from gain_exp import cli
from gain_exp.figure import attention_grid, attention_maps, default_names, load_runs, main
from gain_exp.output.panels import denormalise, overlay, tile_scale, to_pil, upscale
from gain_exp.train.engine import build_evaluator

pytestmark = pytest.mark.usefixtures("one_thread")
SPLIT, N_TEST, SIZE = "test_unbiased", 8, 32


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two 1-epoch tiny runs made by the app in one Hydra multirun (runs/0: baseline, runs/1: gain_ext), 8 images
    per test split."""
    root = tmp_path_factory.mktemp("figure")
    args = [
        "backbone.name=test_resnet",
        "dataset.root=shapes",
        f"dataset.image_size={SIZE}",
        "dataset.n_train=16",
        "dataset.n_val=8",
        f"dataset.n_test={N_TEST}",
        "dataset.masks_to_use=0.5",
        "trainer.epochs=1",
        "trainer.batch_size=8",
        "trainer.num_panels=0",
        "trainer.device=cpu",
        "logger=json",
        "trainer.eval_metrics.deletion_insertion=off",
        "loss=baseline,gain_ext",
        "hydra.sweep.dir=runs",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "gain_exp.run", "-m", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [root / "runs" / "0", root / "runs" / "1"]


@pytest.fixture(scope="module")
def loaded(runs):
    return load_runs(runs)


def _cli(tmp_path: Path, *argv: str) -> tuple[Path, dict]:
    png = tmp_path / "fig" / "attention.png"
    assert main([*argv, "--out", str(png)]) == 0
    return png, json.loads(png.with_suffix(".json").read_text())


def _samples(experiment, indices: list[int]) -> dict:
    dataset = experiment.data.tests[SPLIT]
    return default_collate([dataset[i] for i in indices])


@pytest.mark.slow
def test_the_grid_has_the_images_then_a_row_per_run_and_a_column_per_image(runs, tmp_path, capsys):
    png, record = _cli(tmp_path, str(runs[0]), str(runs[1]), "--split", SPLIT, "--indices", "5,0,7")
    image = Image.open(png)
    tile = SIZE * tile_scale((SIZE, SIZE))
    boxes = [[c["box"] for c in record["images"]], *([c["box"] for c in r["cells"]] for r in record["runs"])]
    assert len(boxes) == 1 + 2 and all(len(row) == 3 for row in boxes)  # rows = 1 + runs, columns = images
    assert all(r - left == tile and b - t == tile for row in boxes for left, t, r, b in row)
    assert len({box[1] for row in boxes for box in row}) == 3 and len({box[0] for row in boxes for box in row}) == 3
    assert list(image.size) == record["size"] and image.size[0] == boxes[0][-1][2] and image.size[1] > boxes[-1][0][3]
    assert record["split"] == SPLIT and record["indices"] == [5, 0, 7] and record["explains"] == "true"
    assert [c["index"] for c in record["images"]] == [5, 0, 7] and all(c["true"] for c in record["images"])
    assert [r["name"] for r in record["runs"]] == ["baseline", "gain_ext"]
    assert [r["run_dir"] for r in record["runs"]] == [str(r.resolve()) for r in runs]
    for run in record["runs"]:
        assert run["checkpoint"]["name"] == "best" and Path(run["checkpoint"]["path"]).is_file()
        assert [c["index"] for c in run["cells"]] == [5, 0, 7] and all(c["has_map"] for c in run["cells"])
        assert all(len(c["pred"]) == 1 and 0.0 < c["prob"] <= 1.0 for c in run["cells"])
    assert record["png"] == str(png.resolve()) and "--indices 5,0,7" in record["command"]
    assert f"{SPLIT}: 3 image(s) x 2 run(s) (baseline, gain_ext)" in capsys.readouterr().out


@pytest.mark.slow
def test_the_maps_are_the_ones_the_evaluator_scores(loaded):
    for run in loaded:
        batch = _samples(run.experiment, [1, 4, 6])
        maps = attention_maps(run.experiment, batch)
        panels = build_evaluator(run.experiment).batch_panels(batch, 3)  # Evaluator._batch: what evaluate() scores
        assert all(torch.equal(m, p.attention) for m, p in zip(maps.attention, panels))
        truth = batch["target"].argmax(1).tolist()
        assert maps.explained == [[c] for c in truth] and not run.experiment.gain.training
        evaluation = build_evaluator(run.experiment).evaluate(run.experiment.data.tests[SPLIT], SPLIT, panels=N_TEST)
        whole = attention_maps(run.experiment, _samples(run.experiment, list(range(N_TEST))))
        assert all(torch.allclose(m, p.attention, atol=1e-5) for m, p in zip(whole.attention, evaluation.panels))
        predicted = attention_maps(run.experiment, batch, "predicted")
        assert predicted.explained == [[c] for c in maps.logits.argmax(1).tolist()]


@pytest.mark.slow
def test_the_cells_draw_each_image_and_its_map_overlaid(loaded):
    figure, record = attention_grid(loaded, SPLIT, [2, 3])
    first = loaded[0].experiment
    batch = _samples(first, [2, 3])
    scale = tile_scale((SIZE, SIZE))
    images = [denormalise(x, first.mean, first.std) for x in batch["image"]]
    for image, cell in zip(images, record["images"]):
        assert not ImageChops.difference(figure.crop(tuple(cell["box"])), to_pil(upscale(image, scale))).getbbox()
    for run, row in zip(loaded, record["runs"]):
        maps = attention_maps(run.experiment, batch).attention
        for image, att, cell in zip(images, maps, row["cells"]):
            drawn = to_pil(upscale(overlay(image, att), scale))
            assert not ImageChops.difference(figure.crop(tuple(cell["box"])), drawn).getbbox()


@pytest.mark.slow
def test_the_same_run_twice_with_names(runs, tmp_path):
    png, record = _cli(tmp_path, str(runs[0]), str(runs[0]), "--names", "a,b", "--images", "2", "--first", "6")
    assert [r["name"] for r in record["runs"]] == ["a", "b"] and record["indices"] == [6, 7]
    a, b = ([{k: v for k, v in c.items() if k != "box"} for c in r["cells"]] for r in record["runs"])
    assert a == b
    assert default_names([runs[0], runs[0]]) == ["baseline (1)", "baseline (2)"]
    assert default_names(runs) == ["baseline", "gain_ext"]


@pytest.mark.parametrize(
    "override,phrase",
    [
        (
            "dataset.n_test=4",
            "do not share the test_unbiased images (8 vs 4; their configs differ in dataset.n_test (8 vs 4))",
        ),
        (
            "seed=1",
            "do not show the same images (image 0 of test_unbiased differs; their configs differ in seed (0 vs 1)",
        ),
    ],
)
@pytest.mark.slow
def test_runs_on_other_images_are_refused_naming_both(runs, loaded, override, phrase):
    other = load_runs([runs[1]], overrides=[override])
    with pytest.raises(ValueError) as err:
        attention_grid([loaded[0], *other], SPLIT, [0])
    assert phrase in str(err.value) and f"runs {runs[0]} and {runs[1]}" in str(err.value)


@pytest.mark.parametrize(
    "argv,phrase",
    [
        ([], "no run directory given"),
        (["{nowhere}"], "is not a directory; give a run directory"),
        (["{empty}"], "holds neither summary.json nor .hydra/hydra.yaml"),
        (["{run}", "--split", "test_unbiasd"], "no split 'test_unbiasd' (did you mean test_unbiased"),
        (["{run}", "--images", "0"], "--images 0: give at least 1 image"),
        (["{run}", "--images", "9"], "--images 9: test_biased has only 8 images; give at most 8"),
        (["{run}", "--images", "2", "--first", "7"], "--first 7: 2 images from there run past the end"),
        (
            ["{run}", "--split", SPLIT, "--indices", "3,8"],
            "--indices: 8 is out of range; test_unbiased has images 0..7",
        ),
        (["{run}", "--indices", "3,x"], "--indices 3,x: give image indices as integers"),
        (["{run}", "{run}", "--names", "a"], "--names gives 1 name(s) for 2 run(s)"),
    ],
)
@pytest.mark.slow
def test_mistakes_are_one_line_and_exit_2(runs, tmp_path, capsys, argv, phrase):
    (tmp_path / "empty").mkdir()
    where = {"run": str(runs[0]), "nowhere": str(tmp_path / "nowhere"), "empty": str(tmp_path / "empty")}
    out = tmp_path / "x.png"
    assert main([a.format(**where) for a in argv] + ["--out", str(out)]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and len(printed.err.splitlines()) == 1 and printed.err.startswith("error: ")
    assert phrase in printed.err and not out.exists()


@pytest.mark.slow
def test_the_gain_exp_command_runs_it(runs, tmp_path):
    out = tmp_path / "one.png"
    with pytest.raises(SystemExit) as stop:
        cli.main(["figure", str(runs[1]), "--images", "1", "--class", "predicted", "--no-pred", "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    assert stop.value.code == 0 and Image.open(out).size == tuple(record["size"])
    assert record["split"] == "test_biased" and record["explains"] == "predicted"  # the first test split by default
