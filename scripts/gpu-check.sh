#!/usr/bin/env bash
# gpu-check.sh: on a GPU machine, from the repository root, with .gpu/bundle.tar.xz made by scripts/gpu-bundle.sh:
# unpack it, find the machine's cuBLAS, cuBLASLt and NCCL, then run every gpu test and the GPU benchmarks, each
# under a time limit, logging to $OUT (default .gpu/out): summary.txt, one log per test, bench.txt.
# Arguments: the parts to run, default "tests bench" (bench-1b adds the ~1B-total preset). With the device tool:
# run(command="bash scripts/gpu-check.sh", carry=[".gpu"]) (.gpu is ignored by git, so it travels only when carried).
set -uo pipefail
cd "$(dirname "$0")/.."
O=${OUT:-.gpu/out}
mkdir -p "$O"
D=$(mktemp -d /tmp/moerl-gpu.XXXXXX)
tar -C "$D" -xJf .gpu/bundle.tar.xz || { echo "gpu-check: cannot unpack .gpu/bundle.tar.xz" | tee "$O/summary.txt"; exit 1; }
dirs=""
for n in libcublas.so.13 libcublasLt.so.13 libnccl.so.2; do
  f=$(find /usr/local /usr/lib /opt -name "$n" 2>/dev/null | head -1)
  [ -n "$f" ] && dirs="$dirs:$(dirname "$f")" || echo "gpu-check: $n not found on this machine" | tee -a "$O/summary.txt"
done
export LD_LIBRARY_PATH="$D/lib$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MOERL_BIN="$D/bin/moerl" MOERL_SRC="$PWD"
{
  echo "bundle of commit $(cat "$D/commit" 2>/dev/null); $(date -u)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  ldd "$D/bin/moerl" "$D/bin/gpu_model" | grep "not found" || echo "every library resolved"
  "$D/bin/moerl" --version 2>&1 | head -3
} | tee -a "$O/summary.txt"
parts=${*:-tests bench}
if [[ " $parts " == *" tests "* ]]; then
  for t in gpu_backend gpu_ops gpu_model_ops gpu_model; do
    start=$(date +%s)
    timeout 300 "$D/bin/$t" --jobs 1 > "$O/$t.log" 2>&1
    rc=$?
    echo "$t: exit $rc ($(( $(date +%s) - start )) s); $(grep -E 'Synthesis|SKIPPED' "$O/$t.log" | tail -1)" | tee -a "$O/summary.txt"
  done
fi
bench() { echo "== moerl bench model $*" >> "$O/bench.txt"; timeout 240 "$D/bin/moerl" bench model "$@" >> "$O/bench.txt" 2>&1 || echo "(exit $?)" >> "$O/bench.txt"; }
if [[ " $parts " == *" bench "* ]]; then
  bench --device cuda --mm fast --precision bf16 --preset tiny --tokens 1024 --steps 5
  bench --device cuda --mm fast --precision fp32 --preset tiny --tokens 1024 --steps 5
  bench --device cuda --mm det --preset tiny --tokens 1024 --steps 3
  bench --device cuda --mm fast --precision bf16 --preset 100m --tokens 4096 --steps 3
fi
if [[ " $parts " == *" bench-1b "* ]]; then
  bench --device cuda --mm fast --precision bf16 --preset 1b --tokens 4096 --steps 3
fi
echo "gpu-check: done; logs in $O" | tee -a "$O/summary.txt"
