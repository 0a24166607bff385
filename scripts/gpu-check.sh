#!/usr/bin/env bash
# gpu-check.sh: every check the project runs on a GPU, in one run that fits 8 minutes on one H100.
#
#   bash scripts/gpu-check.sh OUTDIR                  # the four stages below; logs and results into OUTDIR
#   bash scripts/gpu-check.sh --save-results OUTDIR   # ... and copy the benchmark's results to benchmarks/results/
#   bash scripts/gpu-check.sh --carry-list            # the git-ignored paths the run needs beside the work tree
#
# On a lent GPU machine with no registry (the device tool), OUTDIR is $OUT, the folder whose files come back
# (at most 8 files, 2 folders deep: this script writes 7). Prepare here once, from the repository root:
#   bash ../shared/gpu/fetch-carry.sh        # fills the git-ignored .whl/ (wheels, the bmtrain sdist, its build script)
# then call the device tool's run with
#   command: bash scripts/gpu-check.sh "$OUT"      carry: [".whl"]      timeout_s: 540
# then copy the returned t5_11b_gpu.json into benchmarks/results/ and commit it (only $OUT comes back).
#
# Stages, in this order, each in its own process under `timeout`, each writing OUTDIR/<stage>.log as it goes:
#   env        (15 s)  nvidia-smi, Python, torch, CUDA, nvcc, the carried files
#   install    (75 s)  pip-installs .whl/*.whl into GPU_CHECK_SITE, builds bmtrain with .whl/build-bmtrain.sh,
#                      imports what was carried; skipped without .whl/
#   tests     (150 s)  pytest -m "gpu and not emulated" over the files that hold gpu-marked tests (what CI's CUDA
#                      emulation runs is not repeated), each test stopped after GPU_CHECK_TEST_TIMEOUT (90 s) where
#                      pytest-timeout is installed; interrupted before the stage's limit so that OUTDIR/tests.xml
#                      (JUnit XML) is written even then
#   benchmark (230 s)  benchmarks/t5_11b_gpu.py for GPU_CHECK_VARIANTS (OUTDIR/t5_11b_gpu.json, rewritten after
#                      every variant)
# Without a GPU (no nvidia-smi, or torch.cuda.is_available() is False) tests and benchmark are skipped with the
# reason. OUTDIR/summary.json is rewritten before and after every stage: each stage's status (pending, running,
# ok, failed, timeout, skipped), seconds, limit and reason. A stage that fails or times out does not stop the
# later ones. Exit status: 0 when no stage failed or timed out, 1 when one did, 2 for bad arguments.
#
# Environment (all optional):
#   PYTHON                      interpreter (default python3: on the GPU machine the one with torch)
#   GPU_CHECK_WHL               the carried folder (default: .whl at the repository root)
#   GPU_CHECK_SITE              where the wheels and bmtrain are installed (default /tmp/site); put on PYTHONPATH
#   GPU_CHECK_IMPORTS           modules the install stage imports to check it (default: bmtrain deepspeed hydra
#                               model_center.tokenizer)
#   GPU_CHECK_TIMEOUT_ENV, GPU_CHECK_TIMEOUT_INSTALL, GPU_CHECK_TIMEOUT_TESTS, GPU_CHECK_TIMEOUT_BENCHMARK
#                               a stage's limit in seconds (decimals allowed)
#   GPU_CHECK_TOTAL             the whole run's limit in seconds (default 480): a stage never runs past it
#   GPU_CHECK_MARKERS           the tests stage's pytest marker expression (default "gpu and not emulated"; "gpu"
#                               adds the tests CI runs under the CUDA emulation, given the time)
#   GPU_CHECK_VARIANTS          benchmark variants (default: peft bmt fsdp deepspeed-zero3)
#   GPU_CHECK_WARMUP, GPU_CHECK_STEPS, GPU_CHECK_CAP_GB   benchmark warm-up steps (1), timed steps (3), cap (40)
#   BMT_CUDA_ARCHS, BMT_BUILD_JOBS                        passed to build-bmtrain.sh (default architecture 90)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/scripts/gpu-check.sh"
PY=${PYTHON:-python3}
WHL=${GPU_CHECK_WHL:-$ROOT/.whl}
SITE=${GPU_CHECK_SITE:-/tmp/site}
STAGES=(env install tests benchmark)
CARRY=(.whl)
declare -A BUDGET=([env]=15 [install]=75 [tests]=150 [benchmark]=230)
BENCH_JSON=t5_11b_gpu.json
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}

usage() {
    [ -z "${1:-}" ] || echo "gpu-check: error: $1" >&2
    cat >&2 <<EOF
usage: bash scripts/gpu-check.sh [--save-results] OUTDIR
       bash scripts/gpu-check.sh --carry-list
       bash scripts/gpu-check.sh --help
OUTDIR: a writable folder (created if missing) for the logs, summary.json and results; on the GPU machine, \$OUT.
EOF
    exit 2
}

now() { date +%s.%N; }
# arithmetic with decimals (limits may have them): calc 'EXPRESSION' a=1 b=2
calc() {
    local expr=$1 vars=() v
    shift
    for v in "$@"; do vars+=(-v "$v"); done
    awk "${vars[@]}" "BEGIN { print ($expr) }" </dev/null
}

json_str() {
    local s
    s=$(printf '%s' "$1" | tr '\n\t\r' '   ' | tr -d '\000-\037')
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}
json_or_null() { if [ -n "$1" ]; then json_str "$1"; else printf null; fi; }

# ---------------------------------------------------------------------------------------------- stages
# Each runs in a child process of this script (``--stage NAME OUTDIR``), its output going to OUTDIR/NAME.log.

stage_env() {
    echo "== date"; date -u +%Y-%m-%dT%H:%M:%SZ
    echo "== host"; uname -a; echo "cpus: $(nproc)"
    echo "== nvidia-smi"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi || true
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
    else
        echo "(no nvidia-smi on PATH)"
    fi
    echo "== nvcc"; if command -v nvcc >/dev/null 2>&1; then nvcc --version | tail -2; else echo "(no nvcc on PATH)"; fi
    echo "== carried ($WHL)"
    if [ -d "$WHL" ]; then (cd "$WHL" && find . -type f | sort | xargs ls -l); else echo "(none)"; fi
    echo "== python ($PY)"
    "$PY" - <<'EOF'
import importlib.metadata as md
import sys

import torch

print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs")
for name in ("transformers", "peft", "deepspeed", "bmtrain", "model-center", "hydra-core", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
}

stage_install() {
    local failed=() wheels=("$WHL"/*.whl) smoke=0
    [ -n "${GPU_REASON:-}" ] || smoke=1
    echo "== 1/3 pip install ${#wheels[@]} wheels into $SITE"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}"; then
        failed+=("pip install of the carried wheels (is PYTHON the Python they were fetched for? 3.12 by default)")
    fi
    echo "== 2/3 bmtrain"
    if [ -d "$SITE/bmtrain" ]; then
        echo "bmtrain is already in $SITE: not built again"
    elif ! compgen -G "$WHL/sdist/bmtrain-*.tar.gz" >/dev/null; then
        echo "no bmtrain sdist in $WHL/sdist: not built"
    elif [ ! -f "$WHL/build-bmtrain.sh" ]; then
        failed+=("no $WHL/build-bmtrain.sh to build bmtrain with (fetch-carry.sh copies it there)")
    elif ! BMT_SMOKE_GPU=$smoke PYTHON="$PY" bash "$WHL/build-bmtrain.sh" "$WHL/sdist" "$SITE"; then
        failed+=("the bmtrain build (its error is above)")
    fi
    local modules=${GPU_CHECK_IMPORTS:-bmtrain deepspeed hydra model_center.tokenizer}
    echo "== 3/3 importing: $modules"
    # torch first: it loads the NCCL library bmtrain links against
    if ! PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "
import importlib, torch
for name in '$modules'.split():
    module = importlib.import_module(name)
    print(name, getattr(module, '__version__', ''), module.__file__)"; then
        failed+=("importing $modules")
    fi
    if [ ${#failed[@]} -gt 0 ]; then
        local joined
        printf -v joined '%s; ' "${failed[@]}"
        echo "install: FAILED: ${joined%; }"
        return 1
    fi
    echo "install: ok"
}

stage_tests() {
    cd "$ROOT"
    # only the files that hold gpu-marked tests: faster, and no other file's import can stop the collection
    local files options=()
    mapfile -t files < <(grep -rlE 'mark\.gpu\b' tests --include='*.py' | sort)
    [ ${#files[@]} -gt 0 ] || files=(tests)
    # a hung test (a collective waiting forever) fails alone rather than taking the stage's whole limit
    "$PY" -c 'import pytest_timeout' 2>/dev/null && options=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-90}")
    # the gpu tests that CI runs under the CUDA emulation (marked emulated) are left out by default: here what needs
    # the GPU itself (CUDA engines, BMTrain's kernels, memory) and the bmt engine's smoke run against the single
    # engine. pytest is interrupted a little before the stage's limit, so that it still writes its report
    local limit
    limit=$(calc 'l - 12 > 10 ? l - 12 : 10' l="${STAGE_LIMIT:-${BUDGET[tests]}}")
    timeout --signal=INT --kill-after=8 "$limit" \
        "$PY" -m pytest -m "${GPU_CHECK_MARKERS:-gpu and not emulated}" -p no:cacheprovider -v --durations=10 \
        "${options[@]}" --junitxml "$OUTDIR/tests.xml" "${files[@]}"
}

stage_benchmark() {
    cd "$ROOT"
    # the benchmark stops its variants itself a little before this stage's limit, so that it writes its results
    local budget
    budget=$(calc 'b - 15 > 30 ? b - 15 : 30' b="${STAGE_LIMIT:-${BUDGET[benchmark]}}")
    # shellcheck disable=SC2086  # the variants are words
    "$PY" benchmarks/t5_11b_gpu.py --variants ${GPU_CHECK_VARIANTS:-peft bmt fsdp deepspeed-zero3} \
        --warmup "${GPU_CHECK_WARMUP:-1}" --steps "${GPU_CHECK_STEPS:-3}" --cap-gb "${GPU_CHECK_CAP_GB:-40}" \
        --output "$OUTDIR/$BENCH_JSON" --time-budget "$budget"
}

# ---------------------------------------------------------------------------------------------- the driver

declare -A STATUS SECONDS_TAKEN REASON LIMIT

write_summary() {
    local finished=$1 tmp="$OUTDIR/summary.json.tmp" sep="" name
    {
        printf '{\n  "script": "scripts/gpu-check.sh",\n  "started": %s,\n' "$(json_str "$STARTED_AT")"
        printf '  "updated": %s,\n' "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")"
        printf '  "finished": %s,\n' "$finished"
        printf '  "elapsed_seconds": %s,\n' "$(calc 'int(n - s + 0.5)' n="$(now)" s="$T0")"
        printf '  "total_budget_seconds": %s,\n' "$TOTAL"
        printf '  "gpu": %s,\n  "no_gpu_reason": %s,\n' "$(json_or_null "$GPU_NAME")" "$(json_or_null "$GPU_REASON")"
        printf '  "python": %s,\n  "stages": [' "$(json_str "$PY")"
        for name in "${STAGES[@]}"; do
            printf '%s\n    {"stage": "%s", "status": "%s", "seconds": %s, "budget_seconds": %s, ' \
                "$sep" "$name" "${STATUS[$name]}" "${SECONDS_TAKEN[$name]:-null}" "${LIMIT[$name]}"
            printf '"reason": %s, "log": "%s.log"}' "$(json_or_null "${REASON[$name]:-}")" "$name"
            sep=","
        done
        printf '\n  ]\n}\n'
    } >"$tmp" && mv "$tmp" "$OUTDIR/summary.json"
}

# run_stage NAME SKIP_REASON: run stage NAME under its limit, or record why it is skipped
run_stage() {
    local name=$1 skip=$2 left limit started rc
    left=$(calc 'int((t - (n - s)) * 100) / 100' t="$TOTAL" n="$(now)" s="$T0")
    limit=$(calc 'l < b ? l : b' l="$left" b="${LIMIT[$name]}")
    # a stage would get a useless sliver of time when less than 5 s (or its own limit) is left of the run
    if [ -z "$skip" ] && [ "$(calc 'l < 5 && l < b' l="$left" b="${LIMIT[$name]}")" = 1 ]; then
        skip="no time left: ${left} s of the run's ${TOTAL} s remain (GPU_CHECK_TOTAL)"
    fi
    if [ -n "$skip" ]; then
        STATUS[$name]=skipped REASON[$name]=$skip
        echo "gpu-check: $name: skipped ($skip)"
        echo "skipped: $skip" >"$OUTDIR/$name.log"
        write_summary false
        return 0
    fi
    echo "gpu-check: $name: running (limit $limit s)"
    STATUS[$name]=running
    write_summary false
    started=$(now)
    set +e
    GPU_REASON=$GPU_REASON STAGE_LIMIT=$limit timeout --kill-after=10 "$limit" \
        bash "$SELF" --stage "$name" "$OUTDIR" >"$OUTDIR/$name.log" 2>&1 </dev/null
    rc=$?
    set -e
    SECONDS_TAKEN[$name]=$(calc 'int((n - s) * 10 + 0.5) / 10' n="$(now)" s="$started")
    case $rc in
        0) STATUS[$name]=ok ;;
        124 | 137)
            STATUS[$name]=timeout
            REASON[$name]="stopped at its limit of $limit s (GPU_CHECK_TIMEOUT_${name^^}, GPU_CHECK_TOTAL)" ;;
        *)
            STATUS[$name]=failed
            REASON[$name]="exit status $rc; last line of $name.log: $(tail -n 1 "$OUTDIR/$name.log" | cut -c1-300)" ;;
    esac
    echo "gpu-check: $name: ${STATUS[$name]} in ${SECONDS_TAKEN[$name]} s${REASON[$name]:+ (${REASON[$name]})}"
    write_summary false
}

gpu_reason() {
    command -v nvidia-smi >/dev/null 2>&1 || { echo "no GPU: nvidia-smi is not on PATH (no NVIDIA driver)"; return; }
    nvidia-smi -L >/dev/null 2>&1 || { echo "no GPU: nvidia-smi -L fails"; return; }
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1 \
        || echo "no GPU: torch.cuda.is_available() is False for $PY"
}

main() {
    local save=0 args=()
    while [ $# -gt 0 ]; do
        case $1 in
            -h | --help) usage_ok ;;
            --carry-list) carry_list; exit 0 ;;
            --save-results) save=1 ;;
            --stage) [ $# -eq 3 ] || usage "--stage takes NAME OUTDIR"; OUTDIR=$3; "stage_$2"; exit ;;
            -*) usage "unknown option $1" ;;
            *) args+=("$1") ;;
        esac
        shift
    done
    [ ${#args[@]} -eq 1 ] || usage "expected one OUTDIR, got ${#args[@]} arguments${args[*]:+: ${args[*]}}"
    OUTDIR=${args[0]}
    [ ! -e "$OUTDIR" ] || [ -d "$OUTDIR" ] || usage "OUTDIR '$OUTDIR' exists and is not a folder"
    mkdir -p "$OUTDIR" 2>/dev/null || usage "cannot create OUTDIR '$OUTDIR'"
    OUTDIR=$(cd "$OUTDIR" && pwd)
    command -v timeout >/dev/null || usage "the 'timeout' command (GNU coreutils) is missing"
    command -v "$PY" >/dev/null || usage "python '$PY' not found: set PYTHON to the interpreter that has torch"
    # a relative path would break in the stages that change folder (symbolic links kept: a venv's python is one)
    case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac
    case $WHL in /*) ;; *) WHL=$PWD/$WHL ;; esac
    case $SITE in /*) ;; *) SITE=$PWD/$SITE ;; esac
    export PYTHON=$PY GPU_CHECK_WHL=$WHL GPU_CHECK_SITE=$SITE # what the stages' processes read
    for name in "${STAGES[@]}"; do
        local var="GPU_CHECK_TIMEOUT_${name^^}"
        LIMIT[$name]=${!var:-${BUDGET[$name]}}
        [[ ${LIMIT[$name]} =~ ^[0-9]*\.?[0-9]+$ ]] && [ "$(calc 'x > 0' x="${LIMIT[$name]}")" = 1 ] \
            || usage "$var must be a number of seconds above 0, not '${LIMIT[$name]}'"
        LIMIT[$name]=$(calc 'x + 0' x="${LIMIT[$name]}") # as JSON writes numbers (.5 -> 0.5)
        STATUS[$name]=pending
    done
    TOTAL=${GPU_CHECK_TOTAL:-480}
    [[ $TOTAL =~ ^[0-9]*\.?[0-9]+$ ]] || usage "GPU_CHECK_TOTAL must be a number of seconds, not '$TOTAL'"
    TOTAL=$(calc 'x + 0' x="$TOTAL")
    T0=$(now)
    STARTED_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    GPU_NAME="" GPU_REASON=""
    write_summary false 2>/dev/null || usage "OUTDIR '$OUTDIR' is not writable"

    GPU_REASON=$(gpu_reason)
    [ -n "$GPU_REASON" ] || GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
    echo "gpu-check: ${GPU_NAME:-$GPU_REASON}; results in $OUTDIR"

    run_stage env ""
    local no_whl=""
    compgen -G "$WHL/*.whl" >/dev/null \
        || no_whl="no carried wheels in $WHL: run 'bash ../shared/gpu/fetch-carry.sh' from the repository root \
and carry .whl"
    run_stage install "$no_whl"
    # what install put there (or an earlier run on this machine did) is used by the later stages
    [ ! -d "$SITE" ] || export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    run_stage tests "$GPU_REASON"
    run_stage benchmark "$GPU_REASON"
    if [ $save = 1 ]; then
        if [ -f "$OUTDIR/$BENCH_JSON" ]; then
            cp "$OUTDIR/$BENCH_JSON" "$ROOT/benchmarks/results/$BENCH_JSON"
            echo "gpu-check: copied $BENCH_JSON to benchmarks/results/"
        else
            echo "gpu-check: --save-results: no $BENCH_JSON was written, nothing copied"
        fi
    fi
    write_summary true
    for name in "${STAGES[@]}"; do
        case ${STATUS[$name]} in failed | timeout) return 1 ;; esac
    done
}

usage_ok() {
    sed -n '2,/^set -euo/p' "$SELF" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0
}

carry_list() {
    local path
    for path in "${CARRY[@]}"; do
        echo "$path"
        [ -e "$ROOT/$path" ] \
            || echo "gpu-check: $path is missing: run 'bash ../shared/gpu/fetch-carry.sh' from the repository root" >&2
    done
}

main "$@"
