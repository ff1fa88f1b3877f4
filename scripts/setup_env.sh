#!/usr/bin/env bash
# Create the project's virtual environment (if missing) and install desmoe's pinned stack into it.
#
#   scripts/setup_env.sh            # .venv in the project root
#   DESMOE_VENV=/opt/venv scripts/setup_env.sh
#
# - torch is installed first, pinned by constraints.txt so no later step swaps it for a
#   CUDA build on a CPU machine (set DESMOE_TORCH_INDEX to a wheel index, e.g. PyTorch's CPU
#   index, where the default index would serve a CUDA build).
# - DeepSpeed is an sdist: built with --no-build-isolation against that torch, with
#   DS_BUILD_OPS=0 (its ops are JIT-compiled on first use into .cache/torch_extensions).
# Re-running is cheap: a stamp records what was installed and nothing is redone unless
# requirements.txt, constraints.txt or pyproject.toml changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DESMOE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.desmoe-install-stamp"
want="$(cat "$ROOT/requirements.txt" "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/desmoe" ]; then
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_env: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
export PIP_CONSTRAINT="$ROOT/constraints.txt"

torch_pin="$(grep -E '^torch==' "$ROOT/requirements.txt")"
echo "setup_env: installing $torch_pin"
if [ -n "${DESMOE_TORCH_INDEX:-}" ]; then
    "${PIP[@]}" --index-url "$DESMOE_TORCH_INDEX" "$torch_pin"
else
    "${PIP[@]}" "$torch_pin"
fi
"${PIP[@]}" "setuptools>=64" wheel

echo "setup_env: installing requirements.txt (DeepSpeed built without isolation, DS_BUILD_OPS=0)"
DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation -r "$ROOT/requirements.txt"

echo "setup_env: installing desmoe (editable)"
"${PIP[@]}" --no-build-isolation --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import torch, deepspeed, transformers, peft, sklearn
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"setup_env: torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}, scikit-learn {sklearn.__version__}")
PY
echo "$want" > "$STAMP"
