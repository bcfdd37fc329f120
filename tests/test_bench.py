"""gain_exp.bench: step-time flags (--amp, --channels-last, --compile, --variants) and the data-loading mode."""

from __future__ import annotations

import re

import PIL.Image
import pytest
import torch

from gain_exp import bench

TINY = [
    "--backbone",
    "test_resnet",
    "--size",
    "32",
    "--batch",
    "2",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--classes",
    "5",
    "--labels",
    "2",
]
NUMBER = r"\d+\.\d"


def _rows(out: str) -> dict[str, list[str]]:
    """variant -> its cells, from the printed markdown table."""
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("| variant") and not line.startswith("| decode"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_amp_channels_last_variants(capsys, one_thread):
    assert (
        bench.main(
            [*TINY, "--amp", "--channels-last", "--variants", "plain,batch,reference", "--modes", "features,frozen"]
        )
        == 0
    )
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith("test_resnet, batch 2, 32 px, cpu") and header.endswith("flags: amp bf16, channels_last")
    rows = _rows(out)
    assert list(rows) == [
        "plain classification",
        "GAIN batch, features",
        "GAIN batch, frozen",
        "reference: hook + full backward",
    ]  # no per_label row: --variants left it out
    for cells in rows.values():
        assert re.fullmatch(NUMBER, cells[0]) and re.fullmatch(NUMBER + r"\d", cells[1]) and cells[2].isdigit()
    assert "peak CUDA MB" not in out and "graphs" not in out  # CPU, no --compile


def test_default_flags_and_ratio_without_plain(capsys, one_thread):
    assert bench.main([*TINY, "--variants", "per_label", "--modes", "full"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("flags: none")
    assert list(_rows(out)) == ["GAIN per_label x2, full"]
    assert _rows(out)["GAIN per_label x2, full"][1] == "–"  # no plain row to divide by


def test_bad_variant_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--variants", "plain,bogus"])
    assert exc.value.code == 2 and "plain, batch, per_label, reference" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_gives_numbers_or_na_never_a_traceback(capsys, one_thread):
    """torch.compile on a tiny model. aot_eager runs Dynamo + AOTAutograd (which decides double backward) without
    inductor's C++ build, which takes minutes on 2 cores; inductor goes through the same AOTAutograd check."""
    assert (
        bench.main(
            [
                *TINY,
                "--compile",
                "--compile-backend",
                "aot_eager",
                "--variants",
                "plain,batch,reference",
                "--modes",
                "full,features",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("flags: compile (aot_eager)") and "Traceback" not in out
    rows = _rows(out)
    assert list(rows) == [
        "plain classification",
        "GAIN batch, full",
        "GAIN batch, features",
        "reference: hook + full backward",
    ]
    assert re.fullmatch(NUMBER, rows["plain classification"][0])
    assert re.fullmatch(NUMBER, rows["GAIN batch, features"][0])  # donated buffers off: autograd.grad retains
    assert re.fullmatch(NUMBER, rows["reference: hook + full backward"][0])  # hook guards on: the hook runs
    full = rows["GAIN batch, full"][0]
    assert re.fullmatch(NUMBER, full) or re.fullmatch(r"n/a \([^()]{5,60}\)", full), full
    if full.startswith("n/a"):  # the full message is printed under the table
        assert "\n- GAIN batch, full: RuntimeError: " in out
    graphs = [cells[-1] for cells in rows.values()]
    assert all(re.fullmatch(r"\d+ \(\d+\)", g) for g in graphs)


def test_why_not_and_na_row():
    assert (
        bench.why_not(RuntimeError("torch.compile with aot_autograd does not currently support double backward"))
        == "torch.compile has no double backward"
    )
    assert bench.why_not(ValueError("boom\nmore")) == "ValueError: boom"
    assert (
        bench.why_not(RuntimeError("Batching rule not implemented for aten::mm.out; the fallback"))
        == "no vmap over compiled backward (is_grads_batched)"
    )
    rows = [
        dict(
            variant="GAIN batch, full",
            ms=None,
            ratio=None,
            saved=None,
            peak=None,
            graphs=1,
            breaks=0,
            na="torch.compile has no double backward",
            error="RuntimeError: no double backward\ndetail",
        )
    ]
    table = bench.format_table(rows, "cuda")
    assert "| GAIN batch, full | n/a (torch.compile has no double backward) | – | – | – | 1 (0) |" in table
    assert "peak CUDA MB" in table and table.endswith("- GAIN batch, full: RuntimeError: no double backward")


def test_compile_failure_outside_compile_is_raised(monkeypatch):
    """Without --compile a failing variant is a bug: it raises instead of becoming an n/a row."""
    monkeypatch.setattr(bench, "_time", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
    with pytest.raises(RuntimeError, match="broken"):
        bench.run("test_resnet", 2, 32, 5, 2, "cpu", 0, 1, ["features"], ["plain"])


def test_data_mode_on_synthetic_images(tmp_path, capsys):
    folder = tmp_path / "imgs"
    assert (
        bench.main(
            [
                "--data",
                str(folder),
                "--make-images",
                "8",
                "--size",
                "32",
                "--batch",
                "4",
                "--workers",
                "0,1",
                "--passes",
                "1",
            ]
        )
        == 0
    )
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"synthetic_{i:05d}.jpg" for i in range(8)]
    with PIL.Image.open(files[0]) as im:
        assert im.size == (500, 375) and im.format == "JPEG"
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"data: {folder}, 8 images, batch 4, 32 px")
    rows = [line for line in out.splitlines() if re.match(r"\| (pil|torchvision) \|", line)]
    assert [r.split("|")[1:3] for r in rows] == [
        [" pil ", " 0 "],
        [" pil ", " 1 "],
        [" torchvision ", " 0 "],
        [" torchvision ", " 1 "],
    ]
    assert all(float(r.split("|")[3]) > 0 for r in rows)


def test_data_decoders_agree(tmp_path):
    """Both decoders produce the same normalised 3 x S x S tensors (up to resampling differences)."""
    paths = bench.make_images(tmp_path, 2)
    pil, tv = bench.ImageFolderLoad(paths, 48, "pil"), bench.ImageFolderLoad(paths, 48, "torchvision")
    a, b = pil[0], tv[0]
    assert a.shape == b.shape == (3, 48, 48) and a.dtype == b.dtype == torch.float32
    assert (a - b).abs().mean() < 0.1


@pytest.mark.parametrize("make", [False, True])
def test_empty_or_missing_folder_is_one_sentence_exit_2(tmp_path, capsys, make):
    folder = tmp_path / "empty"
    if make:
        folder.mkdir()
        (folder / "notes.txt").write_text("not an image")
    assert bench.main(["--data", str(folder), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.endswith(".") and err.count(". ") == 0 and "\n" not in err
    assert ("holds no JPEG or PNG image" if make else "is not a folder") in err
    assert (sorted(p.name for p in folder.iterdir()) == ["notes.txt"]) if make else not folder.exists()


def test_make_images_needs_data(capsys):
    assert bench.main(["--make-images", "4"]) == 2
    assert "--data" in capsys.readouterr().err


def test_cam_methods_each_get_a_row_at_an_inner_layer(capsys, one_thread):
    assert (
        bench.main(
            [
                *TINY,
                "--variants",
                "batch",
                "--modes",
                "features",
                "--cams",
                "gradcam,layercam,hirescam",
                "--grad-layer",
                "layer3",
            ]
        )
        == 0
    )
    assert list(_rows(capsys.readouterr().out)) == [
        "GAIN batch, features, gradcam",
        "GAIN batch, features, layercam",
        "GAIN batch, features, hirescam",
    ]


def test_a_vit_is_built_for_the_benchmark_size(capsys, one_thread):
    assert bench.main([*TINY, "--backbone", "test_vit", "--variants", "plain,batch", "--modes", "features"]) == 0
    assert list(_rows(capsys.readouterr().out)) == ["plain classification", "GAIN batch, features"]


def test_unknown_cam_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--cams", "gradcam,scorecam"])
    assert exc.value.code == 2 and "hirescam" in capsys.readouterr().err
