#!/usr/bin/env bash
# setup.sh: install moerl's Debian dependencies and build it into build/ (Release with debug info).
# Run as root on Debian 12 (or with sudo). Safe to re-run: apt and cmake skip what is already done.
# Environment: MOERL_BUILD_DIR (default build), MOERL_CMAKE_ARGS (extra cmake flags), MOERL_SKIP_APT=1.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(build-essential cmake pkg-config git ca-certificates
      libyaml-dev libsqlite3-dev sqlite3 liblua5.4-dev lua5.4 libcriterion-dev
      libopenblas-dev libopenblas-openmp-dev libopenmpi-dev openmpi-bin libseccomp-dev libpcre2-dev
      libcurl4-openssl-dev libcjson-dev python3)

if [ "${MOERL_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# The CUDA backend is built whenever nvcc is present (CUDA toolkit at /usr/local/cuda).
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="/usr/local/cuda/bin:$PATH"

BUILD=${MOERL_BUILD_DIR:-build}
# shellcheck disable=SC2086
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo ${MOERL_CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
echo "setup: built $BUILD/moerl"
