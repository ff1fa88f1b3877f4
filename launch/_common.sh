# Shared by the launch/ wrappers: find the project's tools and print each command before running it.
# DRY_RUN=1 prints the command and exits 0 without running it.
LAUNCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${DESMOE_PYTHON:-}" ]; then
    if [ -x "$LAUNCH_ROOT/.venv/bin/python" ]; then DESMOE_PYTHON="$LAUNCH_ROOT/.venv/bin/python"; else DESMOE_PYTHON=python3; fi
fi
# The deepspeed launcher beside that python (the venv's), else the one on PATH.
DESMOE_DEEPSPEED="$(dirname "$DESMOE_PYTHON")/deepspeed"
[ -x "$DESMOE_DEEPSPEED" ] || DESMOE_DEEPSPEED=deepspeed
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$LAUNCH_ROOT/.cache/torch_extensions}"

run_cmd() {
    printf '+'; printf ' %q' "$@"; printf '\n'
    if [ "${DRY_RUN:-0}" = "1" ]; then return 0; fi
    exec "$@"
}

need_config() {
    case " $* " in *" --config "*) ;; *) echo "usage: $USAGE" >&2; exit 2 ;; esac
}
