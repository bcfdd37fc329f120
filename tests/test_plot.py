"""``gain_exp.table --plot``: a bar per row and metric at the table's mean ± std, same bytes each time, from run
directories or a spec, and one sentence when matplotlib is missing."""

from __future__ import annotations

import importlib
import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from gain_exp.runs.tables import build_table, completed_runs
from gain_exp.table import main

pytest.importorskip("matplotlib")

from matplotlib.container import BarContainer  # noqa: E402

from gain_exp.runs.plot import DPI, HATCHES, plot_table  # noqa: E402

MISSING = "error: --plot needs matplotlib; install it with pip install 'gain-exp[plot]' (or pip install matplotlib).\n"
METRICS = ["test_unbiased/acc", "test_unbiased/loc_iou", "val/acc"]


def make_run(path: Path, overrides: list[str], final: dict) -> Path:
    """A completed run directory as the table reads it: summary.json and .hydra/overrides.yaml."""
    (path / ".hydra").mkdir(parents=True)
    summary = {"status": "completed", "final": final, "choices": {}, "overrides": overrides, "seed": 0}
    (path / "summary.json").write_text(json.dumps(summary))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return path


def make_sweep(root: Path) -> dict[tuple[str, str], list[dict]]:
    """2 datasets x 2 losses, seeds 0-1, except digits/gain (one seed, no loc_iou); returns the finals per row."""
    rows: dict[tuple[str, str], list[dict]] = {}
    job = 0
    for dataset in ("shapes", "digits"):
        for loss in ("baseline", "gain"):
            for seed in range(1 if (dataset, loss) == ("digits", "gain") else 2):
                final = {"test_unbiased/acc": 0.3 + 0.1 * job, "test_unbiased/loc_iou": 0.05 * job, "val/acc": 0.9}
                if (dataset, loss) == ("digits", "gain"):
                    del final["test_unbiased/loc_iou"]
                make_run(root / str(job), [f"dataset={dataset}", f"loss={loss}", f"seed={seed}"], final)
                rows.setdefault((dataset, loss), []).append(final)
                job += 1
    return rows


def bars(ax) -> dict[str, BarContainer]:
    """The bars of one metric's panel by row label (error bars are containers too, without a label)."""
    return {c.get_label(): c for c in ax.containers if isinstance(c, BarContainer)}


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking it decodes as one."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_one_bar_per_row_and_metric_at_the_mean_with_the_std_as_error_bar(tmp_path):
    finals = make_sweep(tmp_path / "sweep")
    table = build_table(completed_runs([tmp_path / "sweep"]), METRICS)
    figure = plot_table(table)

    assert [ax.get_title() for ax in figure.axes] == METRICS
    count = 0
    for ax, metric in zip(figure.axes, METRICS):
        drawn = bars(ax)
        expected = {f"{d} / {loss}": [f[metric] for f in fs if metric in f] for (d, loss), fs in finals.items()}
        expected = {label: xs for label, xs in expected.items() if xs}  # digits/gain has no loc_iou: no bar
        assert sorted(drawn) == sorted(expected)
        for label, xs in expected.items():
            [bar] = drawn[label].patches
            assert bar.get_height() == pytest.approx(statistics.fmean(xs))
            if len(xs) == 1:
                assert drawn[label].errorbar is None
            else:
                [segment] = drawn[label].errorbar.lines[2][0].get_segments()
                std = statistics.stdev(xs)
                assert segment[:, 1] == pytest.approx([bar.get_height() - std, bar.get_height() + std])
                assert segment[0, 0] == pytest.approx(bar.get_x() + bar.get_width() / 2)
        count += len(drawn)
    assert count == 4 * 3 - 1
    [legend] = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "shapes / baseline",
        "shapes / gain",
        "digits / baseline",
        "digits / gain",
    ]
    assert "test_unbiased/acc, test_unbiased/loc_iou, val/acc per dataset / loss" in figure._suptitle.get_text()


def test_the_same_loss_shares_a_colour_across_datasets_and_each_dataset_a_hatch(tmp_path):
    make_sweep(tmp_path / "sweep")
    figure = plot_table(build_table(completed_runs([tmp_path / "sweep"]), METRICS), title="custom")
    bar = {label: c.patches[0] for label, c in bars(figure.axes[0]).items()}
    assert bar["shapes / gain"].get_facecolor() == bar["digits / gain"].get_facecolor()
    assert bar["shapes / gain"].get_facecolor() != bar["shapes / baseline"].get_facecolor()
    assert bar["shapes / gain"].get_hatch() in (None, HATCHES[0]) and bar["digits / gain"].get_hatch() == HATCHES[1]
    assert bar["digits / baseline"].get_x() - bar["shapes / gain"].get_x() > 1  # a gap between the datasets
    assert figure._suptitle.get_text() == "custom"


def test_cli_writes_the_png_atomically_into_new_folders_and_the_same_table_gives_the_same_bytes(tmp_path, capsys):
    make_sweep(tmp_path / "sweep")
    out = tmp_path / "plots" / "new" / "table.png"
    assert main([str(tmp_path / "sweep"), "--metrics", *METRICS, "--plot", str(out)]) == 0
    assert capsys.readouterr().out.startswith("| dataset | loss | n |")
    assert [p.name for p in out.parent.iterdir()] == ["table.png"]  # no temp file left beside it

    figure = plot_table(build_table(completed_runs([tmp_path / "sweep"]), METRICS), tmp_path / "again.png")
    width, height = figure.get_size_inches() * DPI
    assert png_size(out) == (round(width), round(height))  # the whole figure at DPI, not cropped
    assert 600 <= round(width) <= 2000 and 300 <= round(height) <= 1000
    assert (tmp_path / "again.png").read_bytes() == out.read_bytes()
    assert b"Software" not in out.read_bytes() and b"atplotlib" not in out.read_bytes()  # no version-bound tag


def test_a_spec_plots_the_same_png_with_or_without_its_run_directories(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_sweep(tmp_path / "sweep")
    assert main(["sweep", "--metrics", *METRICS, "--save-spec", "t.spec.yaml", "--plot", "runs.png"]) == 0
    shutil.rmtree(tmp_path / "sweep")  # a fresh clone: the spec's committed numbers only
    assert main(["--spec", "t.spec.yaml", "--plot", "out/spec.png"]) == 0
    assert "from the numbers it holds" in capsys.readouterr().err
    assert (tmp_path / "out" / "spec.png").read_bytes() == (tmp_path / "runs.png").read_bytes()


def test_fourteen_rows_and_six_metrics_fit_one_readable_figure(tmp_path):
    metrics = [f"test/m{i}" for i in range(6)]
    job = 0
    for dataset in ("shapes", "decoy_digits"):
        for loss in ("baseline", "gain", "gain_ext", "gain_ext_2pct", "gain_ext_5pct", "gain_ext_10pct", "rrr"):
            for seed in range(2):
                make_run(
                    tmp_path / "sweep" / str(job),
                    [f"dataset={dataset}", f"loss={loss}", f"seed={seed}"],
                    {m: (job * 7 + i) % 10 / 10 for i, m in enumerate(metrics)},
                )
                job += 1
    figure = plot_table(build_table(completed_runs([tmp_path / "sweep"]), metrics))
    assert len(figure.axes) == 6 and sum(len(bars(ax)) for ax in figure.axes) == 14 * 6
    assert len(figure.legends[0].get_texts()) == 14
    assert {len({c.patches[0].get_facecolor() for c in bars(ax).values()}) for ax in figure.axes} == {7}  # a loss
    width, height = figure.get_size_inches()
    assert 8 <= width <= 16 and 4 <= height <= 9


def test_a_table_without_metric_columns_is_a_one_sentence_error(tmp_path, capsys):
    make_run(tmp_path / "run", ["seed=0"], {"train/loss": 0.5})  # no accuracy or localisation metric at all
    assert main([str(tmp_path / "run"), "--plot", str(tmp_path / "t.png")]) == 2
    err = capsys.readouterr().err
    assert err == "error: the table has no metric columns to plot; name the metrics to draw with --metrics.\n"
    assert not (tmp_path / "t.png").exists()


@pytest.mark.parametrize("source", ["runs", "spec"])
def test_without_matplotlib_plot_fails_in_one_line_and_the_table_still_works(tmp_path, monkeypatch, capsys, source):
    monkeypatch.chdir(tmp_path)
    make_sweep(tmp_path / "sweep")
    assert main(["sweep", "--save-spec", "t.spec.yaml"]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    args = ["sweep"] if source == "runs" else ["--spec", "t.spec.yaml"]
    assert main([*args, "--plot", "t.png"]) == 2
    out, err = capsys.readouterr()
    assert err == MISSING and out == "" and not (tmp_path / "t.png").exists()
    assert main(args) == 0 and capsys.readouterr().out.startswith("| dataset | loss | n |")


def test_importing_the_table_module_does_not_import_matplotlib(monkeypatch):
    import gain_exp

    table_module = sys.modules["gain_exp.table"]
    monkeypatch.setattr(gain_exp, "table", table_module)  # both put back afterwards
    monkeypatch.delitem(sys.modules, "gain_exp.table")
    monkeypatch.delitem(sys.modules, "gain_exp.runs.plot", raising=False)  # imported afresh if table.py imports it
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    fresh = importlib.import_module("gain_exp.table")  # ImportError if it imported matplotlib or gain_exp.runs.plot
    assert fresh is not table_module and hasattr(fresh, "main")
