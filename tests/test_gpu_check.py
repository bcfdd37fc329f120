"""scripts/gpu_check.sh and its parts, on CPU with tiny sizes: what a GPU session will run must work before it does.

The memory-steady script and the bench's --json run in process (seconds); the report is built from a folder laid out
as the shell script leaves it; the shell script itself runs its dry run (``--dry-run``, stages memory and speed, one
tiny backbone) in a slow test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest
from conftest import ROOT

from gain_exp import bench

SCRIPTS = ROOT / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_MEMORY = ["--device", "cpu", "--backbone", "gain_cnn4", "--size", "32", "--batch", "2", "--classes", "4"]
TINY_BENCH = ["--backbone", "gain_cnn4", "--size", "32", "--batch", "2", "--repeats", "1", "--warmup", "0"]


def test_memory_steady_json(tmp_path, one_thread, capsys):
    memory = _script("gpu_memory_steady")
    out = tmp_path / "memory.json"
    rc = memory.main([*TINY_MEMORY, "--steps", "4", "--check-at", "2", "--tolerance", "1.0", "--json", str(out)])
    data = json.loads(out.read_text())
    assert rc == (0 if data["passed"] else 1) and capsys.readouterr().out.startswith(("PASS: ", "FAIL: "))
    assert data["formulation"] == "per_label" and data["grad_mode"] == "full" and data["steps"] == 4
    assert set(data["records"]) == {"step_peak", "peak_so_far", "allocated", "reserved", "loss"}
    assert all(len(v) == 4 for v in data["records"].values())
    assert set(data["checks"]) == {"step_peak", "peak_so_far", "losses_finite"}
    for key in ("step_peak", "peak_so_far"):
        check = data["checks"][key]
        assert check["at_check"] > 0 and check["at_end"] > 0 and isinstance(check["passed"], bool)
    assert data["checks"]["losses_finite"]["passed"] is True and data["device_name"] == "cpu"


def test_memory_check_compares_the_last_step_with_the_early_one():
    memory = _script("gpu_memory_steady")
    records = dict(step_peak=[100, 100, 102], peak_so_far=[100, 100, 100], loss=[1.0, 2.0, 3.0])
    result = memory.check(dict(records=records, steps=3), check_at=2, tolerance=0.01)
    assert result["checks"]["step_peak"]["relative_change"] == pytest.approx(0.02)
    assert not result["checks"]["step_peak"]["passed"] and result["checks"]["peak_so_far"]["passed"]
    assert result["passed"] is False
    records["loss"][1] = float("nan")
    records["step_peak"][2] = 100
    assert memory.check(dict(records=records, steps=3), check_at=2, tolerance=0.01)["passed"] is False


def test_memory_steady_refuses_a_check_step_past_the_end(capsys):
    with pytest.raises(SystemExit) as exc:
        _script("gpu_memory_steady").main([*TINY_MEMORY, "--steps", "4", "--check-at", "5"])
    assert exc.value.code == 2 and "--check-at 5" in capsys.readouterr().err


def test_bench_json_has_settings_and_images_per_second(tmp_path, one_thread, capsys):
    out = tmp_path / "b.json"
    argv = [*TINY_BENCH, "--variants", "plain,per_label", "--modes", "features", "--amp", "--json", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["backbone"] == "gain_cnn4" and data["batch"] == 2 and data["device_name"] == "cpu"
    assert data["flags"] == dict(
        amp=True, channels_last=False, compile=False, compile_backend=None, label="amp bf16"
    ) and set(data["tf32"]) == {"cudnn", "matmul"}
    assert [r["variant"] for r in data["rows"]] == ["plain classification", "GAIN per_label x3, features"]
    for r in data["rows"]:
        assert r["images_s"] == pytest.approx(2 * 1e3 / r["ms"]) and r["peak"] is None and r["na"] is None
    assert "| plain classification |" in capsys.readouterr().out  # the table is still printed


def test_bench_json_is_for_the_step_benchmark_only(tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path), "--json", str(tmp_path / "x.json")]) == 2
    assert "--json apply to the step benchmark" in capsys.readouterr().err


def test_an_unused_map_under_compile_has_a_short_reason():
    err = RuntimeError("The differentiated Tensor at index 0 appears to not have been used in the graph. Set ...")
    assert bench.why_not(err) == "map layer inside compiled forward_features"


def _bench_json(backbone: str, config: str, rows: list[dict]) -> dict:
    return dict(
        backbone=backbone,
        batch=64,
        size=224,
        classes=20,
        labels=3,
        device="cuda",
        device_name="GPU X",
        threads=16,
        warmup=2,
        repeats=10,
        flags=dict(amp=config != "fp32", channels_last=False, compile=config == "compile"),
        tf32=dict(cudnn=True, matmul=False),
        torch="2.x",
        rows=rows,
    )


def _row(variant: str, ms: float | None, na: str | None = None) -> dict:
    return dict(
        variant=variant,
        ms=ms,
        ratio=None,
        saved=1 << 20,
        peak=None if ms is None else 3 << 30,
        graphs=None,
        breaks=None,
        na=na,
        error=None if na is None else f"RuntimeError: {na}",
        images_s=None if ms is None else 64e3 / ms,
    )


def test_report_from_a_folder_the_stages_left(tmp_path):
    """Stages that passed, failed and timed out; a killed pytest's log instead of its junit; a skipped bench run."""
    out = tmp_path / "gc"
    (out / "speed").mkdir(parents=True)
    (out / "logs").mkdir()
    stages = [
        dict(stage="setup", status="ok", rc=0, seconds=3, timeout_s=45, log="logs/setup.log"),
        dict(stage="pytest", status="timeout", rc=124, seconds=180, timeout_s=180, log="logs/pytest.log"),
        dict(stage="speed", status="failed", rc=1, seconds=200, timeout_s=250, log="logs/speed.log"),
    ]
    (out / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    (out / "logs" / "pytest.log").write_text(
        "tests/test_gpu.py::test_a[full-batch] PASSED  [ 10%]\n"
        "tests/test_gpu.py::test_b XFAIL (CUDA itself is not bit-reproducible)\n"
        "tests/test_gpu.py::test_c FAILED  [ 30%]\n"
    )
    runs = [
        dict(backbone="resnet50", config="fp32", status="ok", rc=0, seconds=9, timeout_s=60),
        dict(backbone="resnet50", config="compile", status="timeout", rc=124, seconds=150, timeout_s=150),
        dict(backbone="vgg16_bn", config="fp32", status="skipped", rc=None, seconds=0),
    ]
    (out / "speed" / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    rows = [_row("plain classification", 50.0), _row("GAIN per_label x3, features", None, "no vmap")]
    (out / "speed" / "resnet50__fp32.json").write_text(json.dumps(_bench_json("resnet50", "fp32", rows)))

    summary = _script("gpu_check_report").build(out, "cuda", "inductor", dry_run=False)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary)) and on_disk["ok"] is False
    assert set(on_disk) == {"ok", "device", "compile_backend", "env", "stages", "pytest", "memory", "speed"}
    assert {"date", "python", "torch", "device_name", "git"} <= set(on_disk["env"])
    assert [s["status"] for s in on_disk["stages"]] == ["ok", "timeout", "failed"]
    assert on_disk["pytest"]["source"] == "log" and on_disk["pytest"]["counts"] == dict(passed=1, xfailed=1, failed=1)
    assert on_disk["memory"] is None
    speed = json.loads((out / "speed.json").read_text())
    assert speed == on_disk["speed"] and [r["status"] for r in speed["runs"]] == ["ok", "timeout", "skipped"]
    plain, per_label = speed["rows"]
    assert plain["images_s"] == pytest.approx(1280.0) and plain["peak_mb"] == pytest.approx(3072.0)
    assert per_label["na"] == "no vmap" and per_label["images_s"] is None
    table = (out / "speed").with_suffix(".md").read_text()
    assert "| plain classification | 1,280, 3,072 MB | timeout |" in table
    assert "| GAIN per_label x3, features | n/a (no vmap) | timeout |" in table
    assert "### vgg16_bn" in table and "skipped (rc None)" in table
    assert {p.stem for p in out.glob("*.md")} == {"report", "speed"}


@pytest.mark.slow
def test_the_dry_run_writes_its_report(tmp_path):
    """The shell script itself on CPU: memory and speed (one tiny backbone, fp32 and compile) and the report."""
    out = tmp_path / "gc"
    env = {
        **os.environ,
        "GPU_CHECK_BACKBONES": "gain_cnn4",
        "GPU_CHECK_CONFIGS": "fp32,compile",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), "--dry-run", "--stages", "memory,speed", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["env"]["dry_run"] and summary["device"] == "cpu"
    assert [s["stage"] for s in summary["stages"]] == ["setup", "memory", "speed"]
    assert summary["memory"]["passed"] and summary["memory"]["steps"] == 12
    runs = summary["speed"]["runs"]
    assert [(r["backbone"], r["config"], r["status"]) for r in runs] == [
        ("gain_cnn4", "fp32", "ok"),
        ("gain_cnn4", "compile", "ok"),
    ]
    assert len(summary["speed"]["rows"]) == 6 and all(r["images_s"] for r in summary["speed"]["rows"])
    assert (out / "pytest-junit.xml").exists() is False  # not among --stages
    assert "Dry run: tiny CPU runs" in (out / "report").with_suffix(".md").read_text()
