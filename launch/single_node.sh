#!/usr/bin/env bash
# One node, N GPUs, DeepSpeed launcher:
#   launch/single_node.sh NUM_GPUS --config configs/demo.yaml [section.key=value ...]
# On a CPU-only machine it runs N CPU ranks (DS_ACCELERATOR=cpu is set for you).
set -euo pipefail
USAGE="launch/single_node.sh NUM_GPUS --config CONFIG [--output-dir DIR] [section.key=value ...]"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
[ $# -ge 1 ] || { echo "usage: $USAGE" >&2; exit 2; }
n="$1"; shift
need_config "$@"
if ! "$DESMOE_PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
run_cmd "$DESMOE_DEEPSPEED" --num_gpus "$n" --module desmoe.train "$@"
