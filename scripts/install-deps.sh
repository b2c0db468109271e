#!/usr/bin/env bash
# Installs the Debian 12 packages csaq builds and tests against. Idempotent: packages
# already present are skipped by apt-get. Run as root (or through sudo).
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config
  libtorch-dev libopenblas0-openmp
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
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
else
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update
  $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
# LibTorch's CPU matrix products go through libblas.so.3: OpenBLAS's OpenMP build, not
# Debian's reference BLAS (11x slower) nor OpenBLAS's pthread build (its threads compete
# with LibTorch's OpenMP threads). See docs/performance.md.
arch=$(gcc -dumpmachine)  # x86_64-linux-gnu: the multiarch directory
for alt in libblas.so.3 liblapack.so.3 libopenblas.so.0; do
  target="/usr/lib/$arch/openblas-openmp/$alt"
  if [ -e "$target" ] && [ "$(readlink -f "/usr/lib/$arch/$alt")" != "$(readlink -f "$target")" ]; then
    $SUDO update-alternatives --set "$alt-$arch" "$target"
  fi
done
