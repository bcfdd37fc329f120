"""The report of scripts/gpu_check.sh: gathers its output folder into summary.json, report.md, speed.json, speed.md.

    python scripts/gpu_check_report.py OUT_DIR [--device cuda] [--compile-backend inductor] [--dry-run]

Reads what the stages left (stages.jsonl, pytest-junit.xml or the pytest log, memory.json, speed/runs.jsonl and each
bench run's JSON) and adds the environment: device name, torch / CUDA / cuDNN versions, date, git commit. A stage
that left nothing is reported as such; this script never fails because a stage did. Only the standard library is
needed at import time (torch is asked, where it imports, for the device).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # gpu_check.sh's flag sets, in table order
    "fp32": "fp32",
    "bf16": "bf16",
    "bf16_cl": "bf16 + channels_last",
    "compile": "bf16 + channels_last + compile",
}
PYTEST_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b(.*)$")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _last_line(path: Path) -> str:
    """The last non-empty line of a log (where a failure usually says what it was), shortened; '' if none."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200].replace("|", "\\|") if lines else ""


def _git() -> dict[str, Any]:
    """The checkout's commit and whether it is modified; GPU_CHECK_COMMIT where there is no .git (a copied tree)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return dict(commit=commit, dirty=bool(dirty), source="git")
    except (OSError, subprocess.SubprocessError):
        given = os.environ.get("GPU_CHECK_COMMIT")
        return dict(commit=given, dirty=None, source="GPU_CHECK_COMMIT" if given else None)


def environment(dry_run: bool) -> dict[str, Any]:
    """Where the check ran: date, host, Python, torch (CUDA, cuDNN, the device's name), timm, git."""
    env: dict[str, Any] = dict(
        date=datetime.now().astimezone().isoformat(timespec="seconds"),
        dry_run=dry_run,
        host=platform.node(),
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        git=_git(),
    )
    try:
        import torch

        cuda = torch.cuda.is_available()
        env.update(
            torch=torch.__version__,
            cuda=torch.version.cuda,
            cuda_available=cuda,
            cudnn=torch.backends.cudnn.version() if cuda else None,
            device_name=torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.machine()})",
            device_count=torch.cuda.device_count() if cuda else 0,
            device_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        )
    except Exception as err:  # noqa: BLE001 - the report is written whatever broke
        env.update(torch=None, device_name=None, torch_error=f"{type(err).__name__}: {err}")
    try:
        import timm

        env["timm"] = timm.__version__
    except Exception:  # noqa: BLE001
        env["timm"] = None
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        env["nvidia_smi"] = smi.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["nvidia_smi"] = None
    return env


# ------------------------------------------------------------------------------------------ pytest
def pytest_summary(out: Path) -> dict[str, Any]:
    """Outcome counts and every test's outcome, from the junit XML or, when the stage was killed before pytest
    wrote it, from the verbose log's lines."""
    junit = out / "pytest-junit.xml"
    cases: list[dict[str, Any]] = []
    source = None
    if junit.is_file():
        try:
            root = ET.parse(junit).getroot()
            source = "junit"
            for case in root.iter("testcase"):
                outcome, message = "passed", None
                for child in case:
                    if child.tag in ("failure", "error", "skipped"):
                        message = child.get("message")
                        if child.tag == "skipped":
                            outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                        else:
                            outcome = "failed" if child.tag == "failure" else "error"
                name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
                cases.append(dict(name=name, outcome=outcome, seconds=float(case.get("time") or 0), message=message))
        except ET.ParseError:
            cases, source = [], None
    if source is None:
        try:
            log = (out / "logs" / "pytest.log").read_text().splitlines()
        except OSError:
            log = []
        seen = {}
        for line in log:
            m = PYTEST_LINE.match(line.strip())
            if m:
                outcome = {"XFAIL": "xfailed", "XPASS": "xpassed"}.get(m.group(2), m.group(2).lower())
                seen[m.group(1)] = dict(name=m.group(1), outcome=outcome, seconds=None, message=m.group(3).strip())
        cases = list(seen.values())
        source = "log" if cases else None
    counts: dict[str, int] = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    return dict(source=source, total=len(cases), counts=counts, cases=cases)


# ------------------------------------------------------------------------------------------ speed
def _mb(v: float | None) -> str:
    return "–" if v is None else f"{v / 2**20:,.0f}"


def speed_summary(out: Path) -> dict[str, Any]:
    """Every bench run (backbone x flag set) with its status, and one row per (backbone, flag set, variant)."""
    runs = _read_jsonl(out / "speed" / "runs.jsonl")
    rows, settings = [], None
    for run in runs:
        data = _read_json(out / "speed" / f"{run['backbone']}__{run['config']}.json")
        run["rows"] = 0
        if not data:
            continue
        settings = settings or {k: data.get(k) for k in ("batch", "size", "labels", "classes", "device", "warmup")}
        settings.setdefault("repeats", data.get("repeats"))
        settings.setdefault("device_name", data.get("device_name"))
        settings.setdefault("tf32", data.get("tf32"))
        run["flags"] = data.get("flags")
        for r in data.get("rows", []):
            run["rows"] += 1
            rows.append(
                dict(
                    backbone=run["backbone"],
                    config=run["config"],
                    variant=r.get("variant"),
                    ms=r.get("ms"),
                    images_s=r.get("images_s"),
                    x_plain=r.get("ratio"),
                    peak_mb=None if r.get("peak") is None else r["peak"] / 2**20,
                    saved_mb=None if r.get("saved") is None else r["saved"] / 2**20,
                    graphs=r.get("graphs"),
                    breaks=r.get("breaks"),
                    na=r.get("na"),
                    error=r.get("error"),
                )
            )
    return dict(settings=settings, runs=runs, rows=rows)


def speed_markdown(speed: dict[str, Any], compile_backend: str, out: Path | None = None) -> str:
    """Per backbone: variants x flag sets, each cell images/s and peak memory (CUDA) or the reason it has none."""
    runs, rows = speed["runs"], speed["rows"]
    if not runs:
        return "No speed run was recorded.\n"
    s = speed["settings"] or {}
    lines = []
    if s:
        lines.append(
            f"batch {s.get('batch')}, {s.get('size')} px, {s.get('labels')} labels per image for per_label, "
            f"grad_mode features, {s.get('device')} ({s.get('device_name')}), median of {s.get('repeats')} steps "
            f"after {s.get('warmup')} warm-up; TF32: {s.get('tf32')}; compile: {compile_backend}. Cells: images/s "
            "(per_label counts images, not (image, label) pairs) and peak allocated MB where CUDA reports it."
        )
        lines.append("")
    configs = [c for c in CONFIGS if any(r["config"] == c for r in runs)]
    for backbone in dict.fromkeys(r["backbone"] for r in runs):
        lines += [f"### {backbone}", ""]
        lines.append("| variant | " + " | ".join(CONFIGS[c] for c in configs) + " |")
        lines.append("|---|" + "---:|" * len(configs))
        mine = [r for r in rows if r["backbone"] == backbone]
        for variant in dict.fromkeys(r["variant"] for r in mine):
            cells = []
            for c in configs:
                run = next((x for x in runs if x["backbone"] == backbone and x["config"] == c), None)
                row = next((r for r in mine if r["config"] == c and r["variant"] == variant), None)
                if row is not None and row["na"] is None and row["images_s"] is not None:
                    peak = "" if row["peak_mb"] is None else f", {row['peak_mb']:,.0f} MB"
                    cells.append(f"{row['images_s']:,.0f}{peak}")
                elif row is not None:
                    cells.append(f"n/a ({row['na']})")
                elif run is None:
                    cells.append("not run")
                else:
                    cells.append(run["status"] if run["status"] != "ok" else "–")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        if not mine:
            status = {x["config"]: x["status"] for x in runs if x["backbone"] == backbone}
            lines.append("| (no rows) | " + " | ".join(status.get(c, "not run") for c in configs) + " |")
        failed = [x for x in runs if x["backbone"] == backbone and x["status"] != "ok"]
        if failed:
            lines.append("")
        for x in failed:
            log = f"speed/{backbone}__{x['config']}.log"
            last = _last_line(out / log) if out else ""
            lines.append(
                f"- {CONFIGS.get(x['config'], x['config'])}: {x['status']} (rc {x.get('rc')}), {log}"
                + (f": {last}" if last else "")
            )
        lines.append("")
    lines += ["Every row, ms per step:", "", "| backbone | flags | variant | ms/step | images/s | x plain | peak MB |"]
    lines.append("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        if r["na"] is not None:
            lines.append(
                f"| {r['backbone']} | {CONFIGS.get(r['config'])} | {r['variant']} | n/a ({r['na']}) | – | – | – |"
            )
            continue
        ratio = "–" if r["x_plain"] is None else f"{r['x_plain']:.2f}"
        peak = "–" if r["peak_mb"] is None else f"{r['peak_mb']:,.0f}"
        lines.append(
            f"| {r['backbone']} | {CONFIGS.get(r['config'])} | {r['variant']} | {r['ms']:.1f} | "
            f"{r['images_s']:,.1f} | {ratio} | {peak} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ memory
def memory_summary(out: Path) -> dict[str, Any] | None:
    data = _read_json(out / "memory.json")
    if not data:
        return None
    keep = {k: v for k, v in data.items() if k != "records"}
    records = data.get("records") or {}
    keep["records_len"] = len(records.get("loss", []))
    return keep


def memory_markdown(mem: dict[str, Any] | None, out: Path) -> str:
    if mem is None:
        last = _last_line(out / "logs" / "memory.log")
        return "memory.json was not written; logs/memory.log" + (f" ends: {last}" if last else " is empty") + "\n"
    c = mem["checks"]
    lines = [
        f"{mem['backbone']}, {mem['formulation']}/{mem['grad_mode']}, batch {mem['batch']}, {mem['size']} px, "
        f"{mem['labels']} labels per image, {mem['steps']} steps on {mem['device']} ({mem['device_name']}), "
        f"{mem['memory']}; tolerance {mem['tolerance']:.1%}: **{'PASS' if mem['passed'] else 'FAIL'}**",
        "",
        f"| measure | step {mem['check_at']} MB | step {mem['steps']} MB | change | within |",
        "|---|---:|---:|---:|---|",
    ]
    for key in ("step_peak", "peak_so_far"):
        v = c[key]
        lines.append(
            f"| {key} | {_mb(v['at_check'])} | {_mb(v['at_end'])} | {v['relative_change']:+.3%} | "
            f"{'yes' if v['passed'] else 'no'} |"
        )
    lines.append(f"\nlosses finite: {c['losses_finite']['passed']}; {mem['steps_per_s']:.2f} steps/s")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ report
def build(out: Path, device: str, compile_backend: str, dry_run: bool) -> dict[str, Any]:
    stages = _read_jsonl(out / "stages.jsonl")
    pytest = pytest_summary(out)
    speed = speed_summary(out)
    memory = memory_summary(out)
    env = environment(dry_run)
    summary = dict(
        ok=bool(stages) and all(s["status"] == "ok" for s in stages),
        device=device,
        compile_backend=compile_backend,
        env=env,
        stages=stages,
        pytest=pytest,
        memory=memory,
        speed=speed,
    )
    speed_md = speed_markdown(speed, compile_backend, out)
    (out / "speed.md").write_text(speed_md)
    (out / "speed.json").write_text(json.dumps(speed, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    git = env["git"]
    commit = f"{git['commit']}{'+dirty' if git.get('dirty') else ''}" if git.get("commit") else "unknown"
    lines = [
        f"# GPU check{' (dry run on CPU)' if dry_run else ''}: {'all stages ok' if summary['ok'] else 'NOT all ok'}",
        "",
        f"- date: {env['date']}",
        f"- device: {env.get('device_name')} ({env.get('nvidia_smi') or 'no nvidia-smi'})",
        f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, timm {env.get('timm')}, "
        f"Python {env['python']}, {env['cpu_count']} CPUs",
        f"- git commit: {commit}",
        "",
    ]
    if dry_run:
        lines += ["Dry run: tiny CPU runs that exercise every stage; none of their numbers is a measurement.", ""]
    lines += [
        "## Stages",
        "",
        "| stage | status | seconds | timeout s | log (its last line when not ok) |",
        "|---|---|---:|---:|---|",
    ]
    for st in stages:
        last = _last_line(out / st["log"]) if st["status"] not in ("ok", "skipped") else ""
        log = f"{st['log']}: {last}" if last else st["log"]
        lines.append(f"| {st['stage']} | {st['status']} | {st['seconds']} | {st['timeout_s']} | {log} |")
    lines += ["", "## pytest -m gpu", ""]
    if pytest["source"] is None:
        lines.append("No result: neither pytest-junit.xml nor test lines in logs/pytest.log.")
    else:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(pytest["counts"].items()))
        lines.append(f"{pytest['total']} tests: {counts} (from {pytest['source']})")
        lines.append("")
        lines += ["| test | outcome | seconds | message |", "|---|---|---:|---|"]
        for c in pytest["cases"]:
            msg = (c["message"] or "").replace("|", "\\|").replace("\n", " ")[:160]
            secs = "–" if c["seconds"] is None else f"{c['seconds']:.1f}"
            lines.append(f"| {c['name']} | {c['outcome']} | {secs} | {msg} |")
    lines += ["", "## Memory over many GAIN steps", "", memory_markdown(memory, out)]
    lines += ["## Speed (gain_exp.bench)", "", speed_md]
    (out / "report.md").write_text("\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out} is not a folder (the output folder of scripts/gpu_check.sh)")
    summary = build(args.out, args.device, args.compile_backend, args.dry_run)
    print(f"wrote {args.out / 'report.md'} and summary.json ({'ok' if summary['ok'] else 'not all ok'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
