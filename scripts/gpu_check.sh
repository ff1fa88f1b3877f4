#!/usr/bin/env bash
# desmoe's GPU check, in under 10 minutes on a machine with one or more CUDA GPUs:
#  1. installs the CUDA build of the pinned stack into a venv (scripts/setup_env.sh; skipped when current);
#  2. benchmarks/gpu_check.py: a short desmoe run in bf16 over NCCL on 1 GPU and on all GPUs
#     (ep_size = GPUs) whose loss must fall, gradient isolation in bf16 (masked expert rows bit-identical),
#     tokens/s and peak memory of the recipe against a bare DeepSpeed loop, and the model FLOPs
#     utilisation of a DeepSeek-V2-Lite-shaped layer stack; then a summary table.
#
#   scripts/gpu_check.sh                                            # venv .venv-gpu, results in runs/gpu_check
#   DESMOE_VENV=/opt/venv GPU_CHECK_OUT=/tmp/gpu_check scripts/gpu_check.sh
#   GPU_CHECK_ALLOW_CPU=1 scripts/gpu_check.sh                      # dry run on CPU (.venv): gloo, fp32, tiny sizes
#
# Environment:
#   DESMOE_VENV           the venv (default .venv-gpu; in the CPU dry run .venv, the project's CPU venv):
#                         created and installed if missing, reused as it is when its install stamp is current
#                         (scripts/setup_env.sh)
#   GPU_CHECK_OUT         where everything is written (default runs/gpu_check): gpu_check.log (this output),
#                         setup_env.log, nvidia-smi.txt, <check>.log, <check>/ and gpu_check.json (the summary)
#   GPU_CHECK_BUDGET_S    seconds for the whole script, install included (default 570)
#   GPU_CHECK_TORCH_INDEX wheel index for torch, e.g. https://download.pytorch.org/whl/cu128. Default: the
#                         default index, whose torch==2.13.0 Linux wheel is the CUDA build. A CPU index in
#                         DESMOE_TORCH_INDEX (the one for CPU machines) is not used here.
#   GPU_CHECK_ALLOW_CPU=1 run the same checks on CPU (no GPU needed; MFU reported as n/a)
#   GPU_CHECK_ONLY        comma-separated subset of: train_1,train_all,isolation,step_time,mfu
#   GPU_PEAK_TFLOPS       the GPU's peak dense bf16 TFLOPS, for the MFU of a GPU not in gpu_check.py's table
#   GPU_CHECK_MFU_LAYERS  layers of the DeepSeek-V2-Lite-shaped stack (default 4; fewer for a smaller GPU)
# Exit code: 0 every check passed; 1 a check failed; 2 no GPU, no CUDA torch or the install failed;
# 124 the time budget ran out (the summary then shows how far it got).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUDGET="${GPU_CHECK_BUDGET_S:-570}"
ALLOW_CPU="${GPU_CHECK_ALLOW_CPU:-0}"
start=$SECONDS

left() { echo $((BUDGET - (SECONDS - start))); }
die() { echo "gpu_check: error: $2" >&2; exit "$1"; }

# ---- 1. a GPU, before anything is installed or written
if [ "$ALLOW_CPU" != 1 ]; then
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        die 2 "no NVIDIA GPU: nvidia-smi is not on PATH. Run this on a machine with CUDA GPUs and the NVIDIA \
driver, or set GPU_CHECK_ALLOW_CPU=1 for a dry run of the same checks on CPU (gloo, fp32, tiny sizes)."
    fi
    listed="$(nvidia-smi -L 2>/dev/null || true)"  # (read whole: grep -q on a pipe could SIGPIPE nvidia-smi)
    if ! grep -q '^GPU ' <<< "$listed"; then
        die 2 "no NVIDIA GPU: nvidia-smi lists none (driver not loaded, or no GPU visible to this container). \
Check 'nvidia-smi', or set GPU_CHECK_ALLOW_CPU=1 for a dry run on CPU."
    fi
fi

OUT="${GPU_CHECK_OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [ "$ALLOW_CPU" = 1 ]; then VENV="${DESMOE_VENV:-$ROOT/.venv}"; else VENV="${DESMOE_VENV:-$ROOT/.venv-gpu}"; fi
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "gpu_check: venv $VENV, output $OUT, budget ${BUDGET} s$([ "$ALLOW_CPU" = 1 ] && echo ', CPU dry run')"
if [ "$ALLOW_CPU" != 1 ]; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    nvidia-smi -L
fi

# ---- 2. the pinned stack, CUDA build
if [ "$ALLOW_CPU" != 1 ]; then
    if [ -n "${GPU_CHECK_TORCH_INDEX:-}" ]; then
        export DESMOE_TORCH_INDEX="$GPU_CHECK_TORCH_INDEX"
    elif [[ "${DESMOE_TORCH_INDEX:-}" == */cpu* ]]; then
        echo "gpu_check: not using DESMOE_TORCH_INDEX=$DESMOE_TORCH_INDEX (a CPU wheel index) for the CUDA install"
        unset DESMOE_TORCH_INDEX
    fi
fi
echo "gpu_check: install (scripts/setup_env.sh, log setup_env.log)"
if ! DESMOE_VENV="$VENV" timeout "$(left)" "$ROOT/scripts/setup_env.sh" > "$OUT/setup_env.log" 2>&1; then
    tail -n 20 "$OUT/setup_env.log" >&2
    die 2 "the install into $VENV failed or ran out of time (log: $OUT/setup_env.log)."
fi
PY="$VENV/bin/python"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"

# ---- 3. torch sees the GPUs
if [ "$ALLOW_CPU" != 1 ]; then
    if ! "$PY" - "$VENV" <<'PY'
import sys
import torch

venv = sys.argv[1]
if torch.version.cuda is None:
    sys.exit(f"gpu_check: error: torch {torch.__version__} in {venv} is a CPU build (installed for a CPU machine, "
             "or from a CPU wheel index). Use another venv (DESMOE_VENV, default .venv-gpu) or remove this one, "
             "so the CUDA build is installed.")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: error: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check the "
             "driver (nvidia-smi: it must support this CUDA version) and CUDA_VISIBLE_DEVICES.")
names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {len(names)} GPU(s): {', '.join(names)}")
PY
    then
        exit 2
    fi
fi

# ---- 4. the checks, under what is left of the budget
budget=$(left)
if [ "$budget" -lt 90 ]; then
    die 124 "only ${budget} s of the ${BUDGET} s budget left after the install; run again (the install is kept)."
fi
args=(--out "$OUT" --budget-s "$((budget - 10))")
if [ "$ALLOW_CPU" = 1 ]; then args+=(--cpu); fi
if [ -n "${GPU_CHECK_ONLY:-}" ]; then args+=(--only "$GPU_CHECK_ONLY"); fi
rc=0
timeout -k 15 "$((budget - 5))" "$PY" "$ROOT/benchmarks/gpu_check.py" "${args[@]}" || rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "gpu_check: the time budget (${BUDGET} s) ran out; the checks so far:"
    "$PY" "$ROOT/benchmarks/gpu_check.py" --report "$OUT/gpu_check.json" || true
    rc=124
fi
echo "gpu_check: $(( SECONDS - start )) s in all; summary: $OUT/gpu_check.json"
exit "$rc"
