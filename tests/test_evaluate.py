"""gain_exp.evaluate: a saved run scored again from its checkpoint, with the run's own numbers as the oracle."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, tiny_overrides

from gain_exp import cli
from gain_exp.evaluate import main

TESTS = ("test_biased", "test_unbiased")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A 2-epoch tiny run made by the app whose best checkpoint is epoch 0 and last is epoch 1: the monitor
    val/loc_skipped is 0 at every epoch and only a strictly better value replaces the best."""
    root = tmp_path_factory.mktemp("runs")
    args = [o for o in tiny_overrides(Path("unused")) if not o.startswith("dataset.root=")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gain_exp.run",
            *args,
            "dataset.root=shapes",
            "trainer.device=cpu",
            "trainer.monitor=val/loc_skipped",
            "trainer.monitor_mode=min",
            "hydra.run.dir=run",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@pytest.fixture(scope="module")
def default_eval(finished) -> Path:
    """``python -m gain_exp.evaluate RUN_DIR --split <tests> --split val --panels 2``: the run's tested weights."""
    assert main([str(finished), "--split", ",".join(TESTS), "--split", "val", "--panels", "2"]) == 0
    return finished / "eval"


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _val_history(run: Path) -> dict[int, dict]:
    """{epoch: val metrics} as the run logged them during training (metrics.jsonl)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["epoch"]: {k: v for k, v in r.items() if k.startswith("val/")} for r in rows if "val/acc" in r}


@pytest.mark.slow
def test_the_same_checkpoint_gives_exactly_the_runs_test_metrics(finished, default_eval):
    summary = _summary(finished)
    assert summary["tested_on"]["checkpoint"] == "best" and summary["tested_on"]["epoch"] == 0
    assert summary["tested_on"]["rule"] == f"best: the epoch with the min {summary['best']['metric']}"  # mode min
    for split in TESTS:
        record = json.loads((default_eval / f"{split}.json").read_text())
        run_metrics = {k: v for k, v in summary["final"].items() if k.startswith(f"{split}/")}
        assert len(run_metrics) > 10 and record["metrics"] == run_metrics  # every metric, bit for bit
        assert record["checkpoint"]["name"] == "best" and record["checkpoint"]["epoch"] == 0
        assert record["checkpoint"]["path"] == str((finished / "checkpoints" / "best.ckpt").resolve())


@pytest.mark.slow
def test_val_of_best_and_last_equal_the_val_the_run_logged_at_those_epochs(finished, default_eval, capsys):
    history = _val_history(finished)
    best = json.loads((default_eval / "val.json").read_text())
    assert best["metrics"] == history[0]
    out = finished.parent / "last_eval"
    assert main([str(finished), "--split", "val", "--checkpoint", "last", "--out", str(out)]) == 0
    last = json.loads((out / "val.json").read_text())
    assert last["metrics"] == history[1] and last["checkpoint"]["name"] == "last" and last["checkpoint"]["epoch"] == 1
    assert last["metrics"]["val/loss_cl"] != best["metrics"]["val/loss_cl"]  # the two are different weights
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"last checkpoint (epoch 1) of {finished}" and printed[-1] == f"results in {out}"
    assert [line.split() for line in printed if line.startswith("loss_cl ")] == [
        ["loss_cl", f"{history[1]['val/loss_cl']:.4f}"]
    ]


@pytest.mark.slow
def test_a_weights_only_checkpoint_is_enough_to_evaluate(finished, default_eval, tmp_path, capsys):
    """Scoring reads only the model's weights: a file without the optimiser and counters (e.g. exported for a paper)
    gives the same metrics; before, it was refused as 'not a gain-exp training checkpoint (no epoch, optimizer,
    step)' in trainer.resume's words."""
    import torch

    state = torch.load(finished / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    weights = tmp_path / "weights.ckpt"
    torch.save({"model": state["model"]}, weights)
    assert main([str(finished), "--split", "val", "--checkpoint", str(weights), "--out", str(tmp_path / "o")]) == 0
    record = json.loads((tmp_path / "o" / "val.json").read_text())
    assert record["metrics"] == json.loads((default_eval / "val.json").read_text())["metrics"]
    assert record["checkpoint"]["epoch"] is None and record["checkpoint"]["step"] is None
    assert capsys.readouterr().out.splitlines()[0] == f"weights checkpoint of {finished}"


@pytest.mark.slow
def test_a_file_without_weights_is_refused_in_the_options_own_words(finished, tmp_path, capsys):
    import torch

    torch.save({"epoch": 1}, tmp_path / "counters.ckpt")
    assert main([str(finished), "--checkpoint", str(tmp_path / "counters.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: --checkpoint: {tmp_path / 'counters.ckpt'} is not a gain-exp checkpoint (no model); use "
        f"best, last or another .ckpt file the run wrote.\n"
    )


@pytest.mark.slow
def test_files_are_well_formed_and_every_image_has_one_row(default_eval):
    for split in (*TESTS, "val"):
        record = json.loads((default_eval / f"{split}.json").read_text())
        assert record["images"] == 16 and record["overrides"] == [] and record["device"] == "cpu"
        assert record["images_file"] == f"{split}_images.jsonl" and record["time"].endswith("+00:00")
        rows = [json.loads(line) for line in (default_eval / f"{split}_images.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows] == list(range(16))
        m = record["metrics"]
        # the split's numbers again from its rows: accuracy, maps scored, IoU and AM drop means
        assert sum(r["pred"] == r["true"] for r in rows) / 16 == pytest.approx(m[f"{split}/acc"], abs=1e-7)
        ious = [mp["iou"] for r in rows for mp in r["maps"] if mp["iou"] is not None]
        assert len(ious) == m[f"{split}/loc_n"] > 0
        assert sum(ious) / len(ious) == pytest.approx(m[f"{split}/loc_iou"], rel=1e-6, abs=1e-9)
        hits = [mp["pointing"] for r in rows for mp in r["maps"] if mp["pointing"] is not None]
        assert sum(hits) / len(hits) == pytest.approx(m[f"{split}/pointing_game"], abs=1e-9)
        drops = [r["am_drop"] for r in rows]
        assert sum(drops) / len(drops) == pytest.approx(m[f"{split}/am_drop"], rel=1e-5)
        assert all(r["score"] == max(r["probs"]) and math.isclose(sum(r["probs"]), 1.0, rel_tol=1e-5) for r in rows)
    assert sorted(p.name for p in (default_eval / "attention").iterdir()) == [
        f"{s}.png" for s in sorted((*TESTS, "val"))
    ]


@pytest.mark.slow
def test_an_override_evaluates_other_data(finished, tmp_path):
    assert main([str(finished), "dataset.n_test=8", "--split", "test_unbiased", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "test_unbiased.json").read_text())
    assert record["images"] == 8 and record["dataset"]["n_test"] == 8 and record["overrides"] == ["dataset.n_test=8"]
    assert len((tmp_path / "test_unbiased_images.jsonl").read_text().splitlines()) == 8
    assert record["metrics"]["test_unbiased/loc_n"] == 8


@pytest.mark.slow
def test_sanity_writes_the_randomisation_curve_top_layer_first(finished, tmp_path, capsys):
    assert main([str(finished), "--split", "val", "--out", str(tmp_path), "--sanity", "4", "--no-wandb"]) == 0
    record = json.loads((tmp_path / "sanity.json").read_text())
    groups = [c["reinitialised"] for c in record["curve"]]
    assert (record["split"], record["images"], groups[0], groups[-1]) == (
        "val",
        4,
        "fc",
        "conv1.0",
    )  # test_resnet: its stem is a Sequential
    assert all(c["spearman"] is None or -1 <= c["spearman"] <= 1 for c in record["curve"])
    assert "randomisation check (Spearman similarity" in capsys.readouterr().out


@pytest.mark.slow
def test_the_gain_exp_command_runs_it(finished, tmp_path):
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", str(finished), "--split", "val", "--out", str(tmp_path)])
    assert stop.value.code == 0 and (tmp_path / "val.json").is_file()


@pytest.mark.slow
def test_a_run_with_a_wandb_run_gets_the_metrics_in_that_run(finished, tmp_path):
    from wandb_offline import offline_runs

    run = tmp_path / "run"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("eval", "*.ckpt"))
    shutil.copy(finished / "checkpoints" / "best.ckpt", run / "checkpoints" / "best.ckpt")
    summary = _summary(run)
    summary["tracking"]["wandb"] = {"run_id": "evaltest1", "step": 12, "epoch": 1}  # as a W&B run's summary holds
    (run / "summary.json").write_text(json.dumps(summary))
    assert main([str(run), "--split", "val"]) == 0
    [logged] = offline_runs(run / "wandb")
    assert logged.run_id == "evaltest1"
    [row] = [r for r in logged.history if "eval/val/acc" in r]
    assert (
        row["_step"] == 13
        and row["eval/val/loss_cl"] == json.loads((run / "eval" / "val.json").read_text())["metrics"]["val/loss_cl"]
    )


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["{tmp}"], "holds neither summary.json nor .hydra/hydra.yaml; pass a run directory"),
        (["{tmp}/nowhere"], "is not a directory; give a run directory"),
        (["{run}", "--split", "tset"], "has no split 'tset'; choose from test_biased, test_unbiased, val, train."),
        (
            ["{run}", "--split", "test_biassed"],
            "has no split 'test_biassed' (did you mean test_biased or test_unbiased?)",
        ),
        (["{run}", "trainer.nope=1"], "trainer.nope=1: trainer has no key 'nope'"),
        (["{run}", "dataset.n_test=many"], "dataset.n_test=many: 'many' is not an integer"),
        (["{run}", "n_test"], "n_test: not an override; give overrides as key=value"),
        (["{run}", "--checkpoint", "{tmp}/x.ckpt"], "no checkpoint there; use best, last or a .ckpt file."),
        (
            ["{run}", "--checkpoint", "{bare}/broken.ckpt"],
            "broken.ckpt is unreadable (RuntimeError: PytorchStreamReader",
        ),
        (["{bare}"], "has no checkpoints/best.ckpt"),
        (
            ["{run}", "dataset.num_classes=3"],
            "the checkpoint does not fit the model this config builds (size mismatch for fc.weight",
        ),
        (["{run}", "--panels", "-1"], "--panels -1: give a number of attention panels >= 0"),
        (["{run}", "--sanity", "-2"], "--sanity -2: give a number of images >= 0"),
    ],
)
@pytest.mark.slow
def test_mistakes_are_one_sentence_and_exit_2(finished, tmp_path, capsys, args, phrase):
    bare = tmp_path / "bare"  # a run's records without its checkpoints
    bare.mkdir()
    shutil.copy(finished / "summary.json", bare)
    shutil.copytree(finished / ".hydra", bare / ".hydra")
    (bare / "broken.ckpt").write_bytes(b"PK\x03\x04 half a zip")
    argv = [a.format(tmp=tmp_path, run=finished, bare=bare) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and phrase in err and err.count("\n") == 1 and "trainer.resume" not in err


def test_per_label_rows_hold_one_map_per_true_class_and_add_up_to_the_split(tmp_path):
    """Evaluator rows on multi-label shapes under formulation=per_label (several maps per image)."""
    import timm
    import torch

    from gain_exp.core.gain import GAIN
    from gain_exp.core.losses import GAINLoss
    from gain_exp.data.shapes import build
    from gain_exp.train.evaluation import Evaluator
    from gain_exp.train.runtime import Runtime

    data = build(
        root=str(tmp_path),
        image_size=32,
        n_train=4,
        n_val=6,
        n_test=2,
        max_objects=2,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        seed=0,
        batch_size=4,
    )
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=data.num_classes)
    gain = GAIN(model, grad_layer="stages.1", formulation="per_label", multi_label=True, freeze_am_bn=False)
    evaluator = Evaluator(
        gain,
        GAINLoss(multi_label=True),
        data,
        Runtime(torch.device("cpu")),
        batch_size=4,
        workers=0,
        amp=False,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        progress=False,
    )
    plain = evaluator.evaluate(data.val, "val")
    result = evaluator.evaluate(data.val, "val", rows=True)
    assert plain.rows is None and json.dumps(plain.metrics) == json.dumps(result.metrics)  # rows change no number
    rows, m = result.rows, result.metrics
    assert [r["index"] for r in rows] == list(range(6)) and any(len(r["true"]) == 2 for r in rows)
    assert all([mp["explains"] for mp in r["maps"]] == [[c] for c in r["true"]] for r in rows)
    assert all(
        set(r["pred"])
        == {c for c, p in zip(data.classes, r["probs"]) if p > 0.5} | {data.classes[r["probs"].index(r["score"])]}
        for r in rows
    )
    maps = [mp for r in rows for mp in r["maps"]]
    ious = [mp["iou"] for mp in maps if mp["iou"] is not None]
    assert len(ious) == m["val/loc_n"] > 6
    assert sum(ious) / len(ious) == pytest.approx(m["val/loc_iou"], rel=1e-6, abs=1e-9)
    assert sum(mp["am_drop"] for mp in maps) / len(maps) == pytest.approx(m["val/am_drop"], rel=1e-5)
    two = next(r for r in rows if len(r["maps"]) == 2)
    assert two["am_drop"] == pytest.approx(sum(mp["am_drop"] for mp in two["maps"]) / 2)


def test_multi_label_maps_are_scored_per_label_whatever_the_training_formulation(tmp_path):
    """The two formulations compare on equal terms: the same weights trained under formulation=batch or per_label
    get the same metrics (one map per (image, true class), scored against that class's mask), not a batch map of the
    summed classes against the union of their masks."""
    import copy

    import timm
    import torch

    from gain_exp.core.gain import GAIN
    from gain_exp.core.losses import GAINLoss
    from gain_exp.data.shapes import build
    from gain_exp.train.evaluation import Evaluator
    from gain_exp.train.runtime import Runtime

    data = build(
        root=str(tmp_path),
        image_size=32,
        n_train=4,
        n_val=6,
        n_test=2,
        max_objects=2,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        seed=0,
        batch_size=4,
    )
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=data.num_classes)
    metrics = {}
    for formulation in ("batch", "per_label"):
        gain = GAIN(copy.deepcopy(model), grad_layer="stages.1", formulation=formulation, multi_label=True)
        evaluator = Evaluator(
            gain,
            GAINLoss(multi_label=True),
            data,
            Runtime(torch.device("cpu")),
            batch_size=4,
            workers=0,
            amp=False,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            progress=False,
        )
        metrics[formulation] = evaluator.evaluate(data.val, "val").metrics
        assert gain.formulation == formulation  # the module's own formulation is left as it was
    pairs = sum(int(data.val[i]["target"].sum()) for i in range(len(data.val)))
    assert pairs > len(data.val) and metrics["batch"]["val/loc_n"] == pairs
    assert json.dumps(metrics["batch"]) == json.dumps(metrics["per_label"])
    with pytest.raises(ValueError, match="formulation='pairs': choose one of batch, per_label"):
        gain(data.val[0]["image"][None], formulation="pairs")


@pytest.mark.slow
def test_an_unreadable_tested_checkpoint_is_named_as_such_not_as_an_option_not_given(finished, tmp_path, capsys):
    """Without --checkpoint the sentence said "--checkpoint: checkpoint .../best.ckpt is unreadable" (found in the
    issue 27 catalogue): it names the run's tested checkpoint instead."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    tested = json.loads((run / "summary.json").read_text())["tested_on"]["checkpoint"]
    (run / "checkpoints" / f"{tested}.ckpt").write_bytes(b"PK\x03\x04 half a zip")
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: the run's tested checkpoint: checkpoint {run / 'checkpoints' / tested}.ckpt is unreadable"
    )
    assert "--checkpoint:" not in err and err.count("\n") == 1


@pytest.mark.slow
def test_evaluate_on_a_full_disk_is_one_sentence(finished, tmp_path, monkeypatch, capsys):
    from test_full_disk import disk_fills

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    with disk_fills(monkeypatch):
        assert main([str(run), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and "the disk is full (" in err and err.count("\n") == 1
