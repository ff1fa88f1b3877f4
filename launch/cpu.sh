#!/usr/bin/env bash
# N ranks on this machine's CPU (gloo), torchrun:
#   launch/cpu.sh NPROC --config configs/demo.yaml [section.key=value ...]
set -euo pipefail
USAGE="launch/cpu.sh NPROC --config CONFIG [--output-dir DIR] [section.key=value ...]"
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
[ $# -ge 1 ] || { echo "usage: $USAGE" >&2; exit 2; }
n="$1"; shift
need_config "$@"
export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" CUDA_VISIBLE_DEVICES=""
run_cmd "$DESMOE_PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$n" -m desmoe.train "$@"
