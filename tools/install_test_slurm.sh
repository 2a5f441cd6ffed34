#!/usr/bin/env bash
# Installs Slurm (slurmctld, slurmd, sbatch...) and munge from Debian's packages, for
# tests/test_slurm.py, which starts its own single-node cluster from them. Needs root (CI runs
# as root); does nothing when they are already there.
#
#   bash tools/install_test_slurm.sh
set -euo pipefail

# The daemons live in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
    echo "Slurm and munge already installed ($(slurmd -V))"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_test_slurm.sh: needs root (apt-get install slurm-wlm munge)" >&2
    exit 1
fi
apt-get update -qq
# The packages' own services are not started here (no init system in containers, and the test
# runs its daemons with its own configuration).
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
echo "installed $(slurmd -V) and $(munged --version 2>&1 | head -n 1)"
