#!/usr/bin/env bash
# gpu-bundle.sh: build the CUDA backend here (nvcc, no GPU needed) and pack what a GPU machine without moerl's
# Debian packages needs to run the gpu tests and benchmarks into .gpu/bundle.tar.xz (ignored by git): the stripped
# moerl binary and gpu_* test executables, and every shared library they load except glibc, the C++ runtime and
# CUDA's large libraries (cuBLAS, cuBLASLt, NCCL: the GPU machine's toolkit has them; scripts/gpu-check.sh finds
# them there). Then, on the GPU machine, from the repository root: bash scripts/gpu-check.sh
# Environment: MOERL_GPU_BUILD (default build-gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
B=${MOERL_GPU_BUILD:-build-gpu}
export PATH="/usr/local/cuda/bin:$PATH"
command -v nvcc >/dev/null || { echo "gpu-bundle: nvcc not found (install the CUDA toolkit at /usr/local/cuda)" >&2; exit 1; }
BINS=(moerl gpu_backend gpu_ops gpu_model_ops gpu_model)
cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DMOERL_CUDA=ON >/dev/null
cmake --build "$B" -j"$(nproc)" --target "${BINS[@]}"
grep -q "MOERL_CUDA:BOOL=ON" "$B/CMakeCache.txt" || { echo "gpu-bundle: $B was configured without CUDA" >&2; exit 1; }

S=.gpu/stage
rm -rf "$S" && mkdir -p "$S/bin" "$S/lib"
for b in "${BINS[@]}"; do strip -o "$S/bin/$b" "$B/$b"; done
# the libraries the loader resolves, less the ones the GPU machine brings (system C/C++ runtime, CUDA's big three)
for b in "${BINS[@]}"; do ldd "$B/$b"; done | awk '/=> \// {print $3}' | sort -u |
  grep -Ev '/(libc|libm|libpthread|libdl|librt|libresolv|libutil|libgcc_s|libstdc\+\+|ld-linux-x86-64|libcuda|libcublas|libcublasLt|libnccl)\.so' |
  while read -r lib; do cp -L "$lib" "$S/lib/"; done
git rev-parse --short HEAD > "$S/commit" 2>/dev/null || true
tar -C "$S" -cJf .gpu/bundle.tar.xz bin lib commit
rm -rf "$S"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
echo "gpu-bundle: .gpu/bundle.tar.xz ($(du -h .gpu/bundle.tar.xz | cut -f1)) of $(git rev-parse --short HEAD 2>/dev/null)"
