#!/usr/bin/env bash
# Train on every node of a hostfile through DeepSpeed's launcher.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: launch/multinode.sh [key=value ...]

Starts `python -m seemore_ds train` on every node of HOSTFILE with DeepSpeed's launcher:
  deepspeed --hostfile HOSTFILE --master_addr MASTER_ADDR --master_port MASTER_PORT --launcher LAUNCHER \
      --module seemore_ds train [--config CONFIG] --deepspeed_config DS_CONFIG run.output_dir=OUTPUT_DIR [key=value ...]
Run it on the first node (pdsh reaches the others by passwordless ssh), or, without ssh, on every
node with NODE_RANK set (0 on the node of the hostfile's first line, 1 on the second, ...).
The repository must sit at the same path on every node; relative paths are read from the
current folder on every node. Variables for the other nodes go in .deepspeed_env (see
launch/deepspeed_env.example).

key=value arguments are config overrides, e.g. train.max_steps=500 train.batch_size=16.

environment (default):
  HOSTFILE      required: hostfile, one 'HOST slots=N' line per node (see hostfiles/example);
                checked with python -m seemore_ds hostfile check first
  CONFIG        run YAML (none: the built-in defaults)
  DS_CONFIG     DeepSpeed JSON (ds_configs/zero2.json)
  OUTPUT_DIR    run folder (runs/multinode); on storage every node sees, or set
                checkpoint.use_node_local_storage=true
  MASTER_ADDR   address of node 0 that every node can reach (the hostfile's first host)
  MASTER_PORT   rendezvous port on node 0 (29500)
  LAUNCHER      pdsh, openmpi, mvapich, mpich, impi or slurm (pdsh)
  NODE_RANK     start only this node, without ssh (--no_ssh --node_rank NODE_RANK)
  DS_ARGS       more launcher options, e.g. "--ssh_port 2222" or "--num_nodes 2"
  DEEPSPEED     the launcher executable (deepspeed)
  DRY_RUN=1     print the command instead of running it
USAGE
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [[ -z "${HOSTFILE:-}" ]]; then
    echo "error: set HOSTFILE to the hostfile of your nodes, e.g. HOSTFILE=hostfiles/mine (see hostfiles/example)" >&2
    exit 2
fi
hostfile="${HOSTFILE}"
python3 -m seemore_ds hostfile check "${hostfile}" >&2
# Node 0 is the hostfile's first host: a name every node resolves is a valid rendezvous address.
first_host="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "${hostfile}")"

cmd=("${DEEPSPEED:-deepspeed}" --hostfile "${hostfile}"
     --master_addr "${MASTER_ADDR:-${first_host}}" --master_port "${MASTER_PORT:-29500}"
     --launcher "${LAUNCHER:-pdsh}")
if [[ -n "${NODE_RANK:-}" ]]; then
    cmd+=(--no_ssh --node_rank "${NODE_RANK}")
fi
read -r -a extra_launcher_args <<< "${DS_ARGS:-}"
cmd+=("${extra_launcher_args[@]}" --module seemore_ds train "${config_args[@]}")
cmd+=(--deepspeed_config "${DS_CONFIG:-${repo}/ds_configs/zero2.json}" "run.output_dir=${OUTPUT_DIR:-runs/multinode}" "$@")

run_or_print "${cmd[@]}"
