#!/usr/bin/env bash
# What the cluster tests need beyond .venv (make test runs this after scripts/setup.sh):
# * Ray, the optional extra pinned in requirements/ray.lock, for tests/cluster/test_ray.py;
# * SLURM and munge from the distribution's packages (scripts/install_slurm.sh) for
#   tests/cluster/test_slurm.py.
# Neither is needed by a run on one host. Where one cannot be installed, this says why and the
# test that needs it is skipped with that reason; it never fails the set-up.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c "import ray" 2>/dev/null; then
    echo "[test-deps] installing Ray (requirements/ray.lock)"
    .venv/bin/python -m pip install -q --no-deps -r requirements/ray.lock \
        || echo "[test-deps] Ray could not be installed: tests/cluster/test_ray.py will be skipped" >&2
fi
bash scripts/install_slurm.sh \
    || echo "[test-deps] SLURM could not be installed: tests/cluster/test_slurm.py will be skipped" >&2
exit 0
