#!/usr/bin/env bash
# System packages the test suite uses: an MPI (for `mpirun` launch tests and mpi4py) and a C++
# toolchain (DeepSpeed JIT-compiles its CPU communication op). Installed from Debian when
# missing and we are root with apt; otherwise say what is missing (those tests then skip).
set -euo pipefail
need=()
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
command -v g++ >/dev/null 2>&1 || need+=(g++)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
else
    echo "[install] missing system packages: ${need[*]} (not root or no apt-get); the tests" \
         "that need them will skip" >&2
fi
