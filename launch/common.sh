# What the launch scripts share; sourced by them after they define usage(), never run alone.
# shellcheck shell=bash

# -h / --help: the calling script's usage, and nothing started.
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

# Every rank imports seemore_ds from this checkout (pdsh exports PYTHON* variables to the other nodes).
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"

# The run's own arguments: --config CONFIG when CONFIG is set.
config_args=()
if [[ -n "${CONFIG:-}" ]]; then
    config_args=(--config "${CONFIG}")
fi

# Run the command in place of this shell, or with DRY_RUN=1 print it, quoted for a shell.
run_or_print() {
    if [[ "${DRY_RUN:-0}" == "1" ]]; then
        printf '%q ' "$@"
        printf '\n'
    else
        exec "$@"
    fi
}
