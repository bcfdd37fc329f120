#!/usr/bin/env bash
# The prepared CUDA check (issue 25): one run of at most ~9 minutes on one NVIDIA GPU, from a fresh checkout.
#
#   scripts/gpu_check.sh [--dry-run] [--stages pytest,memory,speed] [OUT_DIR]   (make gpu-check ARGS="...")
#   scripts/gpu_check.sh --fetch-wheels [DIR]    where pip works: the wheels a machine without a package index needs
#
# Stages, in this order, each under its own timeout; a stage that fails or times out is recorded and the next runs:
#   setup   a Python with torch, timm, hydra-core, omegaconf and pytest: $PYTHON, else .venv/bin/python, else
#           python3; wheels in $WHEELS (default .whl/) are installed first (pip --no-index --target); if imports
#           still fail, a .venv (--system-site-packages) gets `pip install -e '.[test]'` (needs a package index)
#   pytest  the tests marked gpu (pytest -m gpu): junit XML + log
#   memory  scripts/gpu_memory_steady.py: peak memory at step 300 of per_label/full GAIN steps vs step 50
#   speed   gain_exp.bench for each backbone and flag set (fp32, bf16, bf16 + channels_last, + compile); the eager
#           sets for every backbone first, then compile, which takes longest, so a spent budget costs compile rows
#   report  scripts/gpu_check_report.py: report.md and summary.json (device, torch, date, git commit, every stage)
#
# OUT_DIR (default outputs/gpu_check/<date>) gets report.md, summary.json, stages.jsonl, pytest-junit.xml,
# memory.json, speed.json, speed.md, speed/ (each bench run's table, JSON and log) and logs/ (each stage's log).
#
# --dry-run (or DRY=1): the same stages on CPU with tiny sizes (gain_cnn4 and timm's test_vit at 64 px, batch 4,
# a few steps, compile through aot_eager instead of inductor's minutes-long C++ build there); the gpu tests are all
# skipped there. Environment knobs: PYTHON, WHEELS, GPU_CHECK_BUDGET (seconds for all stages before the report,
# default 500), T_SETUP, T_PYTEST, T_MEMORY, T_SPEED, T_BENCH, T_BENCH_COMPILE (caps in seconds),
# GPU_CHECK_BACKBONES, GPU_CHECK_CONFIGS (of fp32,bf16,bf16_cl,compile), GPU_CHECK_COMMIT (when there is no .git).
set -u -o pipefail

CALLER=$(pwd)  # relative folders given as arguments are the caller's
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
abs() { case "$1" in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }

usage() { sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

DRY=${DRY:-0}
STAGES=pytest,memory,speed
OUT=""
FETCH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --stages) STAGES=${2:?--stages needs a comma list of pytest,memory,speed}; shift ;;
    --stages=*) STAGES=${1#--stages=} ;;
    --fetch-wheels) FETCH=$(abs "${2:-.whl}"); [ $# -gt 1 ] && shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -n "$OUT" ] && { echo "error: one output folder, not '$OUT' and '$1'" >&2; exit 2; }; OUT=$(abs "$1") ;;
  esac
  shift
done
for s in ${STAGES//,/ }; do
  case "$s" in pytest|memory|speed) ;; *) echo "error: --stages takes pytest, memory, speed, not '$s'" >&2; exit 2 ;; esac
done

# ------------------------------------------------------------------ --fetch-wheels: run here, where pip works
if [ -n "$FETCH" ]; then
  PIP_PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  DEVICE_PY=${DEVICE_PY_VERSION:-3.12}  # the device image's Python (pure-Python wheels: any 3.x works)
  mkdir -p "$FETCH"
  "$PIP_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PY" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$FETCH" \
    "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" || exit 1
  "$PIP_PY" -m pip wheel -q --no-deps -w "$FETCH" "antlr4-python3-runtime==4.9.*" || exit 1  # sdist only on PyPI
  ls -l "$FETCH"
  exit 0
fi

# ------------------------------------------------------------------ sizes
if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  BACKBONES=${GPU_CHECK_BACKBONES:-gain_cnn4 test_vit}
  BENCH_ARGS=(--device cpu --size 64 --batch 4 --classes 5 --labels 3 --warmup 1 --repeats 1)
  COMPILE_BACKEND=aot_eager
  MEMORY_ARGS=(--device cpu --backbone gain_cnn4 --size 64 --batch 4 --classes 5 --labels 3 --steps 12 --check-at 4
    --tolerance 0.1)  # CPU: the process's resident set stands in for CUDA's allocated bytes, and moves a few %
else
  DEVICE=cuda
  BACKBONES=${GPU_CHECK_BACKBONES:-resnet50 vgg16_bn vit_small_patch16_224}
  BENCH_ARGS=(--device cuda --size 224 --batch 64 --classes 20 --labels 3 --warmup 2 --repeats 10)
  COMPILE_BACKEND=inductor
  MEMORY_ARGS=(--device cuda --backbone resnet18 --size 224 --batch 32 --classes 20 --labels 3 --steps 300
    --check-at 50 --tolerance 0.01)
fi
BACKBONES=${BACKBONES//,/ }
CONFIGS=${GPU_CHECK_CONFIGS:-fp32,bf16,bf16_cl,compile}
BUDGET=${GPU_CHECK_BUDGET:-500}
T_SETUP=${T_SETUP:-45}
T_PYTEST=${T_PYTEST:-180}
T_MEMORY=${T_MEMORY:-60}
T_SPEED=${T_SPEED:-300}
T_BENCH=${T_BENCH:-60}
T_BENCH_COMPILE=${T_BENCH_COMPILE:-150}

OUT=${OUT:-outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$OUT/logs" "$OUT/speed" || exit 2
OUT=$(cd "$OUT" && pwd)
: >"$OUT/stages.jsonl"
: >"$OUT/speed/runs.jsonl"
DEADLINE=$((SECONDS + BUDGET))

say() { echo "[gpu-check $(date +%H:%M:%S)] $*"; }
# seconds a stage may take: its cap, or what is left of the budget when that is less
cap() { local left=$((DEADLINE - SECONDS)); [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }
status_of() { case "$1" in 0) echo ok ;; 124|137) echo timeout ;; *) echo failed ;; esac; }
# record STAGE STATUS RC SECONDS TIMEOUT: one JSON line in stages.jsonl
record() {
  printf '{"stage": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout_s": %s, "log": "logs/%s.log"}\n' \
    "$1" "$2" "${3:-null}" "$4" "$5" "$1" >>"$OUT/stages.jsonl"
  say "$1: $2 (${4} s of at most ${5} s)"
}
# run_stage NAME CAP COMMAND...: the command under its timeout (the whole process group), log in logs/NAME.log
run_stage() {
  local name=$1 t start rc; t=$(cap "$2"); shift 2
  if [ "$t" -lt 5 ]; then record "$name" skipped "" 0 "$t"; return; fi
  say "$name: running (at most $t s)"
  start=$SECONDS
  timeout -k 10 "$t" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  record "$name" "$(status_of $rc)" "$rc" $((SECONDS - start)) "$t"
}
wanted() { [[ ",$STAGES," == *",$1,"* ]]; }

say "output: $OUT ($([ "$DRY" = 1 ] && echo 'dry run on CPU' || echo CUDA), budget $BUDGET s)"

# ------------------------------------------------------------------ setup
IMPORTS="import torch, timm, hydra, omegaconf, pytest, gain_exp"
setup() {
  local t
  PY=${PYTHON:-}
  if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
  fi
  echo "python: $PY ($("$PY" --version 2>&1))"
  local wheels=${WHEELS:-.whl}
  if compgen -G "$wheels/*.whl" >/dev/null; then
    SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    echo "installing the wheels in $wheels into $SITE:" "$wheels"/*.whl
    t=$(cap "$T_SETUP")
    timeout -k 5 "$t" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$wheels"/*.whl || echo "wheel install failed (rc $?)"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's gain_exp first, installed or not
  local check="$IMPORTS; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'timm', timm.__version__)"
  "$PY" -c "$check" && return 0
  echo "missing imports: pip install -e '.[test]' into .venv (system site packages: a preinstalled torch stays)"
  t=$(cap "$T_SETUP")
  if [ ! -x .venv/bin/python ]; then timeout -k 5 "$t" "$PY" -m venv --system-site-packages .venv; fi
  timeout -k 5 "$(cap "$T_SETUP")" .venv/bin/python -m pip install -q -e '.[test]' && PY=.venv/bin/python
  "$PY" -c "$check"
}
start=$SECONDS
setup >"$OUT/logs/setup.log" 2>&1
rc=$?
record setup "$(status_of $rc)" "$rc" $((SECONDS - start)) "$T_SETUP"
if [ "$DRY" != 1 ] && grep -q " cuda False " "$OUT/logs/setup.log"; then
  say "warning: torch sees no CUDA device, so the stages that need one fail (--dry-run runs them on CPU)"
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1

# ------------------------------------------------------------------ pytest -m gpu
if wanted pytest; then
  mapfile -t GPU_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
  TIMEOUT_ARGS=()
  # pytest-timeout, where it is installed and auto-loaded: a hanging test fails alone instead of the whole stage
  if [ -z "${PYTEST_DISABLE_PLUGIN_AUTOLOAD:-}" ] && "$PY" -c "import importlib.metadata as m, sys
sys.exit(not any(e.name == 'timeout' for e in m.entry_points(group='pytest11')))" 2>/dev/null; then
    TIMEOUT_ARGS=(--timeout 120)
  fi
  run_stage pytest "$T_PYTEST" "$PY" -m pytest -p no:cacheprovider -m gpu -v -rA --durations=0 -o addopts="" \
    --continue-on-collection-errors --junitxml "$OUT/pytest-junit.xml" "${TIMEOUT_ARGS[@]}" "${GPU_FILES[@]}"
fi

# ------------------------------------------------------------------ memory steady over many GAIN steps
if wanted memory; then
  run_stage memory "$T_MEMORY" "$PY" scripts/gpu_memory_steady.py "${MEMORY_ARGS[@]}" --json "$OUT/memory.json"
fi

# ------------------------------------------------------------------ speed table (gain_exp.bench)
flags_of() {
  case "$1" in
    fp32) echo "" ;;
    bf16) echo "--amp" ;;
    bf16_cl) echo "--amp --channels-last" ;;
    compile) echo "--amp --channels-last --compile --compile-backend $COMPILE_BACKEND" ;;
    *) return 1 ;;
  esac
}
speed() {
  local cfg b t name start rc st failed=0 jobs=()
  for cfg in ${CONFIGS//,/ }; do flags_of "$cfg" >/dev/null || { echo "unknown config $cfg" >&2; return 2; }; done
  for cfg in ${CONFIGS//,/ }; do  # eager flag sets, every backbone; then compile, every backbone
    [ "$cfg" = compile ] && continue
    for b in $BACKBONES; do jobs+=("$b:$cfg"); done
  done
  if [[ ",$CONFIGS," == *",compile,"* ]]; then for b in $BACKBONES; do jobs+=("$b:compile"); done; fi
  for job in "${jobs[@]}"; do
    b=${job%%:*} cfg=${job#*:} name="${job/:/__}"
    [ "$cfg" = compile ] && t=$(cap "$T_BENCH_COMPILE") || t=$(cap "$T_BENCH")
    [ "$t" -gt $((STAGE_END - SECONDS)) ] && t=$((STAGE_END - SECONDS))
    if [ "$t" -lt 5 ]; then
      printf '{"backbone": "%s", "config": "%s", "status": "skipped", "rc": null, "seconds": 0}\n' "$b" "$cfg" \
        >>"$OUT/speed/runs.jsonl"
      failed=1
      continue
    fi
    start=$SECONDS
    # shellcheck disable=SC2046  # the flags are words
    timeout -k 10 "$t" "$PY" -m gain_exp.bench --backbone "$b" "${BENCH_ARGS[@]}" --modes features \
      --variants plain,batch,per_label $(flags_of "$cfg") --json "$OUT/speed/$name.json" \
      >"$OUT/speed/$name.md" 2>"$OUT/speed/$name.log"
    rc=$?
    st=$(status_of $rc)
    [ "$st" = ok ] || failed=1
    printf '{"backbone": "%s", "config": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout_s": %s}\n' \
      "$b" "$cfg" "$st" "$rc" $((SECONDS - start)) "$t" >>"$OUT/speed/runs.jsonl"
    echo "$b $cfg: $st ($((SECONDS - start)) s)"
  done
  return $failed
}
if wanted speed; then
  t=$(cap "$T_SPEED")
  STAGE_END=$((SECONDS + t))
  start=$SECONDS
  say "speed: running (at most $t s)"
  speed >"$OUT/logs/speed.log" 2>&1
  rc=$?
  record speed "$(status_of $rc)" "$rc" $((SECONDS - start)) "$t"
fi

# ------------------------------------------------------------------ report (always)
REPORT_ARGS=("$OUT" --device "$DEVICE" --compile-backend "$COMPILE_BACKEND")
[ "$DRY" = 1 ] && REPORT_ARGS+=(--dry-run)
timeout -k 5 25 "$PY" scripts/gpu_check_report.py "${REPORT_ARGS[@]}" >"$OUT/logs/report.log" 2>&1
rc=$?
if [ -f "$OUT/report.md" ]; then cat "$OUT/report.md"; else echo "report failed (rc $rc):"; tail -20 "$OUT/logs/report.log"; fi
say "done in $SECONDS s: $OUT"
"$PY" -c "import json,sys; sys.exit(0 if json.load(open('$OUT/summary.json'))['ok'] else 1)" 2>/dev/null
