#!/usr/bin/env bash
# Train on this machine's CPU with the engine-free backend: one process, DeepSpeed never imported.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/cpu_debug.sh [key=value ...]

Runs the engine-free training loop on the CPU in one process; deepspeed is never imported, so a
problem here is in the model, data or config, not in the engine or the launcher:
  python -m seemore_ds train [--config CONFIG] train.backend=torch train.device=cpu run.output_dir=OUTPUT_DIR [key=value ...]

key=value arguments are config overrides, e.g. train.max_steps=20 log.every=1.

environment (default):
  CONFIG        run YAML (none: the built-in defaults)
  OUTPUT_DIR    run folder (runs/cpu_debug)
  PYTHON        the Python that has seemore-ds' requirements (python3)
  DRY_RUN=1     print the command instead of running it
USAGE
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cmd=("${PYTHON:-python3}" -m seemore_ds train "${config_args[@]}"
     train.backend=torch train.device=cpu "run.output_dir=${OUTPUT_DIR:-runs/cpu_debug}" "$@")

run_or_print "${cmd[@]}"
