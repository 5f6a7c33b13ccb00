#!/usr/bin/env bash
# hero-kernels GPU suite: ONE command for a lent GPU machine with no internet.
#
#   bash benchmarks/gpu_suite.sh                        # on the GPU machine (default: ~9 min at most)
#   HERO_SUITE_DRY_RUN=1 bash benchmarks/gpu_suite.sh   # or --cpu: the same stages on CPU at CI size
#
# Stages (each under `timeout`; a failed stage is recorded and the next one runs):
#   setup     pick a python whose torch sees CUDA (the machine's own: never installs torch), make a venv on
#             top of it (its site-packages linked in), install carried wheels from .whl/ (no index) and the
#             project (pip install --no-deps --no-build-isolation -e .; PYTHONPATH fallback)
#   build     build + load the C++/CUDA extension once (cached for the later stages)
#   tests     pytest -q -m "not slow" tests (CUDA available, so the GPU tests run)
#   bench     python -m benchmarks --size full: every op x impl (ours, eager, torch.compile, Liger, CCE, verl
#             when importable), time + memory + floors, with a time budget so the stage ends in time
#   trainer   python -m benchmarks.bench_trainer_memory (one HERO step: fused LM head vs materialized logits)
#   compile   python -m benchmarks.compile_report: registers / shared memory / spills, sm_80 and sm_90a
#   finalize  merge stage results, pytest summary and compile report into the result JSON + markdown
# Output: benchmarks/results/<gpu>-<date>.{json,md,png}, <gpu>-<date>-compile.{json,md}, <gpu>-<date>-trainer.json,
# <gpu>-<date>-suite.log;
# copied into $OUT (when set) after every stage, so a run cut short still returns what it made.
#
# Environment (all optional):
#   HERO_PYTHON           python to use (default: first of python3, .venv/bin/python whose torch fits)
#   HERO_SUITE_TOTAL      seconds for the whole suite (default 540); the bench stage gets what is left
#   HERO_SUITE_RESULTS    results folder (default benchmarks/results)
#   HERO_SUITE_SIZE       benchmark size (default full on GPU, ci on CPU)
#   HERO_SUITE_IMPLS      benchmark impls (comma list; default all)
#   HERO_SUITE_PYTEST_ARGS  replaces the pytest arguments (default: -q -m "not slow" tests)
#   HERO_SUITE_COMPILE_ARGS extra arguments for the compile report (e.g. "--match fwd --cc 90 --skip-cu")
#   HERO_SUITE_TRAINER_ARGS arguments of bench_trainer_memory (default GPU: --device cuda --vocab 128256
#                         --completion 4096; CPU: --device cpu --vocab 4096 --completion 128)
#   HERO_SUITE_SKIP       space-separated stages to skip (build tests trainer bench compile)
# Exit status: 0 when every stage passed, 1 otherwise (the results are written either way).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT="$(pwd)"

DRY="${HERO_SUITE_DRY_RUN:-0}"
for a in "$@"; do
  case "$a" in
    --cpu|--dry-run) DRY=1 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a (use --cpu or --help)" >&2; exit 2 ;;
  esac
done

T0=$(date +%s)
TOTAL="${HERO_SUITE_TOTAL:-540}"
RESULTS="${HERO_SUITE_RESULTS:-$ROOT/benchmarks/results}"
SKIP=" ${HERO_SUITE_SKIP:-} "
mkdir -p "$RESULTS"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/hero-suite.XXXXXX")"
STAGES="$WORK/stages.txt"
: > "$STAGES"
LOG="$WORK/suite.log"
: > "$LOG"
FAILED=0

say() { echo "[suite $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL - $(date +%s) + T0 )); }

# record NAME RC SECONDS NOTE...
record() {
  local name=$1 rc=$2 secs=$3; shift 3
  echo "$name $rc $secs $*" >> "$STAGES"
  [ "$rc" = 0 ] || FAILED=1
}

sync_out() {  # copy what exists into $OUT (the device tool returns files from there): at most 8 files
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT" 2>/dev/null || return 0
  local f
  for f in "$RESULTS/$STEM.json" "$RESULTS/$STEM.md" "$RESULTS/$STEM.png" "$RESULTS/$STEM-compile.md" \
           "$RESULTS/$STEM-compile.json" "$RESULTS/$STEM-trainer.json"; do
    [ -f "$f" ] && cp -f "$f" "$OUT/" 2>/dev/null
  done
  cp -f "$LOG" "$OUT/$STEM-suite.log" 2>/dev/null
  return 0
}

# stage NAME TIMEOUT CMD...: runs CMD under timeout, output appended to the suite log (and shown)
stage() {
  local name=$1 t=$2; shift 2
  case "$SKIP" in *" $name "*) say "skip $name (HERO_SUITE_SKIP)"; record "$name" 0 0 "skipped by HERO_SUITE_SKIP"; return 0 ;; esac
  if [ "$t" -lt 10 ]; then
    say "skip $name: only ${t}s left of the ${TOTAL}s total"
    record "$name" 124 0 "not run: out of time"
    return 0
  fi
  say "=== $name (timeout ${t}s): $*"
  local s rc
  s=$(date +%s)
  timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local note=""
  [ "$rc" = 124 ] && note="timed out after ${t}s"
  [ "$rc" = 137 ] && note="killed after ${t}s"
  record "$name" "$rc" "$(( $(date +%s) - s ))" "$note"
  say "=== $name: exit $rc after $(( $(date +%s) - s ))s $note"
  sync_out
}

# ------------------------------------------------------------------------------------------------
# setup
# ------------------------------------------------------------------------------------------------
S_SETUP=$(date +%s)
if [ "$DRY" = 1 ]; then
  CHECK='import torch'
else
  CHECK='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
fi
PY=""
for c in "${HERO_PYTHON:-}" python3 "$ROOT/.venv/bin/python" python; do
  [ -n "$c" ] || continue
  command -v "$c" >/dev/null 2>&1 || continue
  if "$c" -c "$CHECK" >/dev/null 2>&1; then PY="$c"; break; fi
done
STEM="suite-$(date -u +%Y%m%d)"
if [ -z "$PY" ]; then
  say "no python with torch$( [ "$DRY" = 1 ] || echo ' and CUDA') found (tried \$HERO_PYTHON, python3, .venv/bin/python, python)"
  record setup 1 "$(( $(date +%s) - S_SETUP ))" "no usable python"
  cp -f "$LOG" "$RESULTS/$STEM-suite.log"; sync_out
  exit 1
fi
say "python: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1))"

# A venv on top of that python: its site-packages (torch, triton, pytest, ...) are linked in through a
# .pth file, so nothing large is installed; carried wheels and the project go into the venv.
VENV="$WORK/venv"
VPY="$PY"
SETUP_NOTE=""
if "$PY" -m venv --without-pip "$VENV" >>"$LOG" 2>&1; then
  VSITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PY" - "$VSITE/_hero_base_site.pth" <<'EOF' >>"$LOG" 2>&1
import site, sys
dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if d]
with open(sys.argv[1], "w") as f:
    f.write("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in dirs) + "\n")
EOF
  if "$VENV/bin/python" -c "$CHECK" >>"$LOG" 2>&1; then
    VPY="$VENV/bin/python"
  else
    SETUP_NOTE="venv does not see torch; using $PY directly"
  fi
else
  SETUP_NOTE="python -m venv failed; using $PY directly"
fi
[ -n "$SETUP_NOTE" ] && say "$SETUP_NOTE"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the project even if the editable install fails
if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  if [ "$VPY" = "$PY" ]; then WHL_TARGET=(--target "$WORK/site"); export PYTHONPATH="$WORK/site:$PYTHONPATH"; else WHL_TARGET=(); fi
  if "$VPY" -m pip install -q --no-index --no-deps --no-cache-dir --no-compile "${WHL_TARGET[@]}" \
      --find-links "$ROOT/.whl" "$ROOT"/.whl/*.whl >>"$LOG" 2>&1; then
    say "installed carried wheels: $(cd "$ROOT/.whl" && ls *.whl | tr '\n' ' ')"
  else
    SETUP_NOTE="$SETUP_NOTE; carried wheels failed to install (see log)"
    say "carried wheels failed to install"
  fi
else
  say "no carried wheels in .whl/ (anchors not installed on the machine are reported as skipped)"
fi
if [ "$VPY" != "$PY" ]; then
  if "$VPY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT" >>"$LOG" 2>&1; then
    say "installed the project (editable)"
  else
    SETUP_NOTE="$SETUP_NOTE; editable install failed, PYTHONPATH used"
    say "editable install failed (see log); PYTHONPATH=$ROOT is used"
  fi
fi
STEM=$("$VPY" - "$DRY" <<'EOF'
import datetime, sys, torch
from benchmarks.common import device_label
dev = torch.device("cuda" if torch.cuda.is_available() and sys.argv[1] != "1" else "cpu")
print(device_label(dev) + "-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d") + ("-dryrun" if sys.argv[1] == "1" else ""))
EOF
) || STEM="suite-$(date -u +%Y%m%d)"
record setup 0 "$(( $(date +%s) - S_SETUP ))" "python $VPY${SETUP_NOTE:+; $SETUP_NOTE}"
say "results: $RESULTS/$STEM.*"
if [ "$DRY" != 1 ]; then
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG"
fi

# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  SIZE="${HERO_SUITE_SIZE:-ci}"
  DEVICE_ARGS=(--device cpu)
  export HERO_KERNELS_NO_CUDA=1
else
  SIZE="${HERO_SUITE_SIZE:-full}"
  DEVICE_ARGS=()
fi
IMPL_ARGS=()
[ -n "${HERO_SUITE_IMPLS:-}" ] && IMPL_ARGS=(--impls "$HERO_SUITE_IMPLS")

T=$(left); [ "$T" -gt 150 ] && T=150
stage build "$T" "$VPY" -c '
from hero_kernels import _cpp_build as b
print("cpu extension:", b.cpu_available(), "| cuda kernels:", b.cuda_available(), "|", b.build_info())
import sys; sys.exit(0 if b.cpu_available() else 1)'

if [ -n "${HERO_SUITE_PYTEST_ARGS:-}" ]; then
  # shellcheck disable=SC2206
  PYTEST_ARGS=($HERO_SUITE_PYTEST_ARGS)
else
  PYTEST_ARGS=(-q -m "not slow" tests)
fi
T=$(( $(left) - 200 )); [ "$T" -gt 120 ] && T=120
stage tests "$T" "$VPY" -m pytest -p no:cacheprovider -o addopts="" "${PYTEST_ARGS[@]}"
grep -E "[0-9]+ (passed|failed|error)" "$LOG" | tail -n 1 > "$WORK/pytest_summary.txt"

# one training step's peak memory, fused LM head vs materialized logits (benchmarks/bench_trainer_memory.py)
if [ -f "$ROOT/benchmarks/bench_trainer_memory.py" ]; then
  if [ "$DRY" = 1 ]; then TRAINER_DEFAULT="--device cpu --vocab 4096 --completion 128"
  else TRAINER_DEFAULT="--device cuda --vocab 128256 --completion 4096"; fi
  T=$(( $(left) - 250 )); [ "$T" -gt 90 ] && T=90
  # shellcheck disable=SC2086
  stage trainer "$T" "$VPY" -m benchmarks.bench_trainer_memory ${HERO_SUITE_TRAINER_ARGS:-$TRAINER_DEFAULT} \
    --json "$RESULTS/$STEM-trainer.json"
fi

# the benchmark gets what is left minus the compile report and finalize; its own budget ends it earlier
T=$(( $(left) - 75 )); [ "$T" -gt 330 ] && T=330
B=$(( T - 45 )); [ "$B" -lt 5 ] && B=5
stage bench "$T" "$VPY" -m benchmarks --size "$SIZE" "${DEVICE_ARGS[@]}" "${IMPL_ARGS[@]}" --out "$RESULTS" \
  --stem "$STEM" --budget-s "$B" --no-progress

NPROC=$(nproc 2>/dev/null || echo 2)
JOBS=$(( NPROC / 2 )); [ "$JOBS" -gt 8 ] && JOBS=8; [ "$JOBS" -lt 1 ] && JOBS=1
T=$(( $(left) - 10 )); [ "$T" -gt 120 ] && T=120
# shellcheck disable=SC2086
stage compile "$T" "$VPY" -m benchmarks.compile_report --out "$RESULTS" --stem "$STEM-compile" --jobs "$JOBS" \
  ${HERO_SUITE_COMPILE_ARGS:-}

record total "$FAILED" "$(elapsed)" "suite wall time"
"$VPY" -m benchmarks.common finalize "$RESULTS/$STEM.json" "$RESULTS/$STEM.md" "$STAGES" \
  "$WORK/pytest_summary.txt" "$RESULTS/$STEM-compile.json" "$RESULTS/$STEM-trainer.json" >>"$LOG" 2>&1 \
  || { say "finalize failed"; FAILED=1; }
say "stages:"
tee -a "$LOG" < "$STAGES"
cp -f "$LOG" "$RESULTS/$STEM-suite.log"
sync_out
say "done in $(elapsed)s: $RESULTS/$STEM.{json,md,png}$( [ -n "${OUT:-}" ] && echo " (copied to \$OUT)")"
[ -f "$RESULTS/$STEM.md" ] && sed -n '/## Headline/,/## Times/p' "$RESULTS/$STEM.md" | head -n 40
exit "$FAILED"
