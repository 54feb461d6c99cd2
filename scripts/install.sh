#!/usr/bin/env bash
# Install memtron without ever replacing the torch already on the machine.
#   scripts/install.sh [EXTRAS]     e.g. scripts/install.sh dev,bench
# torch goes first when absent (TORCH_SPEC, default torch==2.13.0; on a GPU cluster install the
# torch build you want before running this); everything else is then installed with a
# constraint equal to the installed torch, so no dependency can pull a different (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras=${1:-}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "[install] torch not found: installing ${TORCH_SPEC:-torch==2.13.0}"
    "$PYTHON" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version}" > "$constraints"
target="."
[ -n "$extras" ] && target=".[${extras}]"
echo "[install] memtron${extras:+[$extras]} with torch pinned to ${torch_version}"
"$PYTHON" -m pip install -q --disable-pip-version-check -c "$constraints" -e "$target" 2>&1 \
    | grep -v "Running pip as the 'root' user" || true
"$PYTHON" -c "import memtron, torch; assert torch.__version__ == '${torch_version}', torch.__version__"
# Build the CPU value-table kernels now rather than in the first training step (a machine
# without a compiler warns and keeps the torch ops).
"$PYTHON" -m memtron.model.memory.cpu_kernels \
    || echo "[install] C++ CPU kernels did not build: value tables use the torch ops"
