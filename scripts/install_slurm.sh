#!/usr/bin/env bash
# Install SLURM (slurmctld, slurmd, the client commands) and munge for tests/cluster/test_slurm.py.
# Idempotent: a quick no-op when they are already installed. Needs root and apt-get (Debian,
# Ubuntu); elsewhere it says so and exits 1 (the test is then skipped, naming why).
#   bash scripts/install_slurm.sh
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }
installed() {
    for cmd in slurmctld slurmd sbatch squeue scancel scontrol sacct munged; do
        have "$cmd" || [ -x "/usr/sbin/$cmd" ] || return 1
    done
}

if installed; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_slurm: SLURM is not installed and this is not root: install slurmctld, slurmd, slurm-client and munge" >&2
    exit 1
fi
if ! have apt-get; then
    echo "install_slurm: SLURM is not installed and there is no apt-get: install slurmctld, slurmd, slurm-client and munge" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Wait for another apt/dpkg (up to 5 minutes) rather than fail on its lock.
apt() { apt-get -o DPkg::Lock::Timeout=300 "$@"; }
apt update -qq
apt install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
installed || { echo "install_slurm: installed, but a SLURM command is still missing" >&2; exit 1; }
echo "install_slurm: slurm $(dpkg-query -W -f='${Version}' slurmctld) and munge installed"
