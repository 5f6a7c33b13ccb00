#!/usr/bin/env bash
# hero-kernels GPU suite: ONE command for a lent GPU machine with no internet (~7 minutes of device time).
#
#   bash benchmarks/gpu_suite.sh                        # on the GPU machine (default: 420 s at most)
#   HERO_SUITE_DRY_RUN=1 bash benchmarks/gpu_suite.sh   # or --cpu: the same stages on CPU at CI size
#
# Stages, most important first (each under `timeout`; a failed stage is recorded and the next one runs):
#   setup     pick a python whose torch sees CUDA (the machine's own: never installs torch), make a venv on
#             top of it (its site-packages linked in), install carried wheels from .whl/ (no index) and the
#             project (pip install --no-deps --no-build-isolation -e .; PYTHONPATH fallback)
#   build     build + load the C++/CUDA extension once (cached for the later stages)
#   checks    python -m benchmarks.device_checks: both ops, triton + cuda, vs the float64 reference
#             (V=151936, odd V, strided views, in-place backward, bias, masked rows, temperature), ~60 s
#   timings   python -m benchmarks.kernel_timings: CUDA-event times of the fused head's forward and backward,
#             per-kernel device times beside the roofline model and beside cuBLAS GEMMs of the same shape
#             (plus hero_loss's 3-GEMM training path, impl cuda, at the fused head's shape)
#   bench     python -m benchmarks --ops entropy_logprob,linear_entropy_logprob --impls
#             ours,eager,compile,liger,cce (size full), with a time budget so the stage ends in time
#   tests     pytest on the device-relevant files (CUDA row-kernel tests, the Triton op files, the harness)
#   trainer   python -m benchmarks.bench_trainer_memory at 8192 completion tokens, if time is left
#   finalize  merge stage results, device checks, kernel timings and the pytest summary into the result
# The compile report is NOT in the device window: it needs no GPU (make compile-report).
# Output: benchmarks/results/<gpu>-<date>.{json,md,png}, <gpu>-<date>-kernels.json, <gpu>-<date>-trainer.json,
# <gpu>-<date>-suite.log; copied into $OUT (when set) after every stage, so a run cut short still returns them.
#
# Environment (all optional):
#   HERO_PYTHON           python to use (default: first of python3, .venv/bin/python whose torch fits)
#   HERO_SUITE_TOTAL      seconds for the whole suite (default 420); later stages get what is left
#   HERO_SUITE_RESULTS    results folder (default benchmarks/results)
#   HERO_SUITE_SIZE       benchmark size (default full on GPU, ci on CPU)
#   HERO_SUITE_OPS        benchmark ops (default entropy_logprob,linear_entropy_logprob)
#   HERO_SUITE_IMPLS      benchmark impls (default ours,eager,compile,liger,cce)
#   HERO_SUITE_PYTEST_ARGS  replaces the pytest arguments of the tests stage
#   HERO_SUITE_TRAINER_ARGS arguments of bench_trainer_memory (default GPU: --device cuda --vocab 128256
#                         --completion 8192; CPU: --device cpu --vocab 4096 --completion 128)
#   HERO_SUITE_SKIP       space-separated stages to skip (build checks timings bench tests trainer)
# Exit status: 0 when every stage passed, 1 otherwise (the results are written either way).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT="$(pwd)"

DRY="${HERO_SUITE_DRY_RUN:-0}"
for a in "$@"; do
  case "$a" in
    --cpu|--dry-run) DRY=1 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a (use --cpu or --help)" >&2; exit 2 ;;
  esac
done

T0=$(date +%s)
TOTAL="${HERO_SUITE_TOTAL:-420}"
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
  for f in "$RESULTS/$STEM.json" "$RESULTS/$STEM.md" "$RESULTS/$STEM.png" "$RESULTS/$STEM-kernels.json" \
           "$RESULTS/$STEM-checks.json" "$RESULTS/$STEM-trainer.json"; do
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
IMPL_ARGS=(--impls "${HERO_SUITE_IMPLS:-ours,eager,compile,liger,cce}" \
           --ops "${HERO_SUITE_OPS:-entropy_logprob,linear_entropy_logprob}")

T=$(( $(left) - 240 )); [ "$T" -gt 120 ] && T=120
# on the GPU a CUDA build that fell back to the CPU-only extension fails the stage (the later stages still run,
# reporting impl="cuda" unavailable): the reason is printed on its own line
stage build "$T" "$VPY" -c '
import os, sys
from hero_kernels import _cpp_build as b
print("cpu extension:", b.cpu_available(), "| cuda kernels:", b.cuda_available(), "|", b.build_info())
want_cuda = os.environ.get("HERO_KERNELS_NO_CUDA") != "1"
if want_cuda and not b.cuda_available():
    print("CUDA extension unavailable:", b.cuda_build_error())
sys.exit(0 if b.cpu_available() and (b.cuda_available() or not want_cuda) else 1)'

# 1. correctness on the device, both ops, every GPU backend (CPU dry run: the torch and cpu backends)
if [ "$DRY" = 1 ]; then CHECK_ARGS=(--device cpu --impls torch,cpu --small); else CHECK_ARGS=(); fi
T=$(( $(left) - 200 )); [ "$T" -gt 120 ] && T=120
stage checks "$T" "$VPY" -m benchmarks.device_checks "${CHECK_ARGS[@]}" --json "$RESULTS/$STEM-checks.json"

# 2. CUDA-event and per-kernel times of the two ops at the headline shapes, beside the model and cuBLAS
if [ "$DRY" = 1 ]; then
  say "skip timings: needs CUDA (dry run)"; record timings 0 0 "skipped: needs CUDA (dry run)"
else
  T=$(( $(left) - 150 )); [ "$T" -gt 90 ] && T=90
  stage timings "$T" "$VPY" -m benchmarks.kernel_timings --json "$RESULTS/$STEM-kernels.json"
fi

# 3. the two core ops against the anchors; its own budget ends it before the stage timeout
T=$(( $(left) - 60 )); [ "$T" -gt 180 ] && T=180
B=$(( T - 40 )); [ "$B" -lt 5 ] && B=5
stage bench "$T" "$VPY" -m benchmarks --size "$SIZE" "${DEVICE_ARGS[@]}" "${IMPL_ARGS[@]}" --out "$RESULTS" \
  --stem "$STEM" --budget-s "$B" --no-progress

# 4. pytest on the files that exercise the device (GPU-marked tests first: they are short)
# (dry run: a quick CPU subset; the Triton files would run in the interpreter for minutes)
[ "$DRY" = 1 ] && [ -z "${HERO_SUITE_PYTEST_ARGS:-}" ] && \
  HERO_SUITE_PYTEST_ARGS="-q tests/test_benchmarks.py -k roofline"
if [ -n "${HERO_SUITE_PYTEST_ARGS:-}" ]; then
  # shellcheck disable=SC2206
  PYTEST_ARGS=($HERO_SUITE_PYTEST_ARGS)
  T=$(( $(left) - 20 )); [ "$T" -gt 120 ] && T=120
  stage tests "$T" "$VPY" -m pytest -p no:cacheprovider -o addopts="" "${PYTEST_ARGS[@]}"
else
  T=$(( $(left) - 20 )); [ "$T" -gt 120 ] && T=120
  # Cheapest first, each pytest run printing its own summary (a stage cut short still says what passed): the
  # CUDA row-kernel tests (seconds), the Triton op files (a first compile of every dtype / odd-V build), then
  # the harness at size tiny over all six ops with the anchors (torch.compile and the anchors' own Triton
  # builds: the longest, and the bench stage already ran the harness on this GPU).
  stage tests "$T" bash -c 'py=$1; r=0
    t() { "$py" -m pytest -p no:cacheprovider -o addopts="" -q "$@"; c=$?; [ $c = 0 ] || [ $c = 5 ] || r=$c; }
    t -m "gpu and not slow" tests/test_cpu_backend.py tests/test_cuda_compile.py
    t -x -m "not slow" tests/test_triton_entropy_logprob.py tests/test_linear_entropy_logprob.py
    t -m "gpu and not slow" tests/test_benchmarks.py
    exit $r' _ "$VPY"
fi
grep -E "[0-9]+ (passed|failed|error)" "$LOG" | tail -n 3 | tr '\n' ' ' > "$WORK/pytest_summary.txt"

# 5. one long-CoT training step's peak memory, fused LM head vs materialized logits, if time is left
if [ -f "$ROOT/benchmarks/bench_trainer_memory.py" ]; then
  if [ "$DRY" = 1 ]; then TRAINER_DEFAULT="--device cpu --vocab 4096 --completion 128"
  else TRAINER_DEFAULT="--device cuda --vocab 128256 --completion 8192"; fi
  T=$(( $(left) - 10 )); [ "$T" -gt 90 ] && T=90
  # shellcheck disable=SC2086
  stage trainer "$T" "$VPY" -m benchmarks.bench_trainer_memory ${HERO_SUITE_TRAINER_ARGS:-$TRAINER_DEFAULT} \
    --json "$RESULTS/$STEM-trainer.json"
fi

record total "$FAILED" "$(elapsed)" "suite wall time"
"$VPY" -m benchmarks.common finalize "$RESULTS/$STEM.json" "$RESULTS/$STEM.md" "$STAGES" \
  "$WORK/pytest_summary.txt" "" "$RESULTS/$STEM-trainer.json" "$RESULTS/$STEM-checks.json" \
  "$RESULTS/$STEM-kernels.json" >>"$LOG" 2>&1 \
  || { say "finalize failed"; FAILED=1; }
say "stages:"
tee -a "$LOG" < "$STAGES"
cp -f "$LOG" "$RESULTS/$STEM-suite.log"
sync_out
say "done in $(elapsed)s: $RESULTS/$STEM.{json,md,png}$( [ -n "${OUT:-}" ] && echo " (copied to \$OUT)")"
[ -f "$RESULTS/$STEM.md" ] && sed -n '/^## \(Headline\|Smoke\)/,/## Times/p' "$RESULTS/$STEM.md" | head -n 40
exit "$FAILED"
