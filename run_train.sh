#!/usr/bin/env bash
# Launch a training job: torchtitan's run_train.sh, plus multi-node and a CPU fallback.
#
#   ./run_train.sh [torchtitan/--fused_ce.* options...]
#
# NGPU          processes per node (default: the visible GPUs; 1 CPU process when there are none)
# CONFIG_FILE   TOML job (default train_configs/debug_model.toml)
# LOG_RANK      local ranks whose output is shown (default 0; e.g. 0,1)
# TRAIN_FILE    python module to run (default parallel.train)
# COMM_MODE     fake_backend | local_tensor: one-process dry run of an NGPU-rank job (1 step)
# NNODES, NODE_RANK, RDZV_ENDPOINT (host:port of node 0), RDZV_ID: multi-node over torchrun's
#               c10d rendezvous; run the same command on every node.
# FUSED_CE_RUN  name of this run's TensorBoard folder under <dump_folder>/tb, to which -fused or
#               -baseline is added (default: start time to the second + the launcher's pid, so runs
#               never share one; give every node the same)
# MAX_RESTARTS  times torchrun restarts the whole group after a rank fails (default 0, torchrun's own);
#               with [checkpoint] enable each restart resumes from the last complete checkpoint
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONFIG_FILE=${CONFIG_FILE:-$here/train_configs/debug_model.toml}
if [[ ! -f "$CONFIG_FILE" ]]; then
    echo "run_train.sh: CONFIG_FILE=$CONFIG_FILE: no such file (relative paths start at $PWD)" >&2
    exit 2
fi
CONFIG_FILE=$(realpath "$CONFIG_FILE")
# The job runs where it was started, as any command-line tool: the TOML's relative paths
# (dump_folder, hf_assets_path, dataset_path) start there. The checkout's code is imported first.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
NGPU=${NGPU:-$(( gpus > 0 ? gpus : 1 ))}
LOG_RANK=${LOG_RANK:-0}
TRAIN_FILE=${TRAIN_FILE:-parallel.train}
COMM_MODE=${COMM_MODE:-}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MAX_RESTARTS=${MAX_RESTARTS:-0}
if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
    echo "run_train.sh: MAX_RESTARTS=$MAX_RESTARTS must be a whole number (torchrun --max-restarts)" >&2
    exit 2
fi
RDZV_ID=${RDZV_ID:-fused_ce}
if (( NNODES > 1 )) && [[ -z "${RDZV_ENDPOINT:-}" ]]; then
    echo "run_train.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port of node 0" >&2
    exit 2
fi
RDZV_ENDPOINT=${RDZV_ENDPOINT:-localhost:0}

# The embedded data sets are local files; never reach for the Hub unless asked to.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export HF_DATASETS_CACHE=${HF_DATASETS_CACHE:-$here/outputs/.hf_datasets_cache}
if (( gpus > 0 )); then
    export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}
fi
export LOG_RANK
# Progress bars redrawn with \r inside torchrun's "[rank0]:" lines are noise, not progress.
export HF_DATASETS_DISABLE_PROGRESS_BARS=${HF_DATASETS_DISABLE_PROGRESS_BARS:-1}
if (( gpus == 0 && NGPU > 1 )); then
    # Without it torchrun prints a banner and gives each process 1 thread; share the cores instead.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NGPU > 1 ? $(nproc) / NGPU : 1 ))}
fi

# Makes the [fused_ce] section known to torchtitan's config parser.
config_args=(--job.config_file "$CONFIG_FILE" --job.custom_config_module=parallel.config)
# Colour codes only on a terminal: piped or redirected logs stay plain text.
[[ -t 1 ]] || config_args+=(--metrics.disable_color_printing)

for arg in "$@"; do
    if [[ "$arg" == -h || "$arg" == --help ]]; then
        # One process, no torchrun: the help without "[rank0]:" on every line; the fused head's
        # options first, then torchtitan's (where they come again, last).
        python3 -m parallel.config --help
        echo
        echo "run_train.sh: every option, torchtitan's and the fused head's (last), as in the TOML:"
        exec python3 -m "$TRAIN_FILE" "${config_args[@]}" "$@"
    fi
done

if [[ -n "$COMM_MODE" ]]; then
    # Like torchtitan's script: the forced flags come last, so they win.
    NGPU=$NGPU LOCAL_RANK=0 exec python3 -m "$TRAIN_FILE" "${config_args[@]}" "$@" \
        --comm.mode="$COMM_MODE" --training.steps=1
fi

if (( MAX_RESTARTS > 0 )); then
    # torchrun's agent keeps one TCPStore for all restarts, and the restarted ranks read the
    # killed ranks' stale addresses from it ("Gloo connectFullMesh failed ... Connection refused";
    # NCCL alike: pytorch/pytorch#135712). Unshared, each attempt's rank 0 hosts a fresh store.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi

# torchrun, except that a refused job ends with its one message and exit code 2 (parallel/launch.py).
exec python3 -m parallel.launch --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NGPU" \
    --rdzv_backend c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="$RDZV_ID" --max-restarts="$MAX_RESTARTS" \
    --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
    -m "$TRAIN_FILE" "${config_args[@]}" "$@"
