#!/usr/bin/env bash
# Several nodes listed in a DeepSpeed hostfile ("host slots=N" per line), started from the first node:
#   launch/multi_node.sh HOSTFILE --config configs/my_run.yaml [section.key=value ...]
# MASTER_ADDR (default: first host of the hostfile) and MASTER_PORT (default 29500) may be set.
# Every node needs the same checkout and .venv at the same path, and passwordless ssh from this one.
set -euo pipefail
USAGE="launch/multi_node.sh HOSTFILE --config CONFIG [--output-dir DIR] [section.key=value ...]"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
[ $# -ge 1 ] || { echo "usage: $USAGE" >&2; exit 2; }
hostfile="$1"; shift
[ -f "$hostfile" ] || { echo "launch/multi_node.sh: hostfile '$hostfile' not found" >&2; exit 2; }
need_config "$@"
master="${MASTER_ADDR:-$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1; exit}')}"
run_cmd "$DESMOE_DEEPSPEED" --hostfile "$hostfile" --master_addr "$master" \
    --master_port "${MASTER_PORT:-29500}" --module desmoe.train "$@"
