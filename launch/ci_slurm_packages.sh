#!/usr/bin/env bash
# Installs Debian's SLURM (slurm-wlm: slurmctld, slurmd, client tools) and munge for the
# launcher's real single-node test (tests/test_launch_slurm_real.py).
#
# Called by .ci/run as root. Non-interactive, quick, idempotent, and it never starts a daemon:
# the pytest fixture writes its own slurm.conf into a temp dir and starts/stops munged,
# slurmctld and slurmd itself. Exits 0 without doing anything when the binaries are present.
set -euo pipefail

need=(sbatch squeue scontrol slurmctld slurmd munged mungekey)
missing=0
for b in "${need[@]}"; do
  if ! command -v "$b" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$b" ]; then missing=1; fi
done
if [ "$missing" = 0 ]; then
  echo "ci_slurm_packages: slurm + munge already installed"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "ci_slurm_packages: not root, cannot apt-get install; slurm tests will skip" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Keep the packages' maintainer scripts from starting daemons (Debian's invoke-rc.d honours
# policy-rc.d exit 101). Only add one when the machine has none, and remove only our own.
policy=/usr/sbin/policy-rc.d
ours=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  ours=1
fi
cleanup() { if [ "$ours" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

start=$(date +%s)
# An apt list older than a day (or none) is refreshed; otherwise skip the update for speed.
if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  apt-get update -qq
fi
apt-get install -y -qq --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
  slurm-wlm munge >/dev/null
echo "ci_slurm_packages: installed slurm-wlm + munge in $(($(date +%s) - start)) s"
