#!/usr/bin/env bash
# Installs the Debian 12 packages csaq builds and tests against. Idempotent: packages
# already present are skipped by apt-get. Run as root (or through sudo).
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config
  libtorch-dev
  libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev
  libboost-program-options-dev
  libgtest-dev
  nlohmann-json3-dev
  libpcre2-dev libicu-dev
  sentencepiece
  slurmctld slurmd slurm-client munge hdf5-tools jq
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends "${missing[@]}"
