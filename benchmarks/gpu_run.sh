#!/usr/bin/env bash
# The ONE command to run on the device machine (run from the repository root, .gpu-wheels carried).
#
#   bash benchmarks/gpu_run.sh kernel   # 1 GPU : pytest -m gpu, kernel/bench.py (4 shapes), --options, --sweep, --profile
#                                       #         (SKIP_GEMM=0 first: kernel/gemm.py, the epilogue GEMM's configurations)
#                                       #         (steps bounded to 240+170+70+180+90 s; expected ~200+120+35+105+40 s: set BUDGET_S)
#   bash benchmarks/gpu_run.sh multi    # 2 GPUs: pytest -m multigpu, vocab-parallel bench (torchrun), e2e/bench.py
#   bash benchmarks/gpu_run.sh e2e      # 2 GPUs: e2e/bench.py only, the three cases multi leaves out (multi + e2e = all six)
#   bash benchmarks/gpu_run.sh maxseq   # 1 GPU : e2e/bench.py --max-seq (longest seq_len, baseline vs fused)
#   bash benchmarks/gpu_run.sh multi4   # 4 GPUs (nvidia-h200-x4): e2e/bench.py fsdp2_tp2,fsdp2_cp2,tp2_cp2,hsdp
#   bash benchmarks/gpu_run.sh families # 1 GPU : pytest -m gpu, then each family's real-vocabulary config:
#                                       #         e2e/bench.py --cases single per config in FAMILY_CONFIGS
#   bash benchmarks/gpu_run.sh search   # 1 GPU : e2e/bench.py --search, narrowed by SEARCH_ARGS
#   bash benchmarks/gpu_run.sh resume   # 1 GPU : e2e/kill_resume.py, llama3_1b fused: the rank SIGKILLed in step 5, torchrun
#                                       #         restarts it from the step-3 checkpoint; losses vs an uninterrupted run
#                                       #         within 1e-5 (~4 min; dump folders in /tmp/kill_resume, logs in $OUT)
#
# Every step's output is tee'd to $OUT/<step>.log; a failing step never aborts the script; a table of
# return codes and the benchmark tables are printed last; the per-run folders under $OUT are packed
# into $OUT/run_logs.tgz at the end (few files come back from the device). Knobs (environment variables):
#   BUDGET_S        whole-script budget in seconds (default 540 = 9 min); later steps get what is left
#   PYTEST_TIMEOUT  per pytest step (default 150; kernel mode: PYTEST_TIMEOUT_KERNEL, default 240: the whole -m gpu suite ran ~200 s)
#   PYTEST_PATHS    kernel and families modes' test paths (default tests; e.g. tests/kernel/test_fp32_statistics.py)      PYTEST_MULTI_MARK (multi: -m expression, default multigpu)      SKIP_PYTEST=1 / SKIP_BENCH=1 / SKIP_OPTIONS=1 / SKIP_SWEEP=1 / SKIP_PROFILE=1 / SKIP_E2E=1
#   BENCH_ARGS      extra args for kernel/bench.py default run (e.g. "--impls fused,compile,floor --reps 5", "--inputs random")
#   OPTIONS_ARGS    extra args for kernel/bench.py --options (e.g. "--shapes 8192x2304x256000")
#   SWEEP_ARGS      extra args for kernel/bench.py --sweep (e.g. "--sweep-impls fused,compile,liger")
#   PROFILE_ARGS    extra args for kernel/bench.py --profile (e.g. "--shapes 8192x4096x128256 --reps 3")
#   BENCH_TIMEOUT / OPTIONS_TIMEOUT / SWEEP_TIMEOUT / PROFILE_TIMEOUT  kernel mode's step bounds (170 / 70 / 180 / 90)
#   VP_ARGS         extra args for the vocab-parallel run (e.g. "--vp-shapes 8192x4096x128256")
#   E2E_CASES       (multi default: fsdp2,tp2,cp2; e2e default: fsdp2_reshard_always,fsdp2_accum2,fsdp2_compile;
#                   multi4 default: fsdp2_tp2,fsdp2_cp2,tp2_cp2,hsdp = 8 runs: if 9 min is not enough for all,
#                   split: E2E_CASES=fsdp2_tp2,fsdp2_cp2 then E2E_CASES=tp2_cp2,hsdp)
#   E2E_STEPS       (default 20)
#   E2E_FUSED_FLAG  families: the fused run's options (default --fused_ce.enable; e.g.
#                   "--fused_ce.enable --fused_ce.fp32_statistics")
#   E2E_TIMEOUT     per training run (default 300)     E2E_ARGS extra args for e2e/bench.py (e.g. "--noise-ref",
#                   "--seqs 32768,65536,131072" for maxseq, "--pairs 3" for alternating baseline/fused
#                   pairs). Per-run dump folders (tb, traces) go to /tmp/e2e_dumps on the device, not $OUT
#                   (too many files to bring back).
#   RESUME_ARGS     more run_train.sh options for resume (default seq_len 4096; e.g. "--training.seq_len 8192")
#   RESUME_CONFIG   resume's config (default train_configs/llama3_1b.toml; the debug model tries the mode on CPU)
#   NO_APPEND=1     do not append to benchmarks/log/results.md (the raw log; RESULTS.md is the curated page)
#   GIT_COMMIT      the commit the results blocks name (the device copy may have no .git)
set -u
MODE="${1:-kernel}"
shift || true
cd "$(dirname "$0")/.." || exit 1
ROOT="$PWD"
OUT="${OUT:-$ROOT/outputs/gpu_run}"
mkdir -p "$OUT"
T0=$(date +%s)
BUDGET_S="${BUDGET_S:-540}"
PYTEST_TIMEOUT="${PYTEST_TIMEOUT:-150}"
APPEND=""
[ "${NO_APPEND:-0}" = "1" ] && APPEND="--no-append"
# never unset the machine's NVLink-multicast guards
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}" NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"

STEPS=()
RCS=()
SECS=()

left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }

# run_step NAME TIMEOUT_S CMD... : tee to $OUT/NAME.log, bounded by min(TIMEOUT_S, budget left)
run_step() {
    local name="$1" tmo="$2"
    shift 2
    local l
    l=$(left)
    if [ "$l" -lt 20 ]; then
        echo "=== [$name] skipped: budget spent ($BUDGET_S s)" | tee "$OUT/$name.log"
        STEPS+=("$name"); RCS+=("skip"); SECS+=(0)
        return 0
    fi
    [ "$tmo" -gt "$l" ] && tmo="$l"
    echo "=== [$name] $(date -u +%H:%M:%S) timeout ${tmo}s: $*"
    local s=$(date +%s)
    timeout --signal=TERM --kill-after=20 "$tmo" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    local d=$(( $(date +%s) - s ))
    [ "$rc" = "124" ] && rc="124(timeout)"
    case "$name" in pytest_*) [ "$rc" = "5" ] && rc="5(no tests collected)" ;; esac
    echo "=== [$name] rc=$rc in ${d}s"
    STEPS+=("$name"); RCS+=("$rc"); SECS+=("$d")
}

# ---------------------------------------------------------------------------------- setup
setup() {
    local s=$(date +%s)
    {
        echo "mode=$MODE date=$(date -u +%FT%TZ) host=$(hostname)"
        nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
        if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
            # flock: two copies of this script on two GPUs of one host (CUDA_VISIBLE_DEVICES) share /tmp/site
            flock /tmp/gpu-wheels.lock python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu-wheels/*.whl
            echo "pip rc=$?"
        else
            echo "WARNING: no .gpu-wheels/*.whl (carry .gpu-wheels); liger/cce/torchtitan will be n/a"
        fi
    } 2>&1 | tee "$OUT/setup.log"
    export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
    python3 - <<'EOF' 2>&1 | tee -a "$OUT/setup.log"
import torch, importlib
from importlib.metadata import version
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
for p in ("triton", "liger_kernel", "cut_cross_entropy", "torchtitan", "torchdata", "tyro", "datasets"):
    try:
        print(p, version(p))
    except Exception as e:
        print(p, "MISSING", type(e).__name__)
try:
    import fused_loss
    print("fused_loss ok:", [n for n in ("fused_linear_cross_entropy", "FusedLinearCrossEntropy") if hasattr(fused_loss, n)])
except Exception as e:
    print("fused_loss import FAILED:", repr(e))
EOF
    STEPS+=("setup"); RCS+=("0"); SECS+=($(( $(date +%s) - s )))
}

last_table() {  # print the last Markdown table of a log (the benchmark scripts print it last)
    [ -f "$1" ] || return 0
    awk '/^\|/{ if (!intable) { buf=""; intable=1 } buf = buf $0 "\n"; next } { if (intable) { last=buf; intable=0 } }
         END { if (intable) last=buf; printf "%s", last }' "$1"
}

summary() {
    echo
    echo "==================== summary ($MODE, $(( $(date +%s) - T0 ))s, logs in $OUT) ===================="
    for f in "$@"; do
        if [ -f "$OUT/$f.log" ]; then
            echo "--- $f"
            last_table "$OUT/$f.log"
        fi
    done
    for f in "$OUT"/pytest_*.log; do
        [ -f "$f" ] && echo "--- $(basename "$f" .log): $(grep -E '(passed|failed|error|skipped|no tests ran)' "$f" | tail -1)"
    done
    echo
    echo "| step | rc | seconds |"
    echo "|---|---|---|"
    local i
    for i in "${!STEPS[@]}"; do
        echo "| ${STEPS[$i]} | ${RCS[$i]} | ${SECS[$i]} |"
    done
    cp -f benchmarks/log/results.md "$OUT/results.md" 2>/dev/null || true
    # The device brings back only a few files from $OUT: the per-run folders (one log per
    # training run) travel as one archive (a search's 20 run logs were lost otherwise).
    local runs=()
    local d
    for d in "$OUT"/*/; do [ -d "$d" ] && runs+=("$(basename "$d")"); done
    if [ "${#runs[@]}" -gt 0 ] && tar -czf "$OUT/run_logs.tgz" -C "$OUT" "${runs[@]}"; then
        (cd "$OUT" && rm -rf "${runs[@]}")
        echo "per-run logs: $OUT/run_logs.tgz (${runs[*]})"
    fi
}

setup

case "$MODE" in
kernel)
    # each step bounded, so a slow one never eats the rest (all four: at most 540 s = BUDGET_S)
    if [ "${SKIP_GEMM:-1}" != "1" ]; then
        # one chunk, path against path: the epilogue GEMM's tile configurations against cuBLAS
        # shellcheck disable=SC2086
        run_step bench_gemm "${GEMM_TIMEOUT:-150}" python3 -m benchmarks.kernel.gemm ${GEMM_ARGS:-}
    fi
    if [ "${SKIP_PYTEST:-0}" != "1" ]; then
        # shellcheck disable=SC2086
        run_step pytest_gpu "${PYTEST_TIMEOUT_KERNEL:-240}" python3 -m pytest -m gpu ${PYTEST_PATHS:-tests} -q --maxfail=5 \
            --junitxml="$OUT/pytest_gpu.xml" -p no:cacheprovider
    fi
    if [ "${SKIP_BENCH:-0}" != "1" ]; then
        # the 4 shapes x 9 impls, errors vs fp64 on random and LM-like inputs
        # shellcheck disable=SC2086
        run_step bench_kernel "${BENCH_TIMEOUT:-170}" python3 -m benchmarks.kernel.bench $APPEND ${BENCH_ARGS:-}
    fi
    if [ "${SKIP_OPTIONS:-0}" != "1" ]; then
        # each option's cost at the 8B head, off and on
        # shellcheck disable=SC2086
        run_step bench_options "${OPTIONS_TIMEOUT:-70}" python3 -m benchmarks.kernel.bench --options $APPEND ${OPTIONS_ARGS:-}
    fi
    if [ "${SKIP_SWEEP:-0}" != "1" ]; then
        # 13 points, fused vs compile, the plan's prediction, fp64 errors of fused and eager
        # shellcheck disable=SC2086
        run_step bench_sweep "${SWEEP_TIMEOUT:-180}" python3 -m benchmarks.kernel.bench --sweep $APPEND ${SWEEP_ARGS:-}
    fi
    if [ "${SKIP_PROFILE:-0}" != "1" ]; then
        # where the time goes at the sweep's points slower than torch.compile (or PROFILE_ARGS="--shapes ...")
        # shellcheck disable=SC2086
        run_step bench_profile "${PROFILE_TIMEOUT:-90}" python3 -m benchmarks.kernel.bench --profile $APPEND ${PROFILE_ARGS:-}
    fi
    summary bench_gemm bench_kernel bench_options bench_sweep bench_profile
    ;;
multi)
    if [ "${SKIP_PYTEST:-0}" != "1" ]; then
        run_step pytest_multigpu "$PYTEST_TIMEOUT" python3 -m pytest -m "${PYTEST_MULTI_MARK:-multigpu}" tests -q --maxfail=5 \
            --junitxml="$OUT/pytest_multigpu.xml" -p no:cacheprovider
    fi
    if [ "${SKIP_BENCH:-0}" != "1" ]; then
        # shellcheck disable=SC2086
        run_step bench_vocab_parallel 180 torchrun --standalone --nproc_per_node 2 \
            -m benchmarks.kernel.bench --vocab-parallel $APPEND ${VP_ARGS:-}
    fi
    if [ "${SKIP_E2E:-0}" != "1" ]; then
        # shellcheck disable=SC2086
        run_step e2e "$(left)" python3 -m benchmarks.e2e.bench --cases "${E2E_CASES:-fsdp2,tp2,cp2}" \
            --steps "${E2E_STEPS:-20}" --timeout "${E2E_TIMEOUT:-300}" --budget "$(( $(left) - 60 ))" \
            --out "$OUT/e2e" --dump-root /tmp/e2e_dumps $APPEND ${E2E_ARGS:-}
    fi
    summary bench_vocab_parallel e2e
    ;;
e2e)
    # shellcheck disable=SC2086
    run_step e2e "$(left)" python3 -m benchmarks.e2e.bench \
        --cases "${E2E_CASES:-fsdp2_reshard_always,fsdp2_accum2,fsdp2_compile}" \
        --steps "${E2E_STEPS:-20}" --timeout "${E2E_TIMEOUT:-300}" --budget "$(( $(left) - 60 ))" \
        --out "$OUT/e2e" --dump-root /tmp/e2e_dumps $APPEND ${E2E_ARGS:-}
    summary e2e
    ;;
multi4)
    ngpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ "${ngpus:-0}" -lt 4 ]; then
        echo "WARNING: multi4 needs 4 GPUs (nvidia-h200-x4); this machine shows ${ngpus:-0}: the runs will fail"
    fi
    # shellcheck disable=SC2086
    run_step e2e "$(left)" python3 -m benchmarks.e2e.bench --cases "${E2E_CASES:-fsdp2_tp2,fsdp2_cp2,tp2_cp2,hsdp}" \
        --steps "${E2E_STEPS:-20}" --timeout "${E2E_TIMEOUT:-300}" --budget "$(( $(left) - 60 ))" \
        --out "$OUT/e2e" --dump-root /tmp/e2e_dumps $APPEND ${E2E_ARGS:-}
    summary e2e
    ;;
maxseq)
    # shellcheck disable=SC2086
    run_step e2e_maxseq "$(left)" python3 -m benchmarks.e2e.bench --max-seq --timeout "${E2E_TIMEOUT:-240}" \
        --budget "$(( $(left) - 60 ))" \
        --out "$OUT/e2e_maxseq" --dump-root /tmp/e2e_dumps $APPEND ${E2E_ARGS:-}
    summary e2e_maxseq
    ;;
families)
    # each family's one-GPU real-vocabulary config, baseline vs fused (GPU tests first)
    if [ "${SKIP_PYTEST:-0}" != "1" ]; then
        # shellcheck disable=SC2086
        run_step pytest_gpu "$PYTEST_TIMEOUT" python3 -m pytest -m gpu ${PYTEST_PATHS:-tests} -q --maxfail=5 \
            --junitxml="$OUT/pytest_gpu.xml" -p no:cacheprovider
    fi
    for cfg in ${FAMILY_CONFIGS:-llama3_1b qwen3_1.7b llama4_1bx8e deepseek_v3_1b gpt_oss_1b}; do
        # shellcheck disable=SC2086
        run_step "e2e_$cfg" "$(left)" python3 -m benchmarks.e2e.bench --cases single \
            --config "train_configs/$cfg.toml" --steps "${E2E_STEPS:-20}" \
            --fused-flag "${E2E_FUSED_FLAG:---fused_ce.enable}" \
            --timeout "${E2E_TIMEOUT:-240}" --budget "$(( $(left) - 30 ))" \
            --out "$OUT/e2e_$cfg" --dump-root /tmp/e2e_dumps $APPEND ${E2E_ARGS:-}
    done
    summary $(for cfg in ${FAMILY_CONFIGS:-llama3_1b qwen3_1.7b llama4_1bx8e deepseek_v3_1b gpt_oss_1b}; do echo "e2e_$cfg"; done)
    ;;
search)
    # the fastest setting under each memory cap, baseline vs fused (split across calls:
    # a full sweep is up to 120 runs; e.g. SEARCH_ARGS="--caps 80 --search-compile on --search-batches 1,2,4")
    # shellcheck disable=SC2086
    run_step e2e_search "$(left)" python3 -m benchmarks.e2e.bench --search --steps "${E2E_STEPS:-15}" \
        --timeout "${E2E_TIMEOUT:-240}" --budget "$(( $(left) - 30 ))" \
        --out "$OUT/e2e_search" --dump-root /tmp/e2e_dumps $APPEND ${SEARCH_ARGS:-} ${E2E_ARGS:-}
    summary e2e_search
    ;;
resume)
    # a 15 GB checkpoint (fp32 weights + AdamW moments of 1.24B parameters) at step 3, a model-only
    # one at step 6: on the device's disk, not under $OUT
    # shellcheck disable=SC2086
    run_step kill_resume "$(left)" python3 -m benchmarks.e2e.kill_resume --out "$OUT/kill_resume" \
        --dump-root /tmp/kill_resume --config "${RESUME_CONFIG:-train_configs/llama3_1b.toml}" --ngpu 1 --kill-rank 0 \
        --steps 6 --interval 3 --kill-after 4 --tol 1e-5 --timeout "${E2E_TIMEOUT:-200}" -- \
        --fused_ce.enable --metrics.log_freq 1 --debug.deterministic --debug.seed 42 \
        --training.seq_len 4096 ${RESUME_ARGS:-}
    summary kill_resume
    ;;
*)
    echo "usage: $0 kernel|multi|e2e|maxseq|multi4|families|search|resume" >&2
    exit 2
    ;;
esac
# exit status: 0 if every step returned 0
for rc in "${RCS[@]}"; do
    case "$rc" in 0|skip|5*) ;; *) exit 1 ;; esac
done
exit 0
