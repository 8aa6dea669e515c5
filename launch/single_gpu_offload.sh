#!/usr/bin/env bash
# Train on one GPU with ZeRO-Offload: Adam state and update (stage 3: also the parameters) on the CPU.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/single_gpu_offload.sh [key=value ...]

Trains on one GPU of this machine with the optimizer state (ZeRO-2) or also the parameters
(ZeRO-3) in host memory, for models whose training state does not fit in the GPU:
  deepspeed --include localhost:GPU --master_port MASTER_PORT --module seemore_ds train \
      [--config CONFIG] --deepspeed_config DS_CONFIG run.output_dir=OUTPUT_DIR [key=value ...]
The first run JIT-compiles DeepSpeed's cpu_adam op (a few minutes; cached afterwards).

key=value arguments are config overrides, e.g. train.precision=bf16 train.batch_size=64.

environment (default):
  ZERO_STAGE    2 (ds_configs/zero2_offload.json) or 3 (ds_configs/zero3_offload.json) (2)
  DS_CONFIG     DeepSpeed JSON; replaces the ZERO_STAGE choice
  CONFIG        run YAML (none: the built-in defaults)
  OUTPUT_DIR    run folder (runs/single_gpu_offload)
  GPU           index of the GPU to train on (0)
  MASTER_PORT   rendezvous port; give each job on one machine its own (29500)
  DEEPSPEED     the launcher executable (deepspeed)
  DRY_RUN=1     print the command instead of running it
USAGE
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
stage="${ZERO_STAGE:-2}"
if [[ "${stage}" != 2 && "${stage}" != 3 ]]; then
    echo "error: ZERO_STAGE must be 2 or 3 (offload needs ZeRO stage 2 or 3), got '${stage}'" >&2
    exit 2
fi
cmd=("${DEEPSPEED:-deepspeed}" --include "localhost:${GPU:-0}" --master_port "${MASTER_PORT:-29500}"
     --module seemore_ds train "${config_args[@]}")
cmd+=(--deepspeed_config "${DS_CONFIG:-${repo}/ds_configs/zero${stage}_offload.json}"
      "run.output_dir=${OUTPUT_DIR:-runs/single_gpu_offload}" "$@")

run_or_print "${cmd[@]}"
